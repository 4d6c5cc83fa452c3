"""train_cfg.activation_checkpointing: blocks recomputed in the backward pass give the gradients of the run that
kept their activations, dropout included, and the same checkpoint files under the same names."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, write_config
from safetensors.torch import load_file
from test_device_paths import CPU_FSDP2, EMULATED, SHORT, launch

from trainer_accel.config import ModelConfig
from trainer_accel.fsio import sha256_file
from trainer_accel.models.gpt import GPT

LLAMA = dict(position="rope", norm="rmsnorm", mlp="gated", activation="silu", n_kv_heads=2)


@pytest.mark.parametrize("options", [{}, LLAMA], ids=["gpt2-style", "llama-style"])
@pytest.mark.parametrize("every", [1, 2, 3])
def test_recomputed_blocks_give_the_same_loss_and_gradients_dropout_included(options, every):
    torch.manual_seed(0)
    model = GPT(ModelConfig(V=260, T=32, C=32, L=4, H=4, d_ff=64, dropout=0.2, **options)).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 260, (3, 32), generator=g), torch.randint(0, 260, (3, 32), generator=g)

    def grads(k: int):
        model.checkpoint_every = k
        model.zero_grad()
        torch.manual_seed(7)  # the dropout masks' address, as the loop seeds them
        loss = model(x, targets=y)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    kept, recomputed = grads(0), grads(every)
    assert kept[0] == recomputed[0]
    assert all(torch.allclose(kept[1][n], recomputed[1][n], rtol=0, atol=1e-6) for n in kept[1])
    model.eval()
    with torch.no_grad():  # no recomputation outside training
        assert torch.equal(model(x), model(x))


def test_a_run_with_activation_checkpointing_writes_the_checkpoint_of_a_run_without(world):
    model = {"model_cfg": {"V": 260, "T": 32, "C": 32, "L": 2, "H": 2, "d_ff": 64, "dropout": 0.1}}
    for name, k in (("kept", 0), ("redone", 1)):
        cfg = write_config(
            world / f"{name}.json", "pretrain", {"total_steps": 4, "activation_checkpointing": k}, **model
        )
        r = run_cli(
            "run",
            "--phase",
            "pretrain",
            "--config",
            str(cfg),
            cwd=world,
            env={"TRAINER_ARTIFACTS_DIR": str(world / name)},
        )
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (load_file(str(world / n / "checkpoints/pretrain/latest/model.safetensors")) for n in ("kept", "redone"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    plan = run_cli("run", "--phase", "pretrain", "--config", str(world / "redone.json"), "--plan", cwd=world)
    kept = run_cli("run", "--phase", "pretrain", "--config", str(world / "kept.json"), "--plan", cwd=world)

    def activations(out: str) -> str:
        return out.split("activations ")[1].split(",")[0]

    assert activations(plan.stdout) != activations(kept.stdout)


def test_ddp_and_fsdp2_with_activation_checkpointing_write_the_checkpoint_of_ddp_without(world):
    """2 gloo processes: DDP keeping every activation, DDP recomputing every 2nd block and FSDP2 (the emulated path
    of test_device_paths) recomputing every block, dropout on, 4 steps each. In fp32 without clipping the three
    write byte-identical weights under the same names. (Resuming is the same code with or without recomputation,
    since the names are the same; test_device_paths resumes FSDP2 and DDP.)"""
    cfg = write_config(
        world / "ac.json",
        "pretrain",
        SHORT,
        model_cfg={"V": 260, "T": 32, "C": 32, "L": 2, "H": 2, "d_ff": 64, "dropout": 0.1},
    )
    arms = {
        "ddp": ("cpu_2proc.yaml", ["-m", "trainer_accel.run"], (), 0),
        "ddp_ac": ("cpu_2proc.yaml", ["-m", "trainer_accel.run"], (), 2),
        "fsdp_ac": ("fsdp.yaml", [str(EMULATED), "fsdp"], ("--num_processes", "2", "--mixed_precision", "no"), 1),
    }
    if not CPU_FSDP2:  # this torch cannot shard on the CPU (test_device_paths.CPU_FSDP2): the DDP arms still run
        del arms["fsdp_ac"]
    for artifacts, (launch_file, target, launcher, every) in arms.items():
        r = launch(
            world,
            launch_file,
            target,
            "--phase",
            "pretrain",
            "--config",
            str(cfg),
            "--set",
            f"train_cfg.activation_checkpointing={every}",
            artifacts=artifacts,
            launcher=launcher,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        recomputed = {0: None, 1: "2 of 2 blocks", 2: "1 of 2 blocks"}[every]
        assert (f"activation checkpointing: {recomputed} recomputed" in r.stderr) == (recomputed is not None)
    files = {a: world / a / "checkpoints/pretrain/step_0000004/model.safetensors" for a in arms}
    assert len({sha256_file(f) for f in files.values()}) == 1, {a: sha256_file(f) for a, f in files.items()}
    assert len({tuple(sorted(load_file(str(f)))) for f in files.values()}) == 1
