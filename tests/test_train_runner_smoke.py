"""Smoke tests of the runner: pretrain, resume, and the SFT loss on a hand-made batch."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, events, run_cli, write_config

from trainer_accel.config import ModelConfig
from trainer_accel.data.cache import answer_mask
from trainer_accel.data.chat_template import AnswerRule
from trainer_accel.data.tokenizer import ASST, EOT, USER, ByteTokenizer
from trainer_accel.models.gpt import GPT
from trainer_accel.training.batches import Batch
from trainer_accel.training.losses import token_cross_entropy


def test_pretrain_smoke(world):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 6, "ckpt_every": 3})
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--device", "cpu", cwd=world)
    assert r.returncode == 0, r.stderr
    losses = [e["train/loss"] for e in events(world, "train")]
    assert [e["step"] for e in events(world, "train")] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(x) for x in losses)
    ck = world / "checkpoints" / "pretrain"
    for d in ("latest", "step_0000006", "step_0000003", "best"):
        assert sorted(p.name for p in (ck / d).iterdir()) == ["meta.json", "model.safetensors", "optimizer.pt"], d
    assert (world / "checkpoints" / "best.pt").is_file()


def test_resume_smoke(world):
    cfg5 = write_config(world / "pre5.json", "pretrain", {"total_steps": 5, "ckpt_every": 5, "eval_every": 5})
    cfg10 = write_config(world / "pre10.json", "pretrain", {"total_steps": 10, "ckpt_every": 5, "eval_every": 5})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg5), cwd=world).returncode == 0
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg10), cwd=world)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at step 5" in r.stderr
    steps = [e["step"] for e in events(world, "train")]
    assert steps == list(range(1, 11))
    from trainer_accel.checkpoints.layout import read_meta

    meta = read_meta(world / "checkpoints" / "pretrain" / "latest")
    assert meta["step"] == 10
    starts = events(world, "run_start")
    assert [s["step"] for s in starts] == [0, 5] and starts[0]["run_id"] == starts[1]["run_id"]


def test_sft_masking_loss_equals_manual_computation():
    tok = ByteTokenizer()
    s = tok.special
    seq = [s[USER], *tok.encode("hi?"), s[ASST], *tok.encode("yo"), s[EOT], 256, 256]
    rows = np.array([seq])
    mask = answer_mask(rows, AnswerRule((s[ASST],), s[EOT]))[0]
    # targets are seq[1:]; counted: "y", "o", <eot> (the three tokens after <asst>, <eot> included)
    targets = rows[0, 1:]
    assert [int(t) for t in targets[mask]] == [*tok.encode("yo"), s[EOT]]

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_MODEL))
    x = torch.tensor(rows[:, :-1])
    y = torch.tensor(rows[:, 1:])
    y_masked = y.clone()
    y_masked[0, ~torch.from_numpy(mask)] = -100
    total, count, _ = token_cross_entropy(model, Batch(x, y, y_masked))

    logits = model(x)[0]
    manual = sum(F.cross_entropy(logits[i : i + 1], y[0, i : i + 1]) for i in np.flatnonzero(mask))
    assert int(count) == 3
    assert torch.allclose(total, manual, atol=1e-5)
    assert torch.allclose(total / count, manual / 3, atol=1e-6)


def test_resume_from_an_exported_pt(world):
    cfg4 = write_config(world / "pre4.json", "pretrain", {"total_steps": 4, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg4), cwd=world).returncode == 0
    import torch

    exported = torch.load(world / "checkpoints/best.pt", weights_only=True)
    cfg6 = write_config(world / "pre6.json", "pretrain", {"total_steps": 6, "eval_every": 2, "ckpt_every": 2})
    r = run_cli(
        "run",
        "--phase",
        "pretrain",
        "--config",
        str(cfg6),
        "--resume",
        "checkpoints/best.pt",
        "--device",
        "cpu",
        cwd=world,
        env={"TRAINER_ARTIFACTS_DIR": "fromfile"},
    )
    assert r.returncode == 0, r.stderr
    assert f"resumed from checkpoints/best.pt at step {exported['step']}" in r.stderr
    steps = [e["step"] for e in events(world / "fromfile", "train")]
    assert steps == list(range(exported["step"] + 1, 7))
