"""prepare on the data users bring: text kept byte for byte, their own source names, the published dataset formats
(each made here, no download), bounded memory, and a prepare killed halfway."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import pytest
from conftest import run_cli

from trainer_accel import prepare
from trainer_accel.data import prepare as data_prepare
from trainer_accel.data.cache import open_cache
from trainer_accel.data.cache_writer import JOURNAL
from trainer_accel.data.formats import text as text_format
from trainer_accel.data.tokenizer import DOC, ByteTokenizer, load_tokenizer

NEWLINES = "Title\n\nOne line\nand the next.\n\n\nAfter two blank lines.\n\n\n\n  Indented, é, 🙂, <|user|> typed.\n"


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRAINER_DATA_DIR", raising=False)
    return tmp_path


def cache_docs(root, kind: str, source: str, tok=None) -> list[str]:
    """Every document (stream) or example (SFT) of a source's two caches, decoded, train then val (a document
    cut by a tail split is whole again)."""
    tok = tok or ByteTokenizer()
    out, ids = [], []
    for split in ("train", "val"):
        folder = "streams" if kind == "stream" else "sft"
        c = open_cache(root / f"data/cache/{folder}/{source}_{split}.bin", kind, verify_hash=True)
        tokens = list(c.tokens)
        if kind == "sft":
            out += [tok.decode(tokens[c.starts[i] : c.starts[i + 1]]) for i in range(c.num_examples)]
        ids += tokens
    return out if kind == "sft" else tok.decode(ids).split(DOC)[:-1]


def bpe_tokenizer(path, texts):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        tokenizers.trainers.BpeTrainer(vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.save(str(path))
    return path


def test_a_text_round_trips_byte_for_byte_through_cache_and_tokenizer(here, monkeypatch):
    """Single, double and triple newlines survive; a file is one document unless asked; a long document is cut
    into pieces at places that leave a BPE tokenizer's tokens exactly as for the whole text."""
    long_text = NEWLINES * 40  # many pieces once pieces are made small below
    (here / "notes.txt").write_text(long_text)
    assert prepare.main(["--stream", "my_notes=notes.txt"]) == 0
    ids = [list(open_cache(here / f"data/cache/streams/my_notes_{s}.bin", "stream").tokens) for s in ("train", "val")]
    assert ByteTokenizer().decode(ids[0] + ids[1]) == long_text + DOC  # one document, its tail held out (one file)
    assert len(ids[1]) == round(0.1 * (len(long_text.encode()) + 1))
    meta = json.loads((here / "data/cache/streams/my_notes_val.bin.meta.json").read_text())
    assert meta["documents"] == {"notes.txt": "file"} and meta["split"]["rule"] == "tail"

    monkeypatch.setattr(text_format, "PIECE_CHARS", 256)
    monkeypatch.setattr(text_format, "KEY_CHARS", 16)
    monkeypatch.setattr(text_format, "BLOCK_BYTES", 7)  # UTF-8 characters and separators split across blocks
    tok_path = bpe_tokenizer(here / "tokenizer.json", [NEWLINES])
    assert prepare.main(["--stream", "my_notes=notes.txt", "--tokenizer", str(tok_path)]) == 0
    tok = load_tokenizer(tok_path)
    ids = []
    for split in ("train", "val"):
        ids += list(open_cache(here / f"data/cache/streams/my_notes_{split}.bin", "stream").tokens)
    assert ids == tok.encode(long_text) + [tok.special[DOC]]
    assert tok.decode(ids[:-1]) == long_text


@pytest.mark.parametrize(
    "rule, expected",
    [
        (
            "blank-lines",
            ["Title", "One line\nand the next.", "After two blank lines.", "  Indented, é, 🙂, <|user|> typed.\n"],
        ),
        (
            "separator=\\n\\n\\n",
            ["Title\n\nOne line\nand the next.", "After two blank lines.", "\n  Indented, é, 🙂, <|user|> typed.\n"],
        ),
    ],
)
def test_document_rules_cut_only_where_asked(here, monkeypatch, rule, expected):
    monkeypatch.setattr(text_format, "BLOCK_BYTES", 5)
    (here / "notes.md").write_text(NEWLINES)
    assert prepare.main(["--stream", "n=notes.md", "--documents", rule, "--val-fraction", "0.3"]) == 0
    assert sorted(cache_docs(here, "stream", "n")) == sorted(expected)
    meta = json.loads((here / "data/cache/streams/n_train.bin.meta.json").read_text())
    assert meta["documents"] == {"notes.md": rule if rule == "blank-lines" else "separator '\\n\\n\\n'"}
    assert prepare.main(["--stream", "n=notes.md", "--documents", "lines"]) == 2


def test_stream_rows_from_jsonl_parquet_and_a_saved_dataset(here, capsys):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    texts = [f"Row {i}:\n\n keeps\tits  spacing.\n" for i in range(12)]
    with gzip.open(here / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts[:4]))
    pq.write_table(pa.table({"body": texts[4:8], "n": list(range(4))}), here / "b.parquet", row_group_size=3)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": texts[8:11]}),
            "test": datasets.Dataset.from_dict({"body": texts[11:]}),
        }
    ).save_to_disk(str(here / "c"))
    args = ["--stream", "web=a.jsonl.gz", "--stream", "web=b.parquet", "--stream", "web=c", "--text-field", "body"]
    assert prepare.main(args) == 0
    assert sorted(cache_docs(here, "stream", "web")) == sorted(texts)
    meta = json.loads((here / "data/cache/streams/web_train.bin.meta.json").read_text())
    assert set(meta["documents"].values()) == {"row"} and meta["source_files"] == ["a.jsonl.gz", "b.parquet", "c"]

    (here / "bad.jsonl").write_text('{"body": "fine"}\n{"text": "no body"}\n[1, 2]\n{"body": null}\n')
    assert prepare.main(["--stream", "web=bad.jsonl", "--stream", "pq=b.parquet"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: no text field 'text' (row has: body; choose the field with --text-field)" in err
    assert "b.parquet: no column 'text' (columns: body, n; choose one with --text-field)" in err
    assert prepare.main(["--stream", "web=bad.jsonl", "--text-field", "body"]) == 2
    err = capsys.readouterr().err
    assert (
        "bad.jsonl:2: no text field 'body' (row has: text;" in err
        and "bad.jsonl:3: no text field 'body' (row has: list;" in err
    )
    assert "bad.jsonl:4: field 'body' holds null, expected a string" in err
    datasets.Dataset.from_dict({"body": ["fine", None]}).save_to_disk(str(here / "d"))
    assert prepare.main(["--stream", "web=d", "--text-field", "body"]) == 2
    assert "d row 1: field 'body' holds null, expected a string" in capsys.readouterr().err


def oasst_messages() -> list[dict]:
    """Two trees: in English, a prompt with two ranked answers, the best one followed up; in German, one pair."""

    def m(mid, parent, role, text, rank=None, lang="en", deleted=False):
        return {
            "message_id": mid,
            "parent_id": parent,
            "role": role,
            "text": text,
            "lang": lang,
            "rank": rank,
            "deleted": deleted,
        }

    return [
        m("a1", "p1", "assistant", "Second best.", rank=1),
        m("p1", None, "prompter", "Name a colour."),
        m("a0", "p1", "assistant", "Blue.", rank=0),
        m("p2", "a0", "prompter", "Another?"),
        m("a2", "p2", "assistant", "Red.", rank=0),
        m("p3", "a1", "prompter", "Unanswered."),
        m("gone", "p1", "assistant", "Deleted answer.", rank=2, deleted=True),
        m("q1", None, "prompter", "Farbe?", lang="de"),
        m("r1", "q1", "assistant", "Grün.", rank=0, lang="de"),
    ]


def test_oasst1_trees_become_conversations(here, capsys):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = oasst_messages()
    (here / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), here / "flat.parquet")
    leaves = sorted(
        [
            "<|user|>Name a colour.<|assistant|>Blue.<|eot|><|user|>Another?<|assistant|>Red.<|eot|>",
            "<|user|>Name a colour.<|assistant|>Second best.<|eot|>",
            "<|user|>Farbe?<|assistant|>Grün.<|eot|>",
        ]
    )
    for f in ("flat.jsonl", "flat.parquet"):
        assert prepare.main(["--sft", f"chat={f}"]) == 0
        assert sorted(cache_docs(here, "sft", "chat")) == leaves
    assert (
        prepare.main(["--sft", "chat=flat.jsonl", "--oasst-paths", "best", "--lang", "en"]) == 2
    )  # one tree: no split
    assert "chat: 1 examples in flat.jsonl; at least 2 are needed" in capsys.readouterr().err
    assert prepare.main(["--sft", "chat=flat.jsonl", "--oasst-paths", "best"]) == 0
    assert sorted(cache_docs(here, "sft", "chat")) == leaves[:2]  # the best-ranked path only

    nested = {"message_tree_id": "p1", "prompt": {**rows[1], "replies": [{**rows[2], "replies": []}]}}
    (here / "trees.jsonl").write_text(
        json.dumps(nested)
        + "\n"
        + json.dumps({**nested, "message_tree_id": "x", "prompt": {**rows[7], "replies": [rows[8]]}})
        + "\n"
    )
    assert prepare.main(["--sft", "chat=trees.jsonl"]) == 0
    assert sorted(cache_docs(here, "sft", "chat")) == [
        "<|user|>Farbe?<|assistant|>Grün.<|eot|>",
        "<|user|>Name a colour.<|assistant|>Blue.<|eot|>",
    ]

    bad = rows[:2] + [{**rows[2], "role": "user"}, {**rows[3], "message_id": "a1"}]
    (here / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    assert prepare.main(["--sft", "chat=bad.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:3: oasst1 message a0: role must be prompter or assistant, got 'user'" in err
    assert "bad.jsonl:4: oasst1 message a1: message_id seen before, at bad.jsonl:1" in err


def test_memory_stays_bounded_as_the_input_grows(here, monkeypatch):
    """With blocks and batches of 64 KB, the traced peak (Python objects and numpy's buffers) while preparing
    2 MB and 20 MB of text is the same, and a small fraction of the input: nothing grows with its size."""
    monkeypatch.setattr(text_format, "BLOCK_BYTES", 1 << 16)
    monkeypatch.setattr(data_prepare, "BATCH_CHARS", 1 << 16)
    peaks = {}
    for mb in (2, 20):
        with open(here / f"big{mb}.txt", "w") as f:
            for i in range(mb * 2**20 // 2000):
                f.write(f"Paragraph {i}. " + "All work and no play makes a dull model. " * 48 + "\n\n")
        tracemalloc.start()
        assert prepare.main(["--stream", f"big{mb}=big{mb}.txt", "--documents", "blank-lines"]) == 0
        peaks[mb] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[20] < 1.5 * 2**20, peaks  # 20 MB of input, under 1.5 MB at the peak
    assert peaks[20] < peaks[2] * 1.25, peaks
    train = open_cache(here / "data/cache/streams/big20_train.bin", "stream")
    assert train.meta["num_tokens"] > 15 * 2**20 and train.meta["split"]["rule"] == "hash"


def test_a_prepare_killed_halfway_leaves_the_old_caches(here):
    (here / "old.txt").write_text("The old text.\n" * 50)
    assert prepare.main(["--stream", "notes=old.txt"]) == 0
    caches = here / "data/cache/streams"
    before = {p.name: p.read_bytes() for p in caches.iterdir()}
    (here / "new.txt").write_text("A new and longer text.\n" * 200_000)

    r = run_cli("prepare", "--stream", "notes=new.txt", cwd=here, env={"TRAINER_FAULT": "prepare_batch:2"})
    assert r.returncode == -9
    left = {p.name for p in caches.iterdir()} - set(before)
    assert left and all(".prepare-tmp-" in n for n in left)  # nothing half-written under a final name
    assert {p.name: p.read_bytes() for p in caches.iterdir() if p.name in before} == before
    open_cache(caches / "notes_train.bin", "stream", verify_hash=True)

    r = run_cli("prepare", "--stream", "notes=new.txt", cwd=here, env={"TRAINER_FAULT": "publish_rename:3"})
    assert r.returncode == -9 and (here / "data/cache" / JOURNAL).is_file()  # killed among the renames
    assert "removed 2 temporary files a stopped prepare left" in r.stderr, r.stderr  # the first kill's
    r = run_cli("prepare", "--stream", "other=old.txt", cwd=here)
    assert r.returncode == 0 and "finished publishing them" in r.stderr, r.stderr
    assert not [p for p in caches.iterdir() if ".prepare-tmp-" in p.name]
    assert "".join(cache_docs(here, "stream", "notes")) == (here / "new.txt").read_text()


def test_oasst1_counts_every_message_it_leaves_out_by_reason(here, capsys):
    """A missing parent's child, a reply to a deleted message, a self-parent and a two-message circle used to go
    uncounted (the log said 1 message was left out when more were)."""

    def m(mid, parent, role, text):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "lang": "en", "rank": 0}

    rows = oasst_messages() + [
        m("x1", "nowhere", "assistant", "Parent not here."),
        m("x2", "x1", "prompter", "Below it."),
        m("x3", "gone", "prompter", "Reply to a deleted one."),
        m("s1", "s1", "prompter", "My own parent."),
        m("c1", "c2", "prompter", "Round"),
        m("c2", "c1", "assistant", "and round."),
    ]
    (here / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prepare.main(["--sft", "chat=flat.jsonl"]) == 0
    assert (
        "left out: 1 replies to a deleted message, 1 whose parent is not in the file, 1 under those, "
        "3 in or under a circle of parent ids, 1 marked deleted"
    ) in capsys.readouterr().err


def test_text_inputs_crlf_paragraphs_a_file_named_twice_and_bad_utf8_at_a_block_edge(here, capsys):
    (here / "win.txt").write_bytes(b"First para.\r\nStill first.\r\n\r\nSecond para.\r\n")
    assert prepare.main(["--stream", "win=win.txt", "--documents", "blank-lines", "--val-fraction", "0.5"]) == 0
    docs = cache_docs(here, "stream", "win")
    assert sorted(docs) == ["First para.\r\nStill first.", "Second para.\r\n"]  # no stray \r on the first one

    (here / "notes").mkdir()
    (here / "notes" / "a.txt").write_text("some text\n")
    assert prepare.main(["--stream", "x=notes", "--stream", "x=notes/a.txt"]) == 2
    assert (
        "notes/a.txt: named twice in source 'x' (also as notes/a.txt); its documents would be read twice"
        in capsys.readouterr().err
    )

    edge = text_format.BLOCK_BYTES
    (here / "bad.txt").write_bytes(
        b"a" * (edge - 1) + b"\xe2\x82" + b"\xff" + b"b" * 10
    )  # the sequence starts at edge-1
    assert prepare.main(["--stream", "x=bad.txt"]) == 2
    assert f"bad.txt: not UTF-8 text (byte {edge - 1})" in capsys.readouterr().err
