"""Kill the trainer inside every step of a save, start it again, and get the model of an unbroken run."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import run_cli, write_config
from safetensors.torch import load_file

from trainer_accel.checkpoints import layout, writing
from trainer_accel.faults import POINTS

TRAIN = {"total_steps": 6, "ckpt_every": 2, "eval_every": 2, "keep_last_n": 2, "warmup_steps": 2}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: its final weights are what every interrupted run must end with."""
    root = tmp_path_factory.mktemp("reference")

    env = {"TRAINER_DATA_DIR": str(root / "data"), "TRAINER_ARTIFACTS_DIR": str(root)}
    r = run_cli("prepare", "--demo", cwd=root, env=env)
    assert r.returncode == 0, r.stderr
    cfg = write_config(root / "pre.json", "pretrain", TRAIN)
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=root, env=env)
    assert r.returncode == 0, r.stderr
    return load_file(str(root / "checkpoints/pretrain/latest/model.safetensors")), torch.load(
        root / "checkpoints/best.pt", weights_only=True
    )["step"]


def leftovers(root):
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".trash-")) or ".pt.tmp-" in p.name]


def assert_no_visible_partial_checkpoint(world, point):
    ck = world / "checkpoints" / "pretrain"
    for d in ck.iterdir() if ck.exists() else []:
        if not d.name.startswith(".") and d.name != "rejected":
            try:
                layout.read_meta(d)
            except layout.InvalidCheckpoint as e:
                raise AssertionError(f"{d} is visible but broken after a kill at {point}: {e}")
    if (world / "checkpoints/best.pt").exists():
        torch.load(world / "checkpoints/best.pt", weights_only=True)


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_every_save_point(world, reference, point):
    """Killed at POINT in the first save that reaches it; restarted with the same fault, killed at POINT again in
    a later save (the restarted process's first is the run's later one); then restarted to the end."""
    ref_weights, ref_best_step = reference
    cfg = write_config(world / "pre.json", "pretrain", TRAIN)
    cmd = ("run", "--phase", "pretrain", "--config", str(cfg))
    first = run_cli(*cmd, cwd=world, env={"TRAINER_FAULT": point})
    assert first.returncode == -9, (point, first.returncode, first.stderr[-2000:])
    assert_no_visible_partial_checkpoint(world, point)
    later = run_cli(*cmd, cwd=world, env={"TRAINER_FAULT": point})
    assert later.returncode in (-9, 0), later.stderr[-2000:]  # 0: the point was not reached again (best did not move)
    assert_no_visible_partial_checkpoint(world, point)

    again = run_cli(*cmd, cwd=world)
    assert again.returncode == 0, again.stderr[-2000:]
    ck = world / "checkpoints" / "pretrain"
    final = load_file(str(ck / "latest" / "model.safetensors"))
    assert all(torch.equal(final[k], ref_weights[k]) for k in ref_weights)
    assert torch.load(world / "checkpoints/best.pt", weights_only=True)["step"] == ref_best_step
    assert leftovers(world) == []
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_0000004", "step_0000006"]
    for d in ("latest", "best", "step_0000004", "step_0000006"):
        layout.read_meta(ck / d)


def test_broken_latest_is_set_aside_and_the_older_one_resumed(world):
    cfg = write_config(world / "pre.json", "pretrain", {**TRAIN, "total_steps": 4})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    ck = world / "checkpoints" / "pretrain"
    for d in ("latest", "step_0000004"):  # one flipped byte inside the tensor data
        f = ck / d / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-7] ^= 0x01
        f.unlink()  # latest and the step dir share the file (hard link): give each its own damaged copy
        f.write_bytes(bytes(data))
    more = write_config(world / "pre6.json", "pretrain", TRAIN)
    r = run_cli("run", "--phase", "pretrain", "--config", str(more), cwd=world)
    assert r.returncode == 0, r.stderr
    assert "does not match its sha256" in r.stderr and "at step 2" in r.stderr
    rejected = sorted(p.name for p in (ck / "rejected").iterdir())
    assert len([n for n in rejected if n.endswith(".reason.txt")]) == 2
    assert any(n.startswith("latest-") for n in rejected) and any(n.startswith("step_0000004-") for n in rejected)

    # an explicit --resume of a broken checkpoint is an error, not a skip
    bad = ck / "step_0000006" / "optimizer.pt"
    bad.write_bytes(bad.read_bytes()[:-10])
    r = run_cli("run", "--phase", "pretrain", "--config", str(more), "--resume", str(ck / "step_0000006"), cwd=world)
    assert r.returncode == 2 and "invalid checkpoint: optimizer.pt is" in r.stderr


def test_stale_latest_and_best_are_brought_up_to_date(world):
    """Killed after the last step directory was complete but before latest/ and best/ moved."""
    cfg = write_config(world / "pre.json", "pretrain", {**TRAIN, "total_steps": 4})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    ck = world / "checkpoints" / "pretrain"
    best_step = layout.read_meta(ck / "step_0000004")["best_val_step"]
    for name in ("latest", "best"):
        shutil.rmtree(ck / name)
        writing.link_pointer(ck / "step_0000002", ck / name)  # what they held before the last save
    (world / "checkpoints/best.pt").unlink()
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert r.returncode == 0, r.stderr
    assert "latest/ was behind (an interrupted save); now step 4" in r.stderr
    assert layout.read_meta(ck / "latest")["step"] == 4 and layout.read_meta(ck / "best")["step"] == best_step
    assert torch.load(world / "checkpoints/best.pt", weights_only=True)["step"] == best_step


def test_a_damaged_latest_is_reported_as_damage_not_as_an_interrupted_save(world):
    """latest/ shares its files with step_N/ by hard link: one flipped byte damages both, which must be said."""
    cfg = write_config(world / "pre.json", "pretrain", {**TRAIN, "total_steps": 4})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    ck = world / "checkpoints" / "pretrain"
    model = ck / "latest" / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[-1] ^= 0xFF
    model.write_bytes(bytes(raw))
    assert layout.read_meta(ck / "step_0000004", verify=False) and (ck / "step_0000004/model.safetensors").samefile(
        model
    )
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert r.returncode == 0, r.stderr
    broken = [line for line in r.stderr.splitlines() if " is broken (" in line]
    assert {line.split("checkpoint ")[1].split(" is broken")[0] for line in broken} == {
        "checkpoints/pretrain/latest",
        "checkpoints/pretrain/step_0000004",
    }, r.stderr
    assert all(
        "does not match its sha256" in line and "a damaged file, not an interrupted save" in line for line in broken
    )
    assert "best/ was DAMAGED (model.safetensors does not match its sha256" in r.stderr  # best was step 4 too
    assert layout.read_meta(ck / "latest")["step"] == 4  # trained again from step 2
