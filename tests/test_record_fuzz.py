"""Every file a user or a past run wrote, fed to its reader mutated: wrong types, negative, NaN, huge, nested,
duplicated keys. Each must end in `error:` lines and exit 2, never a traceback, and write nothing.

The readers: a checkpoint's sidecar (meta.json), an exported .pt, a Hugging Face directory's config.json and
weights (init_from), and a run config; the cases are the classes of docs/trust.md, "What is refused".
"""

from __future__ import annotations

import gzip
import json
import math
import shutil

import pytest
import torch
from conftest import TINY_MODEL, edit_sidecar, run_cli, write_config
from safetensors.torch import save_file

from trainer_accel.config import ModelConfig
from trainer_accel.models.gpt import GPT
from trainer_accel.models.gpt_hf import hf_config, state_to_hf

SHORT = {"total_steps": 2, "eval_every": 2, "ckpt_every": 2}
DEEP = "[" * 100_000 + "]" * 100_000


def refused(r, needle: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 2, (r.returncode, out[-2000:])
    assert "Traceback" not in out and needle in out, (needle, out[-2000:])


def set_path(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[key]
    doc[last] = value


@pytest.fixture
def trained(world):
    cfg = write_config(world / "pre.json", "pretrain", SHORT)
    done = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert done.returncode == 0, done.stderr
    return world


SIDECAR_CASES = [  # (field, value, what the error says)
    ("step", -3, "step is -3, not a whole number >= 0"),
    ("step", "abc", "step is 'abc', not a whole number >= 0"),
    ("step", True, "step is True"),
    ("best_val_loss", "abc", "best_val_loss is 'abc', not a finite loss"),
    ("best_val_loss", math.nan, "best_val_loss is nan, not a finite loss"),
    ("best_val_loss", -1.0, "best_val_loss is -1.0"),
    ("tokens_seen", -100, "tokens_seen is -100, not a whole number >= 0"),
    ("tokens_seen", [1], "tokens_seen is [1]"),
    ("best_val_step", 99, "best_val_step is 99, not a step between 0 and the checkpoint's step"),
    ("model_cfg.L", "2", 'model_cfg.L: expected an integer, got "2"'),
    ("model_cfg.V", -5, "model_cfg.V: must be a positive integer, got -5"),
    (
        "model_cfg.C",
        10**30,
        "model_cfg.C: must be at most 2,147,483,647 (a tensor dimension), got "
        "1,000,000,000,000,000,000,000,000,000,000",
    ),
    ("model_cfg", [1, 2], "model_cfg is list, not an object"),
    ("files", ["model.safetensors"], "malformed 'files'"),
    ("files.optimizer.pt", {"size": "big"}, "files.optimizer.pt is not {size, sha256}"),
]


def test_a_sidecar_edited_by_hand_or_nonsense_in_a_resealed_one_is_refused_in_one_line(trained):
    """The seal catches any hand edit (a step moved back beside later weights); the type and range checks catch
    nonsense a seal cannot (an older, unsealed sidecar, or a tool that reseals)."""
    step = trained / "checkpoints/pretrain/step_0000002"
    cases = {}
    for i, (field, value, needle) in enumerate(SIDECAR_CASES):
        ck = shutil.copytree(step, trained / f"case{i}")
        edit_sidecar(
            ck,
            lambda meta, f=field, v=value: (
                set_path(meta, f, v) if not f.startswith("files.") else meta["files"].update({f[len("files.") :]: v})
            ),
        )
        cases[ck] = needle
    edited = shutil.copytree(step, trained / "edited")
    meta = json.loads((edited / "meta.json").read_text())
    (edited / "meta.json").write_text(json.dumps({**meta, "step": 1}, indent=2))  # a hand edit, not resealed
    cases[edited] = "meta.json was changed after the save (it does not match its sidecar_sha256)"
    for name, text, needle in (
        ("deep", DEEP, "nested too deeply"),
        ("twice", '{"format": "trainer_accel.checkpoint", "format": "x"}', 'key "format" appears twice'),
        ("list", "[1]", "is not a trainer_accel.checkpoint sidecar"),
        ("version", json.dumps({**meta, "format_version": "3"}), "format version (format_version) is '3'"),
    ):
        ck = shutil.copytree(step, trained / name)
        (ck / "meta.json").unlink()
        (ck / "meta.json").write_text(text)
        cases[ck] = needle
    for ck, needle in cases.items():
        r = run_cli("export", "--checkpoint", str(ck), "--out", f"{ck.name}.pt", cwd=trained)
        refused(r, f"{ck.name}: invalid checkpoint: ")
        refused(r, needle)
        assert not (trained / f"{ck.name}.pt").exists()
    for ck in (edited, trained / "case0", trained / "deep"):  # resuming reads the same sidecar the same way
        r = run_cli("run", "--phase", "pretrain", "--config", "pre.json", "--resume", str(ck), cwd=trained)
        refused(r, cases[ck])


PT_CASES = [
    ("step", "abc", "step is 'abc'"),
    ("step", -3, "step is -3"),
    ("best_val_loss", math.inf, "best_val_loss is inf"),
    ("best_val_loss", "abc", "best_val_loss is 'abc'"),
    ("model_cfg", [1], "model_cfg is list, not an object"),
    ("model_cfg.L", "2", 'model_cfg.L: expected an integer, got "2"'),
    ("model_cfg.H", 3, "model_cfg.C: width 32 must be divisible by the number of heads H=3"),
    ("train_cfg", "x", "train_cfg is str, not an object"),
]


def test_a_pt_with_nonsense_in_its_loop_state_or_model_cfg_is_refused_in_one_line(trained):
    blob = torch.load(trained / "checkpoints/best.pt", weights_only=True)
    for i, (field, value, needle) in enumerate(PT_CASES):
        bad = {**blob, "model_cfg": dict(blob["model_cfg"])}
        set_path(bad, field, value)
        torch.save(bad, trained / f"bad{i}.pt")
        r = run_cli("export", "--checkpoint", f"bad{i}.pt", "--out", f"out{i}.pt", cwd=trained)
        refused(r, f"bad{i}.pt: not a usable best.pt: {needle}")
        assert not (trained / f"out{i}.pt").exists()
    r = run_cli("run", "--phase", "pretrain", "--config", "pre.json", "--resume", "bad0.pt", cwd=trained)
    refused(r, "bad0.pt: not a usable best.pt: step is 'abc'")


GPT2_LIKE = {**TINY_MODEL, "d_ff": 128, "bias": True, "activation": "gelu_tanh"}
HF_CASES = [
    ("n_layer", "2", 'n_layer is "2", expected a positive integer'),
    ("vocab_size", -5, "vocab_size is -5, expected a positive integer"),
    ("n_embd", 0, "n_embd is 0, expected a positive integer"),
    ("n_head", 3, "n_embd 32 is not divisible by n_head 3"),
    ("n_inner", 1.5, "n_inner is 1.5, expected a positive integer or null"),
    ("layer_norm_epsilon", "x", 'layer_norm_epsilon is "x", expected a number in (0, 1)'),
    ("tie_word_embeddings", "yes", 'tie_word_embeddings is "yes", expected true or false'),
]


def test_a_hugging_face_directory_with_nonsense_in_its_config_or_weights_is_refused_by_the_plan(world):
    """What `run --plan` says ok must start: the config's values and every tensor's shape are checked with the
    inputs, not when the loop loads the weights."""
    model = GPT(ModelConfig(**GPT2_LIKE))
    good = world / "gpt2"
    good.mkdir()
    config = hf_config(model.cfg.to_dict(), {"<eos>": 256}, "<eos>", "<eos>")
    (good / "config.json").write_text(json.dumps(config))
    tensors = state_to_hf(model.state_dict(), model.cfg.to_dict())
    save_file(tensors, str(good / "model.safetensors"))
    write_config(world / "sft.json", "sft", SHORT, model_cfg=GPT2_LIKE, init_from=str(good))
    assert run_cli("run", "--phase", "sft", "--config", "sft.json", "--plan", cwd=world).returncode == 0

    cases = {}
    for key, value, needle in HF_CASES:
        cases[json.dumps({**config, key: value})] = needle
    cases[DEEP] = "nested too deeply"
    cases['{"model_type": "gpt2", "model_type": "gpt2"}'] = 'key "model_type" appears twice'
    for text, needle in cases.items():
        (good / "config.json").write_text(text)
        r = run_cli("run", "--phase", "sft", "--config", "sft.json", "--plan", cwd=world)
        refused(r, needle)
    (good / "config.json").write_text(json.dumps(config))
    save_file({**tensors, "transformer.h.1.mlp.c_fc.weight": torch.zeros(32, 64)}, str(good / "model.safetensors"))
    for plan in (["--plan"], []):
        r = run_cli("run", "--phase", "sft", "--config", "sft.json", *plan, cwd=world)
        refused(r, "model_state blocks.1.mlp.up.weight is [64, 32], the model's is [128, 32]")
    assert not (world / "checkpoints" / "sft").exists() or not any((world / "checkpoints" / "sft").iterdir())


CONFIG_CASES = [
    ('{"train_cfg": {"seed": 1}, "train_cfg": {"seed": 2}}', 'key "train_cfg" appears twice'),
    (DEEP, "nested too deeply"),
    ('{"train_cfg": {"seed": -1}}', "train_cfg.seed: must be >= 0"),
    ('{"train_cfg": {"dropout": 0.1}}', "train_cfg.dropout: unknown key (it belongs in model_cfg: model_cfg.dropout)"),
    ('{"train_cfg": {"pack_val": true}}', "train_cfg.pack_val: packing is for SFT"),
    ('{"val_source": "nosuch"}', 'nosuch_val.bin: cache missing (named by val_source "nosuch")'),
    ('{"sources": {"wiki": 0.5, "nosuch": 0.5}}', "nosuch_train.bin: cache missing (named by sources.nosuch)"),
]


def test_a_run_config_with_nonsense_is_refused_by_the_plan_in_one_line(world):
    base = json.loads(write_config(world / "base.json", "pretrain", SHORT).read_text())
    for i, (text, needle) in enumerate(CONFIG_CASES):
        try:  # a valid change: merged into a working config, so the case is the only problem
            change = json.loads(text)
            doc = {
                **base,
                **{
                    k: ({**base[k], **v} if isinstance(base.get(k), dict) and k != "sources" else v)
                    for k, v in change.items()
                },
            }
            text = json.dumps(doc) if "appears twice" not in needle else text
        except (json.JSONDecodeError, RecursionError):
            pass
        (world / f"c{i}.json").write_text(text)
        refused(run_cli("run", "--phase", "pretrain", "--config", f"c{i}.json", "--plan", cwd=world), needle)
    r = run_cli("run", "--phase", "pretrain", "--config", "base.json", "--set", 'sources={"wiki":}', cwd=world)
    refused(r, '--set sources={"wiki":}: the value is not valid JSON (Expecting value at character 9)')


def test_a_jsonl_row_nested_too_deep_is_a_bad_row_not_a_traceback(tmp_path):
    """prepare reads rows with fsio.loads too: 200k brackets deep is one bad row, for a stream and an SFT source."""
    (tmp_path / "deep.jsonl").write_text('{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    for flag in ("--stream", "--sft"):
        r = run_cli("prepare", flag, "deep=deep.jsonl", cwd=tmp_path)
        refused(r, "deep.jsonl:1: not valid JSON (nested too deeply to be read)")
        assert not (tmp_path / "data" / "cache").exists() or not any((tmp_path / "data" / "cache").rglob("*.bin"))


def test_damaged_input_files_and_a_long_seed_are_one_line_each(tmp_path):
    """What prepare reads besides JSON rows: gzip that is not gzip or is cut short, Parquet holding bytes where text
    belongs or with damaged data pages behind a good footer, and a --seed too long to key the split hash."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = b"".join(
        json.dumps({"prompt": f"q {i}", "response": f"row {i} " * 20}).encode() + b"\n" for i in range(3000)
    )
    (tmp_path / "notgz.jsonl.gz").write_bytes(rows[:200])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(rows)[:-4000])
    pq.write_table(pa.table({"text": [b"abc"]}), tmp_path / "bytes.parquet")
    pq.write_table(
        pa.table({"text": [f"row {i} " * 20 for i in range(3000)]}), tmp_path / "pages.parquet", compression="none"
    )
    damaged = bytearray((tmp_path / "pages.parquet").read_bytes())
    for i in range(100, len(damaged) // 2, 7):  # the data pages scrambled; the footer intact
        damaged[i] = (damaged[i] * 31 + 7) % 256
    (tmp_path / "pages.parquet").write_bytes(bytes(damaged))
    (tmp_path / "a.txt").write_text("some text\n")
    for args, needle in (
        (["--stream", "x=notgz.jsonl.gz"], "notgz.jsonl.gz: not a readable gzip file (BadGzipFile: Not a gzipped file"),
        (["--sft", "x=cut.jsonl.gz"], "cut.jsonl.gz: not a readable gzip file (EOFError: Compressed file ended"),
        (["--stream", "x=bytes.parquet"], "bytes.parquet row 0: field 'text' holds bytes b'abc', expected a string"),
        (["--stream", "x=pages.parquet"], "pages.parquet: damaged Parquet data after row 0"),
        (["--stream", "x=a.txt", "--seed", "9" * 65], "--seed: at most 64 digits, got 65"),
    ):
        refused(run_cli("prepare", *args, cwd=tmp_path), needle)
    assert not (tmp_path / "data" / "cache").exists() or not any((tmp_path / "data" / "cache").rglob("*.bin"))


def test_ctrl_c_in_prepare_is_one_line_exit_130_and_the_old_caches_stay(tmp_path):
    (tmp_path / "old.txt").write_text("the old text\n")
    (tmp_path / "new.txt").write_text("a new text\n" * 1000)
    assert run_cli("prepare", "--stream", "x=old.txt", cwd=tmp_path).returncode == 0
    streams = tmp_path / "data" / "cache" / "streams"
    before = {p.name: p.read_bytes() for p in streams.iterdir()}
    r = run_cli("prepare", "--stream", "x=new.txt", cwd=tmp_path, env={"TRAINER_FAULT": "prepare_batch:1:SIGINT"})
    assert r.returncode == 130, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("stopped: interrupted (Ctrl-C)")
    assert {p.name: p.read_bytes() for p in streams.iterdir()} == before  # nothing half-written left beside them
