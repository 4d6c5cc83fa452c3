"""Checkpoints and caches an older trainer wrote keep working; ones a newer trainer wrote are refused by name.

tests/fixtures/v1/ holds a pretrain and an SFT checkpoint of format version 1 and their caches, written by the
trainer of commit bc51410 and never regenerated (its README says how they were made).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TRAINER_ENV, run_cli

from trainer_accel.checkpoints import layout
from trainer_accel.config import ModelConfig
from trainer_accel.data.cache import CACHE_VERSION
from trainer_accel.models.gpt import GPT

FIXTURE = Path(__file__).parent / "fixtures" / "v1"
PRE, SFT = Path("checkpoints/pretrain/step_0000004"), Path("checkpoints/sft/step_0000004")


@pytest.fixture
def v1_world(tmp_path, monkeypatch):
    """A working directory holding the version-1 files as a user's would (copies: the fixtures stay as made)."""
    monkeypatch.chdir(tmp_path)
    for var in TRAINER_ENV:
        monkeypatch.delenv(var, raising=False)
    shutil.copytree(FIXTURE / "cache", tmp_path / "data" / "cache")
    for phase in ("pretrain", "sft"):
        shutil.copytree(FIXTURE / f"{phase}_step_0000004", tmp_path / "checkpoints" / phase / "step_0000004")
        shutil.copy(FIXTURE / f"{phase}.json", tmp_path)
    return tmp_path


def test_the_fixtures_are_version_1():
    for phase in ("pretrain", "sft"):
        assert json.loads((FIXTURE / f"{phase}_step_0000004" / "meta.json").read_text())["format_version"] == 1
    for meta in (FIXTURE / "cache").rglob("*.meta.json"):
        assert json.loads(meta.read_text())["version"] == 1


def test_a_version_1_checkpoint_resumes_and_its_files_stay_as_they_were(v1_world):
    before = {p.name: p.read_bytes() for p in (v1_world / PRE).iterdir()}
    done = run_cli(
        "run", "--phase", "pretrain", "--config", "pretrain.json", "--set", "train_cfg.total_steps=6", cwd=v1_world
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"{PRE}: checkpoint format version 1, upgraded to version {layout.FORMAT_VERSION} as it was read (the file "
        "is unchanged)"
    ) in done.stderr
    # one notice per file, however often it is read: the checkpoint, and the run's two caches (train and val)
    assert done.stderr.count("checkpoint format version 1, upgraded to version") == 1
    assert done.stderr.count(f"cache format version 1, upgraded to version {CACHE_VERSION}") == 2
    assert "pretrain: steps 4 -> 6" in done.stderr
    assert {p.name: p.read_bytes() for p in (v1_world / PRE).iterdir()} == before
    new = json.loads((v1_world / "checkpoints" / "pretrain" / "step_0000006" / "meta.json").read_text())
    assert new["format_version"] == layout.FORMAT_VERSION and new["step"] == 6
    assert new["model_cfg"]["activation"] == "gelu" and new["tokenizer_path"] is None


def test_a_version_1_checkpoint_exports_and_evaluates(v1_world):
    done = run_cli("runs", "evaluate", str(SFT), "--baseline", str(PRE), cwd=v1_world)
    assert done.returncode == 0 and "verdict: pass" in done.stdout, done.stdout + done.stderr  # as when it was made
    assert run_cli("export", "--checkpoint", str(SFT), "--out", "v1.pt", cwd=v1_world).returncode == 0
    blob = torch.load(v1_world / "v1.pt", weights_only=True)
    assert blob["step"] == 4 and blob["model_cfg"]["activation"] == "gelu"
    done = run_cli("export", "--format", "hf", "--checkpoint", str(SFT), "--out", "hf", cwd=v1_world)
    assert done.returncode == 0, done.stderr

    ours = GPT(ModelConfig(**blob["model_cfg"]))
    ours.load_state_dict(blob["model_state"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(v1_world / "hf").eval()
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.eval()(ids) - hf(ids).logits).abs().max().item() < 1e-5


def test_a_newer_checkpoint_or_cache_is_refused_naming_both_versions(v1_world):
    meta_file = v1_world / PRE / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    for args in (
        ("run", "--phase", "pretrain", "--config", "pretrain.json", "--set", "train_cfg.total_steps=6"),
        ("export", "--checkpoint", str(PRE), "--out", "x.pt"),
        ("export", "--format", "hf", "--checkpoint", str(PRE), "--out", "hf"),
    ):
        done = run_cli(*args, cwd=v1_world)
        assert done.returncode == 2, (args, done.stderr)
        assert (
            f"error: {PRE}: checkpoint format version 99 was written by a newer trainer_accel; this one reads "
            f"versions up to {layout.FORMAT_VERSION} (upgrade trainer_accel to use it)"
        ) in done.stderr, done.stderr
    assert (v1_world / PRE / "model.safetensors").is_file()  # refused, not set aside as broken
    assert not (v1_world / "checkpoints" / "pretrain" / "rejected").exists()

    meta_file.write_text(json.dumps(meta))
    cache_meta = v1_world / "data" / "cache" / "streams" / "notes_val.bin.meta.json"
    cache_meta.write_text(json.dumps({**json.loads(cache_meta.read_text()), "version": CACHE_VERSION + 1}))
    done = run_cli(
        "run", "--phase", "pretrain", "--config", "pretrain.json", "--set", "train_cfg.total_steps=6", cwd=v1_world
    )
    assert done.returncode == 2
    assert (
        f"error: {cache_meta.relative_to(v1_world)}: cache format version {CACHE_VERSION + 1} was written by a newer "
        f"trainer_accel; this one reads versions up to {CACHE_VERSION}"
    ) in done.stderr
