"""Loss weighting and resume, checked against the thing they must equal: one big batch, one unbroken run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_config

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def weights(world, sub, phase="sft"):
    return load_file(str(world / sub / "checkpoints" / phase / "latest" / "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(world, sub):
    from trainer_accel.metrics import read_events

    return [(e["step"], e.get("train/loss"), e.get("val/loss")) for e in read_events(world / sub / "metrics/events.jsonl")
            if e["event"] in ("train", "eval")]


def grad_norms(world, sub):
    from trainer_accel.metrics import read_events

    return [e["train/grad_norm"] for e in read_events(world / sub / "metrics/events.jsonl") if e["event"] == "train"]


def launch(world, config_file, *run_args, env):
    """`accelerate launch --config_file launch/<config_file> -m trainer_accel.run ...`, as the README shows."""
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / config_file),
                           "-m", "trainer_accel.run", *run_args], cwd=world, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def run_split(world, sub, B, accum, launcher=None, extra=None):
    cfg = write_config(world / f"{sub}.json", "sft", {"total_steps": 4, "B": B, "accum_steps": accum, "eval_every": 2,
                                                      "ckpt_every": 2, **(extra or {})})
    env = {"TRAINER_ARTIFACTS_DIR": str(world / sub)}
    if launcher is None:
        r = run_cli("run", "--phase", "sft", "--config", str(cfg), cwd=world, env=env)
    else:
        r = launch(world, launcher, "--phase", "sft", "--config", str(cfg), "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_accumulation_equals_one_big_batch(world):
    """SFT micro-batches count different numbers of answer tokens: only token weighting makes these equal."""
    run_split(world, "big", B=8, accum=1)
    run_split(world, "acc", B=2, accum=4)
    assert max_diff(weights(world, "big"), weights(world, "acc")) < 1e-6
    # Adam hides a uniform scale error in the gradient; the (pre-clip) gradient norm does not
    assert grad_norms(world, "big") == pytest.approx(grad_norms(world, "acc"), rel=1e-5)
    # train losses only: the validation batches hold B rows, so B=8 and B=2 validate on different rows
    for (s1, l1, _), (s2, l2, _) in zip(losses(world, "big"), losses(world, "acc"), strict=True):
        assert s1 == s2 and (l1 is None or abs(l1 - l2) < 1e-5)
