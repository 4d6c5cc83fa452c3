"""The GPU and multi-process paths, on the CPU as far as they can run there.

FSDP and fp16 run through `tests/emulated_run.py` (Accelerate refuses both on the CPU; it switches the
accelerator the trainer makes to what Accelerate sets up on a GPU, and runs the real command). What needs a GPU
itself (NCCL, CUDA kernels, fused AdamW, flash attention) is `python -m trainer_accel.gpu_check`'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import events, free_port, run_cli, write_config

from trainer_accel.fsio import sha256_file

ROOT = Path(__file__).resolve().parent.parent
EMULATED = ROOT / "tests" / "emulated_run.py"
SHORT = {"total_steps": 4, "B": 2, "eval_every": 2, "ckpt_every": 2, "warmup_steps": 1, "grad_clip": 0.0}
SAMPLE = [{"prompt": "The zordax is", "max_new_tokens": 8, "temperature": 0.0}]
# FSDP2 shards on the CPU only where torch's CPU streams record events (torch 2.13 does; 2.6, the floor, stops in
# FSDP2's pre-forward: "'Stream' object has no attribute 'record_event'"). There gpu_check runs FSDP2 on a GPU.
CPU_FSDP2 = hasattr(torch.cpu.Stream, "record_event")
needs_cpu_fsdp2 = pytest.mark.skipif(
    not CPU_FSDP2, reason=f"FSDP2 does not run on the CPU with torch {torch.__version__}"
)


def launch(
    world: Path,
    launch_file: str,
    target: list[str],
    *run_args: str,
    artifacts: str,
    launcher: tuple = (),
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/<file> TARGET ARGS` with its own port and artifacts dir."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch" / launch_file),
        "--main_process_port",
        str(free_port()),
        *launcher,
        *target,
        *run_args,
    ]
    return subprocess.run(
        cmd,
        cwd=world,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRAINER_ARTIFACTS_DIR": str(world / artifacts), **(env or {})},
    )


def emulated_fp16(world: Path, cfg: Path, init_scale: float) -> subprocess.CompletedProcess:
    """`python -m trainer_accel.run --phase pretrain` with fp16 and a loss scaler as on a GPU, starting at
    init_scale."""
    return subprocess.run(
        [sys.executable, str(EMULATED), "fp16", "--phase", "pretrain", "--config", str(cfg)],
        cwd=world,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TEST_INIT_SCALE": str(init_scale)},
    )


def samples(artifacts: Path) -> dict[str, str]:
    return {p.name: json.loads(p.read_text())["text"] for p in sorted((artifacts / "samples/pretrain").glob("*.json"))}


@needs_cpu_fsdp2
def test_fsdp2_trains_samples_resumes_and_saves_the_same_checkpoint_as_ddp(world):
    """FSDP2 through the trainer on 2 gloo processes: the first progress line (Accelerate's clip_grad_norm_ returns
    a DTensor there), samples at each checkpoint (the sharded module cannot run on one process), the tied
    embedding stored once (the gathered state holds two copies), a resume and best.pt. With fp32 and no clipping,
    2 processes sum the same two gradients under FSDP and DDP, so the checkpoints of the same runs (4 steps, then
    resumed to 6) must be byte for byte equal."""
    cfg = write_config(world / "pre.json", "pretrain", SHORT, sample_prompts=SAMPLE)
    fsdp = ("fsdp.yaml", [str(EMULATED), "fsdp"], ("--num_processes", "2", "--mixed_precision", "no"))
    ddp = ("cpu_2proc.yaml", ["-m", "trainer_accel.run"], ())
    for steps in (4, 6):
        for artifacts, (launch_file, target, launcher) in (("fsdp", fsdp), ("ddp", ddp)):
            r = launch(
                world,
                launch_file,
                target,
                "--phase",
                "pretrain",
                "--config",
                str(cfg),
                "--set",
                f"train_cfg.total_steps={steps}",
                artifacts=artifacts,
                launcher=launcher,
            )
            assert r.returncode == 0, r.stderr[-3000:]
            if steps == 6:
                assert "resumed from" in r.stderr and "at step 4" in r.stderr
    a, b = world / "fsdp", world / "ddp"
    for pointer in ("latest", "best", "step_0000004"):
        fsdp_meta = json.loads((a / "checkpoints/pretrain" / pointer / "meta.json").read_text())
        assert fsdp_meta["tied"] == {"lm_head.weight": "tok_emb.weight"}
        assert sha256_file(a / "checkpoints/pretrain" / pointer / "model.safetensors") == sha256_file(
            b / "checkpoints/pretrain" / pointer / "model.safetensors"
        )
    assert sorted(samples(a)) == ["step-00000002-00.json", "step-00000004-00.json", "step-00000006-00.json"]
    assert samples(a) == samples(b)
    best = torch.load(a / "checkpoints/best.pt", weights_only=True)
    assert best["step"] == 6 and len(best["optimizer_state"]["state"]) == len(best["model_state"]) - 1


@needs_cpu_fsdp2
@pytest.mark.parametrize(
    "model",
    [
        {},
        {
            "model_cfg": {
                "V": 260,
                "T": 32,
                "C": 32,
                "L": 2,
                "H": 4,
                "n_kv_heads": 2,
                "d_ff": 48,
                "position": "rope",
                "norm": "rmsnorm",
                "mlp": "gated",
                "activation": "silu",
                "tie_embeddings": False,
            }
        },
    ],
    ids=["gpt2-style", "llama-style"],
)
def test_fsdp2_bf16_reduces_gradients_in_fp32_and_trains(world, model):
    """Accelerate's own FSDP2 bf16 policy reduces gradients in bf16, unlike DDP; ours reduces them in fp32. (An fp32
    output_dtype, tried first, broke the forward: Accelerate's separate unit for the final norm returned fp32 into
    the bf16 output layer.) A Llama-style model shards by block the same way (RMSNorm, rotary tables in fp32)."""
    cfg = write_config(world / "pre.json", "pretrain", {**SHORT, "total_steps": 2}, **model)
    r = launch(
        world,
        "fsdp.yaml",
        [str(EMULATED), "fsdp"],
        "--phase",
        "pretrain",
        "--config",
        str(cfg),
        artifacts="bf16",
        launcher=("--num_processes", "2", "--mixed_precision", "bf16"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "FSDP2: parameters gathered and computed in bfloat16, gradients reduced in float32; weights, optimizer "
        "state and the loss float32"
    ) in r.stderr
    losses = [e["val/loss"] for e in events(world / "bf16", "eval")]
    assert len(losses) == 2 and losses[1] < losses[0]


def test_fsdp_plugin_keeps_fp32_reduction_for_half_precision(monkeypatch):
    for key, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    from trainer_accel.devices.accelerator import fsdp_plugin

    for precision, half in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        policy = fsdp_plugin(precision).mixed_precision_policy
        assert (policy.param_dtype, policy.reduce_dtype) == (half, torch.float32)
    assert fsdp_plugin("no").mixed_precision_policy is None
    monkeypatch.setenv("FSDP_VERSION", "1")
    from trainer_accel.errors import UserError

    with pytest.raises(UserError, match="fsdp_version: 2"):
        fsdp_plugin("bf16")


def test_fsdp_without_a_gpu_is_refused(world):
    cfg = write_config(world / "pre.json", "pretrain", SHORT)
    r = launch(
        world,
        "fsdp.yaml",
        ["-m", "trainer_accel.run"],
        "--phase",
        "pretrain",
        "--config",
        str(cfg),
        artifacts="run",
        launcher=("--num_processes", "2"),
    )
    assert r.returncode != 0 and "error: FSDP was asked for (launch/fsdp.yaml) without a CUDA GPU" in r.stderr
    assert not (world / "run/checkpoints").exists()


def test_fp16_overflows_are_the_loss_scalers_to_skip(world):
    """fp16 starts with a loss scale that overflows: the scaler skips those updates and lowers its scale, training
    goes on, and none of them counts as the trainer's own non-finite skip. (In "skip" mode the trainer used to
    skip without letting the scaler update, and the next step died: "unscale_() has already been called".)"""
    cfg = write_config(world / "pre.json", "pretrain", {"on_nonfinite": "skip", "total_steps": 8})
    r = emulated_fp16(world, cfg, init_scale=2.0**24)
    assert r.returncode == 0, r.stderr[-3000:]
    progress = events(world, "progress")
    overflowed = sum(e["train/scaler_skips"] for e in progress)
    assert overflowed >= 1 and "the fp16 loss scaler skipped" in r.stderr
    assert events(world, "skipped") == []
    meta = json.loads((world / "checkpoints/pretrain/latest/meta.json").read_text())
    assert meta["skipped_steps"] == 0 and meta["grad_scaler"]["scale"] == 2.0**24 / 2**overflowed
    assert progress[-1]["train/loss_scale"] == meta["grad_scaler"]["scale"]
    val = [e["val/loss"] for e in events(world, "eval")]
    assert val[-1] < val[0]  # it trained after the overflows


def test_fp16_non_finite_loss_is_the_trainers_skip(world):
    """A loss that is itself non-finite is the trainer's to skip ("skip" mode), counted, and it stops after
    max_nonfinite_skips in a row, under fp16 as without a scaler."""
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
    r = emulated_fp16(world, cfg, init_scale=2.0**16)
    assert r.returncode == 1 and "error: 3 non-finite updates in a row" in r.stderr, r.stderr[-3000:]
    skipped = [e["step"] for e in events(world, "skipped")]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))


def test_resume_keeps_the_optimizer_flags_of_this_device(world):
    """A checkpoint from a CUDA run holds AdamW groups with fused=True; resumed elsewhere (and the other way round,
    CPU to CUDA), the optimizer keeps the flags it was built with for this device instead of the saved ones."""
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    blob = torch.load(world / "checkpoints/best.pt", weights_only=True)
    for group in blob["optimizer_state"]["param_groups"]:
        group.update(fused=True, foreach=True)
    torch.save(blob, world / "from_cuda.pt")
    r = run_cli(
        "run",
        "--phase",
        "pretrain",
        "--config",
        str(cfg),
        "--resume",
        "from_cuda.pt",
        "--set",
        "train_cfg.total_steps=4",
        cwd=world,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    saved = torch.load(world / "checkpoints/pretrain/latest/optimizer.pt", weights_only=True)
    built_here = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
    assert [(g["fused"], g["foreach"]) for g in saved["param_groups"]] == [
        (built_here["fused"], built_here["foreach"])
    ] * 2
    assert json.loads((world / "checkpoints/pretrain/latest/meta.json").read_text())["step"] == 4


@pytest.mark.parametrize(
    "name, precision, tf32, tflops, source",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", True, 989.0, "H100 bf16/fp16"),
        ("NVIDIA H100 NVL", "bf16", True, 835.0, "H100 NVL bf16/fp16"),
        ("NVIDIA H100 PCIe", "fp16", True, 756.0, "H100 PCIe bf16/fp16"),
        ("NVIDIA GH200 480GB", "bf16", True, 989.0, "GH200 bf16/fp16"),
        ("NVIDIA H200", "no", True, 494.0, "H200 tf32"),
        ("NVIDIA H100 80GB HBM3", "no", False, 67.0, "H100 fp32"),
        ("NVIDIA A100-SXM4-80GB", "bf16", True, 312.0, "A100 bf16/fp16"),
        ("NVIDIA A10G", "no", False, 31.2, "A10G fp32"),
        ("NVIDIA L40S", "bf16", True, 362.0, "L40S bf16/fp16"),
    ],
)
def test_gpu_peaks_match_the_card_and_the_precision_its_matmuls_run_in(
    monkeypatch, name, precision, tf32, tflops, source
):
    from trainer_accel.devices import hardware

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, where = hardware.gpu_peak_flops(torch.device("cuda"), precision, tf32)
    assert peak == tflops * 1e12 and where.startswith(f"datasheet {source}")


def test_unknown_gpu_has_no_peak(monkeypatch):
    from trainer_accel.devices import hardware

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future 9000")
    assert hardware.gpu_peak_flops(torch.device("cuda"), "bf16", True) == (
        None,
        "no datasheet peak known for 'NVIDIA Future 9000'",
    )


def test_the_suite_runs_on_the_cpu_on_a_gpu_machine_too():
    """Every test and every command it starts (they inherit the environment) sees no CUDA device, so a GPU machine
    runs the CPU suite as CI does; `gpu_check` ran it so on an H200."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()


def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(world):
    r = run_cli("gpu_check", cwd=world)
    assert r.returncode == 0
    assert r.stdout.strip() == (
        "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing was run"
    )
    assert sorted(p.name for p in world.iterdir()) == ["data"]  # the world fixture's caches only


def test_unconnected_processes_are_refused(world):
    """Where Accelerate cannot connect launched processes (Apple MPS), they would each train alone and write the
    same checkpoints: refused, with the way out."""
    cfg = write_config(world / "pre.json", "pretrain", SHORT)
    r = launch(
        world, "cpu_2proc.yaml", [str(EMULATED), "mps"], "--phase", "pretrain", "--config", str(cfg), artifacts="run"
    )
    assert r.returncode != 0 and "error: the launcher started 2 processes but they are not connected" in r.stderr
    assert "add --device cpu" in r.stderr and not (world / "run/checkpoints").exists()
