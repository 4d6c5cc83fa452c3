"""Interrupted and resumed equals never interrupted: a pipeline, two gloo processes, another process count."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli, write_config
from safetensors.torch import load_file
from test_numerics import launch

TRAIN = {"total_steps": 6, "ckpt_every": 2, "eval_every": 2, "B": 2, "accum_steps": 2, "warmup_steps": 2}
DROPOUT_MODEL = {"model_cfg": {"V": 260, "T": 32, "C": 32, "L": 2, "H": 2, "d_ff": 64, "dropout": 0.1}}
# a Llama-style model: rotary positions (restarting in each packed example), RMSNorm, SwiGLU, grouped-query attention
LLAMA_MODEL = {
    "model_cfg": {
        "V": 260,
        "T": 32,
        "C": 32,
        "L": 2,
        "H": 4,
        "n_kv_heads": 2,
        "d_ff": 48,
        "dropout": 0.1,
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "gated",
        "activation": "silu",
        "tie_embeddings": False,
    }
}
MODELS = pytest.mark.parametrize("model", [DROPOUT_MODEL, LLAMA_MODEL], ids=["gpt2-style", "llama-style"])


def final(world, sub, phase):
    return load_file(str(world / sub / "checkpoints" / phase / "latest" / "model.safetensors"))


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@MODELS
def test_pipeline_killed_during_sft_resumes_exactly(world, model):
    write_config(world / "c/pretrain.json", "pretrain", TRAIN, **model)
    write_config(
        world / "c/sft.json",
        "sft",
        {**TRAIN, "pack": True},
        init_from="checkpoints/pretrain/best",
        replay={"wiki": 0.3},
        **model,
    )  # packed rows and replay resume exactly too
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    args = ("run", "--phase", "pipeline", "--config", "c/pipeline.json")
    assert run_cli(*args, cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "ref")}).returncode == 0
    # pretrain writes 3 checkpoints; the 5th completed sidecar is SFT's step 4: killed right after it
    env = {"TRAINER_ARTIFACTS_DIR": str(world / "cut")}
    killed = run_cli(*args, cwd=world, env={**env, "TRAINER_FAULT": "after_meta:5"})
    assert killed.returncode == -9
    again = run_cli(*args, cwd=world, env=env)
    assert again.returncode == 0, again.stderr
    assert "pretrain already finished" in again.stderr and "at step 2" in again.stderr
    assert equal(final(world, "cut", "sft"), final(world, "ref", "sft"))
    ref_pt = torch.load(world / "ref/checkpoints/best.pt", weights_only=True)
    cut_pt = torch.load(world / "cut/checkpoints/best.pt", weights_only=True)
    assert ref_pt["step"] == cut_pt["step"] and ref_pt["best_val_loss"] == cut_pt["best_val_loss"]
    assert all(torch.equal(ref_pt["model_state"][k], cut_pt["model_state"][k]) for k in ref_pt["model_state"])


@MODELS
def test_two_processes_resume_exactly_and_on_another_process_count(world, model):
    cfg = write_config(world / "pre.json", "pretrain", TRAIN, **model)
    run2 = ("--phase", "pretrain", "--config", str(cfg), "--device", "cpu")
    r = launch(world, "cpu_2proc.yaml", *run2, env={"TRAINER_ARTIFACTS_DIR": str(world / "ref")})
    assert r.returncode == 0, r.stderr[-2000:]

    def cut_copy(name):  # the run as a crash after its step-4 checkpoint would leave it
        shutil.copytree(world / "ref", world / name)
        ck = world / name / "checkpoints/pretrain"
        for d in ("latest", "best", "step_0000006"):
            shutil.rmtree(ck / d, ignore_errors=True)

    cut_copy("two")
    r = launch(world, "cpu_2proc.yaml", *run2, env={"TRAINER_ARTIFACTS_DIR": str(world / "two")})
    assert r.returncode == 0 and "at step 4" in r.stderr, r.stderr[-2000:]
    assert equal(final(world, "two", "pretrain"), final(world, "ref", "pretrain"))

    # one process, same global batch (B x accum x processes = 2 x 4 x 1): the same training, up to float rounding
    cut_copy("one")
    one = write_config(world / "one.json", "pretrain", {**TRAIN, "accum_steps": 4}, **model)
    r = run_cli(
        "run", "--phase", "pretrain", "--config", str(one), cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "one")}
    )
    assert r.returncode == 0 and "at step 4" in r.stderr, r.stderr
    a, b = final(world, "one", "pretrain"), final(world, "ref", "pretrain")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # one process with a different global batch: refused, saying what differs
    cut_copy("other")
    r = run_cli(
        "run",
        "--phase",
        "pretrain",
        "--config",
        str(cfg),
        cwd=world,
        env={"TRAINER_ARTIFACTS_DIR": str(world / "other")},
    )
    assert r.returncode == 2
    assert "global batch of 8 sequences" in r.stderr and "this run has 4 (B=2, accum_steps=2, processes=1)" in r.stderr
