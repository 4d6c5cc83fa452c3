"""Small things a careless user runs into: several bad --set at once, a phase prefix outside a pipeline, a --set
that breaks a sum, output piped into `head`, a byte-order mark, file modes, resuming past total_steps."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from conftest import run_cli, write_config


def test_bad_sets_are_all_named_and_blamed(world):
    cfg = write_config(world / "pre.json", "pretrain")
    r = run_cli(
        "run",
        "--phase",
        "pretrain",
        "--config",
        str(cfg),
        "--set",
        "train_cfg.bse_lr=1",
        "--set",
        "trian_cfg.B=2",
        "--set",
        "pretrain.train_cfg.B=2",
        cwd=world,
    )
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 3, r.stderr
    assert "train_cfg.bse_lr=1: " in errors[0] and "did you mean 'base_lr'" in errors[0]
    assert "trian_cfg.B=2: " in errors[1] and "did you mean 'train_cfg'" in errors[1]
    assert (
        "a phase prefix (pretrain.) is for --phase pipeline; in a run of one phase write train_cfg.B=..." in errors[2]
    )
    mixed = write_config(world / "mixed.json", "pretrain", sources={"wiki": 0.784, "roam": 0.196, "primer": 0.02})
    r = run_cli("run", "--phase", "pretrain", "--config", str(mixed), "--set", "sources.wiki=1", cwd=world)
    assert r.returncode == 2 and "probabilities must sum to 1" in r.stderr and "(from --set sources.wiki=1)" in r.stderr


def test_output_into_a_closed_pipe_ends_quietly(world):
    cfg = write_config(world / "pre.json", "pretrain")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer_accel.run", "--phase", "pretrain", "--config", str(cfg), "--plan"],
        cwd=world,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # as `| head -1` does once it has its line: the plan is written into a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_bom_a_file_mode_and_a_resume_past_the_end(world):
    from trainer_accel import prepare

    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(20)]
    (world / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert prepare.main(["--sft", "dolly=bom.jsonl"]) == 0  # a byte-order mark was "not valid JSON" at line 1

    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 4})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    latest = world / "checkpoints/pretrain/latest"
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in latest.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes  # model.safetensors was 0600

    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--set", "train_cfg.total_steps=2", cwd=world)
    assert r.returncode == 0 and "resumed at step 4, past train_cfg.total_steps=2: nothing to train" in r.stderr
