"""A tiny world per test: demo caches in a temp dir, a 2-layer model, and helpers to run the CLIs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

# The suite means the CPU, also on a machine with a GPU: commands without --device would otherwise train on CUDA
# there (TF32, non-deterministic kernels) and the exact-equality checks could fail. Set before torch sees a GPU;
# every command a test starts inherits it.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest

TINY_MODEL = {"V": 260, "T": 32, "C": 32, "L": 2, "H": 2, "d_ff": 64}
TINY_TRAIN = {"seed": 7, "total_steps": 8, "B": 4, "base_lr": 3e-3, "warmup_steps": 2, "min_lr": 3e-4,
              "eval_every": 4, "eval_batches": 2, "ckpt_every": 4, "log_every": 2}


TRAINER_ENV = ("TRAINER_DATA_DIR", "TRAINER_ARTIFACTS_DIR", "TRAINER_CHECKPOINTS_DIR", "TRAINER_SAMPLES_DIR",
               "TRAINER_METRICS_DIR", "TRAINER_EVENTS_PATH", "TRAINER_RUNS_DIR")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """`prepare --demo` once per test process; each world gets its own copy (its files record relative paths)."""
    from trainer_accel import prepare

    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for var in TRAINER_ENV:
            mp.delenv(var, raising=False)
        assert prepare.main(["--demo"]) == 0
    return root / "data"


@pytest.fixture
def world(tmp_path, monkeypatch, demo_data):
    """A working directory with demo caches; the trainer's env points inside it."""
    monkeypatch.chdir(tmp_path)
    for var in TRAINER_ENV:
        monkeypatch.delenv(var, raising=False)
    shutil.copytree(demo_data, tmp_path / "data")
    return tmp_path


def write_config(path: Path, phase: str, train: dict | None = None, **top) -> Path:
    cfg = {"model_cfg": dict(TINY_MODEL), "train_cfg": {**TINY_TRAIN, **(train or {})},
           "tracking": {"log_with": []}}  # trackers cost seconds per run; test_trackers.py turns them on
    if phase == "sft":
        cfg["sft_sources"] = {"dolly": 0.5, "oasst1": 0.4, "primer": 0.1}
        cfg["init_from"] = None
    cfg.update(top)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def run_cli(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m trainer_accel.<module> ...` as a user would, in `cwd`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"trainer_accel.{module}", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def events(world: Path, kind: str | None = None) -> list[dict]:
    from trainer_accel.metrics import read_events

    recs = read_events(world / "metrics" / "events.jsonl")
    return [r for r in recs if kind is None or r["event"] == kind]


def free_port() -> int:
    """A port for a multi-process launch: launches in parallel test workers must not share the config's port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
