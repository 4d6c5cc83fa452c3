"""Loss weighting and resume, checked against the thing they must equal: one big batch, one unbroken run."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, free_port, run_cli, write_config
from safetensors.torch import load_file

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def weights(world, sub, phase="sft"):
    return load_file(str(world / sub / "checkpoints" / phase / "latest" / "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(world, sub):
    from trainer_accel.observability.metrics import read_events

    return [
        (e["step"], e.get("train/loss"), e.get("val/loss"))
        for e in read_events(world / sub / "metrics/events.jsonl")
        if e["event"] in ("train", "eval")
    ]


def grad_norms(world, sub):
    from trainer_accel.observability.metrics import read_events

    return [e["train/grad_norm"] for e in read_events(world / sub / "metrics/events.jsonl") if e["event"] == "train"]


def launch(world, config_file, *run_args, env):
    """`accelerate launch --config_file launch/<config_file> -m trainer_accel.run ...`, as the README shows."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(LAUNCH / config_file),
            "--main_process_port",
            str(free_port()),
            "-m",
            "trainer_accel.run",
            *run_args,
        ],
        cwd=world,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_split(world, sub, B, accum, launcher=None, extra=None):
    top = (
        {"replay": {"wiki": 0.2, "primer": 0.1}, "model_cfg": {**TINY_MODEL, "T": 64}}
        if (extra or {}).get("pack")
        else {}
    )
    cfg = write_config(
        world / f"{sub}.json",
        "sft",
        {"total_steps": 4, "B": B, "accum_steps": accum, "eval_every": 2, "ckpt_every": 2, **(extra or {})},
        **top,
    )
    env = {"TRAINER_ARTIFACTS_DIR": str(world / sub)}
    if launcher is None:
        r = run_cli("run", "--phase", "sft", "--config", str(cfg), cwd=world, env=env)
    else:
        r = launch(world, launcher, "--phase", "sft", "--config", str(cfg), "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


REPLAY_PACKED = {"pack": True}


def test_accumulation_equals_one_big_batch(world):
    """SFT micro-batches count different numbers of answer tokens: only token weighting makes these equal. With
    packed rows and replayed stream rows (whose every target counts) mixed in."""
    run_split(world, "big", B=8, accum=1, extra=REPLAY_PACKED)
    run_split(world, "acc", B=2, accum=4, extra=REPLAY_PACKED)
    assert max_diff(weights(world, "big"), weights(world, "acc")) < 1e-6
    # Adam hides a uniform scale error in the gradient; the (pre-clip) gradient norm does not
    assert grad_norms(world, "big") == pytest.approx(grad_norms(world, "acc"), rel=1e-5)
    # train losses only: the validation batches hold B rows, so B=8 and B=2 validate on different rows
    for (s1, l1, _), (s2, l2, _) in zip(losses(world, "big"), losses(world, "acc"), strict=True):
        assert s1 == s2 and (l1 is None or abs(l1 - l2) < 1e-5)


@pytest.mark.parametrize("phase", ["pretrain", "sft"])
def test_resumed_run_is_bit_identical_to_an_unbroken_one(world, phase):
    train = {"total_steps": 8, "ckpt_every": 3, "eval_every": 3, "accum_steps": 2, "B": 2}
    model = {"model_cfg": {"V": 260, "T": 32, "C": 32, "L": 2, "H": 2, "d_ff": 64, "dropout": 0.1}}
    full = write_config(world / "full.json", phase, train, **model)
    r = run_cli(
        "run", "--phase", phase, "--config", str(full), cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "full")}
    )
    assert r.returncode == 0, r.stderr
    # the same run, stopped after its step-6 checkpoint: a shorter total would change the LR schedule, so
    # stop it by removing what came after step 6 instead, as a crash would have left it
    shutil.copytree(world / "full", world / "cut")
    ck = world / "cut/checkpoints" / phase
    for d in ("latest", "best", "step_0000008"):
        shutil.rmtree(ck / d, ignore_errors=True)
    (world / "cut/checkpoints/best.pt").unlink()
    (world / "cut/metrics/events.jsonl").unlink()
    r = run_cli(
        "run", "--phase", phase, "--config", str(full), cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "cut")}
    )
    assert r.returncode == 0, r.stderr
    assert "at step 6" in r.stderr
    a, b = weights(world, "full", phase), weights(world, "cut", phase)
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_losses = {s: loss for s, loss, _ in losses(world, "full") if loss is not None}
    resumed = [(s, loss) for s, loss, _ in losses(world, "cut") if loss is not None]
    assert [s for s, _ in resumed] == [7, 8] and all(full_losses[s] == loss for s, loss in resumed)


def test_micro_batches_without_answer_tokens_count_nothing_and_never_nan(world):
    """With T=8, only the short examples keep an answer inside the window: a micro-batch of long ones has every
    label -100 and must add nothing (no nan). A cache where every answer is cut is refused at start (test_errors)."""
    from trainer_accel import prepare

    rows = [{"prompt": "a", "response": f"{i}"} for i in range(30)] + [  # distinct: equal rows share a split side
        {"prompt": f"a long question number {i}?", "response": "x"} for i in range(30)
    ]
    (world / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prepare.main(["--sft", "dolly=mixed.jsonl"]) == 0
    cfg = write_config(
        world / "sft.json",
        "sft",
        {"total_steps": 8, "B": 2, "eval_every": 4, "ckpt_every": 4},
        model_cfg={"V": 260, "T": 8, "C": 32, "L": 2, "H": 2, "d_ff": 64},
        sft_sources={"dolly": 1.0},
    )
    r = run_cli("run", "--phase", "sft", "--config", str(cfg), cwd=world)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\d+ micro-batches up to step \d+ had no counted tokens", r.stderr), r.stderr
    from conftest import events

    losses = [e["train/loss"] for e in events(world, "train")]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and any(x > 0 for x in losses)


def test_skip_mode_skips_non_finite_updates_then_stops(world):
    cfg = write_config(
        world / "pre.json",
        "pretrain",
        {
            "base_lr": 1e12,
            "min_lr": 1e11,
            "grad_clip": 0.0,
            "on_nonfinite": "skip",
            "max_nonfinite_skips": 3,
            "total_steps": 8,
            "ckpt_every": 1,
        },
    )
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert r.returncode == 1 and "3 non-finite updates in a row" in r.stderr and "Traceback" not in r.stderr
    from conftest import events

    skipped = [e["step"] for e in events(world, "skipped")]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    for d in (world / "checkpoints/pretrain").glob("step_*"):  # skipped updates never reach the weights
        assert all(torch.isfinite(t).all() for t in load_file(str(d / "model.safetensors")).values())


def test_resume_on_changed_data_is_refused_unless_allowed(world):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    from trainer_accel import prepare

    (world / "more.txt").write_text("\n\n".join(f"Paragraph {i} of some other text entirely." for i in range(20)))
    assert prepare.main(["--stream", "roam=more.txt"]) == 0
    longer = write_config(world / "pre4.json", "pretrain", {"total_steps": 4, "eval_every": 2, "ckpt_every": 2})
    r = run_cli("run", "--phase", "pretrain", "--config", str(longer), cwd=world)
    assert (
        r.returncode == 2
        and "the caches differ from those this checkpoint was trained on (streams/roam_train.bin:" in r.stderr
    )
    allowed = write_config(
        world / "pre4a.json",
        "pretrain",
        {"total_steps": 4, "eval_every": 2, "ckpt_every": 2, "allow_data_change": True},
    )
    r = run_cli("run", "--phase", "pretrain", "--config", str(allowed), cwd=world)
    assert r.returncode == 0 and "RESUMING ON CHANGED DATA" in r.stderr


def test_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    from collections import namedtuple

    from trainer_accel.checkpoints import writing
    from trainer_accel.errors import UserError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writing.shutil, "disk_usage", lambda p: usage(100 << 20, 60 << 20, 40 << 20))
    with pytest.raises(UserError, match=r"MiB free, a checkpoint needs about .* nothing was written"):
        writing.ensure_free_space(tmp_path / "checkpoints" / "pretrain", 50 << 20)
    writing.ensure_free_space(tmp_path, 1 << 20)  # room enough: no error
    assert list(tmp_path.iterdir()) == []


def test_first_gradient_equals_a_hand_computed_big_batch(world):
    """Step 1 of an accumulated run against the mean cross-entropy over all counted tokens of its global batch:
    packed SFT rows (answers) and replayed stream rows (every token), as one batch."""
    import torch.nn.functional as F

    from trainer_accel.models.gpt import GPT
    from trainer_accel.paths import resolve_paths
    from trainer_accel.phases.registry import load_config
    from trainer_accel.training.inputs import check_phase_inputs

    run_split(world, "acc", B=2, accum=4, extra={"grad_clip": 0.0, **REPLAY_PACKED})
    cfg = load_config(world / "acc.json", "sft")
    strategy = check_phase_inputs(cfg, resolve_paths()).batches
    strategy.B = 8
    batch = strategy.train_batch(0, 0, 0, 1, 1)  # the whole global batch of step 0, as one batch
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    assert batch.segments is not None and batch.segments.max() > 0  # rows hold several examples
    assert {strategy.train.kinds[i] for i in batch.row_source.tolist()} == {"stream", "sft"}  # replayed rows too
    logits = model(batch.x, batch.segments)
    loss = F.cross_entropy(
        logits.flatten(0, 1), batch.y_masked.flatten(), ignore_index=-100
    )  # mean over counted tokens
    loss.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    assert grad_norms(world, "acc")[0] == pytest.approx(norm, rel=1e-5)
    assert losses(world, "acc")[1][1] == pytest.approx(loss.item(), rel=1e-6)  # [0] is the step-0 eval
