"""The data preparation command on a user's own small text and JSONL files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from trainer_accel import prepare as prepare_command
from trainer_accel.data import prepare
from trainer_accel.data.cache import meta_path, open_cache
from trainer_accel.data.tokenizer import DOC, EOT, USER, ByteTokenizer
from trainer_accel.errors import UserError
from trainer_accel.fsio import sha256_file


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRAINER_DATA_DIR", raising=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("First doc.\n\nSecond doc, <|user|> stays text.\n")
    (tmp_path / "notes" / "b.md").write_text("Third doc.\n\n\nFourth doc.\n")
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)]
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "r1"},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "r2"},
            ]
        }
    )
    rows.append({"instruction": "summarise", "context": "text", "response": "done"})
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_text_and_jsonl_become_caches(inputs):
    assert (
        prepare_command.main(
            [
                "--stream",
                "roam=notes",
                "--sft",
                "dolly=sft.jsonl",
                "--val-fraction",
                "0.25",
                "--documents",
                "blank-lines",
            ]
        )
        == 0
    )
    tok = ByteTokenizer()
    train = open_cache(inputs / "data/cache/streams/roam_train.bin", "stream", verify_hash=True)
    val = open_cache(inputs / "data/cache/streams/roam_val.bin", "stream", verify_hash=True)
    # 4 documents between blank lines, each ending with <|endoftext|>, on both sides of the split
    docs_train, docs_val = int((train.tokens == tok.special[DOC]).sum()), int((val.tokens == tok.special[DOC]).sum())
    assert docs_train + docs_val == 4 and docs_train and docs_val
    text = tok.decode(list(train.tokens) + list(val.tokens))
    for doc in (
        "First doc.<|endoftext|>",
        "Second doc, <|user|> stays text.\n<|endoftext|>",
        "Third doc.<|endoftext|>",
        "Fourth doc.\n<|endoftext|>",
    ):
        assert doc in text
    assert not np.any(train.tokens == tok.special[USER])  # a typed "<|user|>" never becomes the special token
    meta = train.meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 260 and meta["tokenizer"] == "byte-v1"
    assert meta["special_tokens"] == tok.special and meta["num_tokens"] == len(train.tokens)
    assert meta["sha256"] == sha256_file(train.path)
    assert meta["documents"] == {"notes/a.txt": "blank-lines", "notes/b.md": "blank-lines"}
    assert meta["split"] == {"rule": "hash", "val_fraction": 0.25, "seed": 0}

    sft_tr = open_cache(inputs / "data/cache/sft/dolly_train.bin", "sft", verify_hash=True)
    sft_va = open_cache(inputs / "data/cache/sft/dolly_val.bin", "sft", verify_hash=True)
    assert sft_tr.num_examples + sft_va.num_examples == 10 and sft_va.num_examples >= 1
    examples = [
        tok.decode(list(c.tokens[c.starts[i] : c.starts[i + 1]]))
        for c in (sft_tr, sft_va)
        for i in range(c.num_examples)
    ]
    assert "<|user|>q3<|assistant|>a3<|eot|>" in examples
    assert "<|user|>be brief\n\nu1<|assistant|>r1<|eot|><|user|>u2<|assistant|>r2<|eot|>" in examples
    assert "<|user|>summarise\n\ntext<|assistant|>done<|eot|>" in examples
    for c in (sft_tr, sft_va):
        first = c.tokens[c.starts[:-1]]
        assert np.all(first == tok.special[USER])
        assert np.all(c.tokens[c.starts[1:] - 1] == tok.special[EOT])


def test_bad_inputs_are_all_named(inputs, capsys):
    (inputs / "bad.jsonl").write_text(
        '{"prompt": "x", "response": "y"}\nnot json\n{"prompt": 3}\n'
        '{"messages": [{"role": "assistant", "content": "hi"}]}\n'
    )
    code = prepare_command.main(
        ["--sft", "oasst1=bad.jsonl", "--stream", "wiki=missing_dir", "--stream", "bogus=x.txt"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "x.txt: file or folder not found" in err
    assert "--stream bogus=x.txt" not in err  # any short name is a source now
    code = prepare_command.main(["--stream", "My-Notes=notes", "--sft", "=x.jsonl"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--stream My-Notes=notes: 'My-Notes' is not a source name (a source name is 1-64 lowercase letters" in err
    assert "--sft =x.jsonl: expected SOURCE=PATH" in err
    code = prepare_command.main(["--sft", "oasst1=bad.jsonl", "--stream", "wiki=missing_dir"])
    err = capsys.readouterr().err
    assert code == 2 and "missing_dir: file or folder not found" in err  # found before any data is read
    code = prepare_command.main(["--sft", "oasst1=bad.jsonl", "--stream", "wiki=notes"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl:2: not valid JSON" in err
    assert "bad.jsonl:3: expected" in err
    assert "bad.jsonl:4: messages[0]: an assistant message with no user message before it" in err
    assert "Traceback" not in err
    assert not list((inputs / "data").rglob("*.bin*"))  # nothing written when any input is bad


def test_demo_is_deterministic(tmp_path, monkeypatch):
    hashes = []
    for sub in ("a", "b"):
        monkeypatch.setenv("TRAINER_DATA_DIR", str(tmp_path / sub))
        assert prepare_command.main(["--demo"]) == 0
        metas = sorted((tmp_path / sub / "cache").rglob("*.meta.json"))
        assert len(metas) == 14  # 3 streams, 3 SFT sets and 1 pair set, each train and val
        hashes.append([json.loads(m.read_text())["sha256"] for m in metas])
    assert hashes[0] == hashes[1]


def test_hf_tokenizer_json(inputs):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"[UNK]": 0, "doc": 1, "first": 2, "q1": 3}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(inputs / "tokenizer.json"))
    r = run_cli(
        "prepare", "--stream", "roam=notes", "--sft", "dolly=sft.jsonl", "--tokenizer", "tokenizer.json", cwd=inputs
    )
    assert r.returncode == 0, r.stderr
    meta = json.loads(meta_path(inputs / "data/cache/sft/dolly_train.bin").read_text())
    assert meta["tokenizer"].startswith("hf-") and meta["vocab_size"] == 4 + 4
    assert sorted(meta["special_tokens"].values()) == [4, 5, 6, 7]


def test_unreadable_tokenizer_is_a_user_error(inputs):
    (inputs / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json: not a readable Hugging Face tokenizer.json"):
        prepare.prepare(
            [prepare.Source("roam", "stream", (inputs / "notes",))], inputs / "tokenizer.json", prepare.Split(), None
        )
