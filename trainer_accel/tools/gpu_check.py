"""Every CUDA path of the trainer, run for real on the GPU at hand, in one command, with a table at the end.

    python -m trainer_accel.gpu_check [--workdir DIR] [--json PATH] [--no-tests] [--no-bench] [--bench NAMES]
                                      [--only WORDS] [--time-limit S]

The CPU test suite proves the loop, checkpoints and resume; what only a GPU can show is checked here, each as a
user runs it (the real CLI, in fresh processes, on small models of the demo data): bf16 + torch.compile
pretraining with a checkpoint at the last step and a resume (recompiles counted), SFT with compile from it, packed
SFT of a Llama-style model with replay under bf16 + compile (the trainer's own compile count: graphs, graph
breaks, nothing compiled after the warm-up), fp16 with on_nonfinite "stop" and "skip" (an overflow forced early:
the loss scaler skips it and lowers its scale, and the trainer counts no skip of its own), FSDP2 on one process
with samples and a resume, FSDP2 with fp16, FSDP2 with compile, activation checkpointing in one process (the
loss and the checkpoint's names against a run without) and under FSDP2 with a resume, the Hugging Face export of
that FSDP2 checkpoint read back by transformers (skipped, and said so, without transformers), fused AdamW after a
resume from a CPU checkpoint, flash attention under bf16, the masked (packed) attention kernel in bf16 and fp16
with finite gradients at T % 128 == 64, the CPU test suite on this machine, and `trainer_accel.bench` on GPT-2
small (MFU target 50% of the datasheet peak), a SmolLM2-135M-shaped and a Llama-3.2-1B-shaped model (activation
checkpointing, the largest batch that fits). Adapters: LoRA SFT under bf16 + compile with a resume and a PEFT
export, QLoRA (an NF4 base) under FSDP2 with a resume and a merged export, and the Llama-3.2-1B shape as QLoRA
trains it at the largest batch whose step fits in 24 GiB (T=2048). Preference: DPO from the SFT best with its
reference computed once and read back on resume, and a LoRA DPO under FSDP2 with the adapter off as its live
reference. With two or more GPUs it adds DDP and FSDP
across all of them. The checks run at once with the test suite beside them, then the benches alone, one at a
time. The last run's table (fewer checks: 6:47 on one H200 with 16 cores) is in docs/devices.md. On a machine
without CUDA it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer_accel.paths import REPO_ROOT

MODEL = {"V": 260, "T": 256, "C": 256, "L": 4, "H": 4, "d_ff": 1024}
TRAIN = {
    "seed": 1,
    "B": 16,
    "total_steps": 20,
    "base_lr": 1e-3,
    "warmup_steps": 5,
    "min_lr": 1e-4,
    "eval_every": 10,
    "eval_batches": 4,
    "ckpt_every": 20,
    "log_every": 10,
}
# a Llama-style model (rotary, RMSNorm, SwiGLU, 2 key-value heads for 4 query heads) at T % 128 == 64: the
# sequence lengths at which cuDNN's masked attention was reported to give NaN gradients (pytorch issue 196678)
LLAMA = {
    "V": 260,
    "T": 320,
    "C": 256,
    "L": 4,
    "H": 4,
    "n_kv_heads": 2,
    "d_ff": 688,
    "position": "rope",
    "norm": "rmsnorm",
    "mlp": "gated",
    "activation": "silu",
    "bias": False,
}
SAMPLES = [{"prompt": "The zordax is", "max_new_tokens": 16, "temperature": 0.0}]
BENCHES = {
    "gpt2": ("configs/bench/gpt2_124m.json", 0.50),
    "llama135m": ("configs/bench/llama_135m.json", None),
    "llama1b": ("configs/bench/llama_1b.json", None),
}  # name: (config, MFU target or None: a figure only)
BATCH_CANDIDATES = [128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1]
BENCH_MEMORY_BUDGET = 40 * 2**30  # one model's step in the 1B bench: half of an 80 GB GPU
FORCED_SCALE = 2.0**32  # the loss gradient times this is far past fp16's range (65504): the next updates overflow


@dataclass
class Result:
    name: str
    status: str  # "pass", "FAIL", "MISS" (ran, but a speed target was not met) or "skip" (a package is missing)
    figures: str


class Skipped(Exception):
    """A check that needs an optional package this environment lacks: reported as skipped, with the reason."""


class Runner:
    """Runs the trainer's commands in a work dir of its own, with the demo caches and fresh artifacts per check."""

    def __init__(self, workdir: Path, deadline: float):
        self.workdir, self.deadline = workdir, deadline  # deadline: time.perf_counter() value
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TRAINER_DATA_DIR": str(workdir / "data"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
        }

    def config(
        self, name: str, phase: str = "pretrain", train: dict | None = None, model: dict | None = None, **top
    ) -> Path:
        cfg = {
            "model_cfg": model or MODEL,
            "train_cfg": {**TRAIN, **(train or {})},
            "tracking": {"log_with": []},
            **top,
        }
        if phase == "sft":
            cfg.setdefault("sft_sources", {"dolly": 0.5, "oasst1": 0.4, "primer": 0.1})
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(cfg))
        return path

    def run(
        self,
        artifacts: str,
        *args: str,
        launch: list[str] | None = None,
        env: dict | None = None,
        timeout: float = 180,
        module: str = "run",
    ) -> subprocess.CompletedProcess:
        """`python -m trainer_accel.run ARGS` (or another command), through `accelerate launch LAUNCH` when given;
        a run that hangs (a collective waiting for a process that never comes) fails after `timeout` seconds."""
        timeout = max(10.0, min(timeout, self.deadline - time.perf_counter()))
        head = (
            [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *launch]
            if launch
            else [sys.executable]
        )  # a port of its own: launched checks run at once in other chains
        cmd = [*head, "-m", f"trainer_accel.{module}", *args]
        r = subprocess.run(
            cmd,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, "TRAINER_ARTIFACTS_DIR": str(self.workdir / artifacts), **(env or {})},
        )
        with (self.workdir / f"{artifacts}.log").open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}\n")
        if r.returncode != 0:
            raise CheckFailed(f"exit {r.returncode}: {last_error(r.stderr)} (log: {artifacts}.log)")
        return r

    def events(self, artifacts: str, kind: str) -> list[dict]:
        from trainer_accel.observability.metrics import read_events

        return [e for e in read_events(self.workdir / artifacts / "metrics/events.jsonl") if e["event"] == kind]

    def meta(self, artifacts: str, phase: str = "pretrain", pointer: str = "latest") -> dict:
        return json.loads((self.workdir / artifacts / "checkpoints" / phase / pointer / "meta.json").read_text())

    def optimizer_groups(self, artifacts: str, phase: str = "pretrain") -> list[dict]:
        path = self.workdir / artifacts / "checkpoints" / phase / "latest" / "optimizer.pt"
        return torch.load(path, map_location="cpu", weights_only=True)["param_groups"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CheckFailed(Exception):
    pass


# checks that read what the check before them in their chain wrote
READS_THE_PREVIOUS = {
    "SFT bf16 + compile from that pretrain",
    "LoRA SFT bf16 + compile from it, resume, PEFT export",
    "HF export of that FSDP2 checkpoint, read by transformers",
    "DPO from the SFT best: reference once, resume; LoRA DPO live under FSDP2",
}


def selected(chain: list[tuple], only: str | None) -> list[tuple]:
    """The chain's checks whose label holds one of the comma-separated words of --only (every check without it),
    with the checks before each one that reads what they wrote."""
    if not only:
        return chain
    words = [w.strip().lower() for w in only.split(",") if w.strip()]
    keep = {i for i, (label, _) in enumerate(chain) if any(w in label.lower() for w in words)}
    while more := {i - 1 for i in keep if chain[i][0] in READS_THE_PREVIOUS} - keep:  # and what that one reads
        keep |= more
    return [check for i, check in enumerate(chain) if i in keep]


def run_chain(chain: list[tuple]) -> list[Result]:
    """Run (label, check) pairs in order; a check that breaks is a failed check and the next still runs."""
    results = []
    for label, check in chain:
        t0 = time.perf_counter()
        try:
            results.append(Result(label, "pass", check()))
        except Skipped as e:
            results.append(Result(label, "skip", str(e)))
        except Exception as e:
            results.append(Result(label, "FAIL", failure(e)))
        print(f"  {results[-1].status:<5} {label} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


def last_error(stderr: str) -> str:
    """The line that says what went wrong: the trainer's `error:` line, else the last exception, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for pattern in (r"^error: ", r"^(\[rank\d+\]: )?\w+(Error|Exception)\b"):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return found[-1][:200]
    return lines[-1][:200] if lines else "(no output)"


def failure(e: Exception) -> str:
    return str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"[:200]


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def recompiles(r: subprocess.CompletedProcess) -> int:
    """The most recompiles of any one compiled function (TORCH_LOGS=recompiles names each)."""
    counts: dict[str, int] = {}
    for where in re.findall(r"Recompiling function (\S+ in \S+)", r.stderr):
        counts[where] = counts.get(where, 0) + 1
    return max(counts.values(), default=0)


def tokens_per_sec(run: Runner, artifacts: str) -> str:
    rates = [e["train/tokens_per_sec"] for e in run.events(artifacts, "progress")]
    return f"{rates[-1]:,.0f} tok/s" if rates else "-"


COMPILE_LOGS = {"TORCH_LOGS": "recompiles"}


# -- the checks: each returns its figures or raises CheckFailed ---------------------------------------------------


def check_bf16_compile(run: Runner) -> str:
    cfg = run.config("bf16", train={"mixed_precision": "bf16", "compile": True})
    first = run.run("bf16", "--phase", "pretrain", "--config", str(cfg), env=COMPILE_LOGS)
    expect(run.meta("bf16")["step"] == 20, "no checkpoint at the last step (20)")
    again = run.run(
        "bf16", "--phase", "pretrain", "--config", str(cfg), "--set", "train_cfg.total_steps=40", env=COMPILE_LOGS
    )
    expect("resumed from" in again.stderr and "at step 20" in again.stderr, "the second run did not resume at step 20")
    expect(run.meta("bf16")["step"] == 40, "the resumed run did not reach step 40")
    counts = (recompiles(first), recompiles(again))
    expect(max(counts) <= 1, f"recompiles {counts[0]} and {counts[1]}, at most 1 each (train -> eval) expected")
    return f"20 + 20 steps, recompiles {counts[0]} / {counts[1]} (train/eval), {tokens_per_sec(run, 'bf16')}"


def check_sft_compile(run: Runner) -> str:
    init = run.workdir / "bf16/checkpoints/pretrain/best"
    expect(init.is_dir(), f"{init} is missing (the bf16 pretrain check failed)")
    cfg = run.config("sft", "sft", train={"mixed_precision": "bf16", "compile": True}, init_from=str(init))
    r = run.run("bf16", "--phase", "sft", "--config", str(cfg), env=COMPILE_LOGS)
    expect("initialised weights from" in r.stderr, "SFT did not start from the pretrain best")
    evals = [e["val/loss"] for e in run.events("bf16", "eval") if e["phase"] == "sft"]
    expect(len(evals) >= 2 and evals[-1] < evals[0], f"SFT val loss did not fall: {evals}")
    expect(recompiles(r) <= 1, f"{recompiles(r)} recompiles, at most 1 expected")
    return f"val {evals[0]:.3f} -> {evals[-1]:.3f}, recompiles {recompiles(r)}, {tokens_per_sec(run, 'bf16')}"


def scaler_figures(run: Runner, artifacts: str) -> tuple[int, float]:
    progress = run.events(artifacts, "progress")
    return sum(e.get("train/scaler_skips") or 0 for e in progress), run.meta(artifacts)["grad_scaler"]["scale"]


def check_fp16_stop(run: Runner) -> str:
    cfg = run.config("fp16_stop", train={"mixed_precision": "fp16", "total_steps": 30, "ckpt_every": 10})
    run.run("fp16_stop", "--phase", "pretrain", "--config", str(cfg))
    meta = run.meta("fp16_stop")
    skips, scale = scaler_figures(run, "fp16_stop")
    expect(
        meta["step"] == 30 and meta["skipped_steps"] == 0, f"step {meta['step']}, trainer skips {meta['skipped_steps']}"
    )
    return f"30 steps, scaler skipped {skips} (scale now {scale:g}), trainer skips 0, val {meta['last_val_loss']:.3f}"


def check_fp16_skip(run: Runner) -> str:
    cfg = run.config(
        "fp16_skip", train={"mixed_precision": "fp16", "on_nonfinite": "skip", "total_steps": 10, "ckpt_every": 10}
    )
    run.run("fp16_skip", "--phase", "pretrain", "--config", str(cfg))
    before = run.meta("fp16_skip")
    # force an overflow: the checkpoint's loss scale (its sidecar holds the scaler's state) far past fp16's range;
    # latest/ and step_0000010/ share this file (hard links), so both say it
    meta_file = run.workdir / "fp16_skip/checkpoints/pretrain/latest/meta.json"
    meta_file.write_text(json.dumps({**before, "grad_scaler": {**before["grad_scaler"], "scale": FORCED_SCALE}}))
    run.run("fp16_skip", "--phase", "pretrain", "--config", str(cfg), "--set", "train_cfg.total_steps=50")
    after = run.meta("fp16_skip")
    skips, scale = scaler_figures(run, "fp16_skip")
    expect(after["step"] == 50, f"stopped at step {after['step']}")
    expect(skips >= 1 and scale < FORCED_SCALE, f"no overflow handled: scaler skips {skips}, scale {scale:g}")
    expect(after["skipped_steps"] == 0, f"{after['skipped_steps']} overflows counted as the trainer's skips")
    expect(after["last_val_loss"] < before["last_val_loss"], "val loss did not fall after the overflows")
    return (
        f"scale set to 2^32 at step 10, 40 more steps: scaler skipped {skips}, scale now {scale:g}, trainer skips 0, "
        f"val {before['last_val_loss']:.3f} -> {after['last_val_loss']:.3f}"
    )


def check_fsdp(run: Runner, processes: int, artifacts: str) -> str:
    cfg = run.config(artifacts, train={"mixed_precision": "bf16"}, sample_prompts=SAMPLES)
    launch = ["--config_file", str(REPO_ROOT / "launch/fsdp.yaml"), "--num_processes", str(processes)]
    first = run.run(artifacts, "--phase", "pretrain", "--config", str(cfg), launch=launch)
    expect("gradients reduced in float32" in first.stderr, "the FSDP2 precision line does not say fp32 reduction")
    again = run.run(
        artifacts, "--phase", "pretrain", "--config", str(cfg), "--set", "train_cfg.total_steps=30", launch=launch
    )
    expect("at step 20" in again.stderr, "the second run did not resume at step 20")
    samples = sorted(p.name for p in (run.workdir / artifacts / "samples/pretrain").glob("*.json"))
    expect(len(samples) == 2, f"samples written: {samples}")
    meta = run.meta(artifacts)
    expect(meta["tied"] == {"lm_head.weight": "tok_emb.weight"}, f"tied weights stored twice: {meta['tied']}")
    expect((run.workdir / artifacts / "checkpoints/best.pt").is_file(), "no best.pt")
    text = json.loads((run.workdir / artifacts / "samples/pretrain" / samples[-1]).read_text())["text"]
    return f"{processes} process(es), 20 + 10 steps, samples at 20 and 30 ({text[:24]!r}...), tie stored once"


def check_ddp(run: Runner, processes: int) -> str:
    cfg = run.config("ddp", train={"mixed_precision": "bf16"})
    launch = ["--config_file", str(REPO_ROOT / "launch/ddp.yaml"), "--num_processes", str(processes)]
    r = run.run("ddp", "--phase", "pretrain", "--config", str(cfg), launch=launch)
    expect(f"{processes} process(es) on cuda" in r.stderr, "not all GPUs took part")
    return f"{processes} processes, val {run.meta('ddp')['last_val_loss']:.3f}, {tokens_per_sec(run, 'ddp')}"


def check_fused_after_cpu(run: Runner) -> str:
    cfg = run.config(
        "fused", train={"total_steps": 4, "warmup_steps": 1, "ckpt_every": 4, "eval_every": 4, "log_every": 2}
    )
    run.run("fused", "--phase", "pretrain", "--config", str(cfg), "--device", "cpu")
    on_cpu = {g.get("fused") for g in run.optimizer_groups("fused")}
    run.run("fused", "--phase", "pretrain", "--config", str(cfg), "--set", "train_cfg.total_steps=8")
    on_gpu = {g.get("fused") for g in run.optimizer_groups("fused")}
    expect(on_gpu == {True}, f"after the resume on CUDA the AdamW groups say fused={on_gpu}")
    return f"fused {sorted(map(str, on_cpu))} on CPU -> {sorted(map(str, on_gpu))} after the resume on CUDA"


def compile_figures(run: Runner, artifacts: str, phase: str) -> str:
    """The trainer's own count of what compile did in `phase` (its last `compile` event), checked for compiles
    after the warm-up, which would mean a recompile every few steps."""
    found = [e for e in run.events(artifacts, "compile") if e["phase"] == phase]
    expect(bool(found), f"no compile event in {artifacts}'s event log")
    c = found[-1]
    expect(c["compiled_later"] == 0, f"{c['compiled_later']} frame(s) compiled after the warm-up (run -v lists why)")
    return f"{c['graphs']} graphs, {c['graph_breaks']} graph breaks"


def val_losses(run: Runner, artifacts: str, phase: str) -> list[float]:
    losses = [e["val/loss"] for e in run.events(artifacts, "eval") if e["phase"] == phase]
    expect(
        len(losses) >= 2 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0],
        f"{phase} val loss did not fall (or is not finite): {losses}",
    )
    return losses


def check_packed_sft(run: Runner) -> str:
    """SFT of a Llama-style model on packed rows with pretrain replay, bf16 + compile, at T = 320: the masked
    attention path (models/attention.py) through the trainer, rows of several examples each."""
    cfg = run.config(
        "packed",
        "sft",
        model=LLAMA,
        replay={"wiki": 0.2},
        train={
            "mixed_precision": "bf16",
            "compile": True,
            "pack": True,
            "total_steps": 30,
            "eval_every": 10,
            "ckpt_every": 30,
        },
    )
    r = run.run("packed", "--phase", "sft", "--config", str(cfg), env=COMPILE_LOGS)
    losses = val_losses(run, "packed", "sft")
    graphs = compile_figures(run, "packed", "sft")
    expect(recompiles(r) <= 1, f"{recompiles(r)} recompiles, at most 1 (train -> eval) expected")
    speed = tokens_per_sec(run, "packed")
    return f"val {losses[0]:.3f} -> {losses[-1]:.3f}, {graphs}, recompiles {recompiles(r)}, {speed}"


def fsdp_launch(processes: int = 1, precision: str = "bf16") -> list[str]:
    return [
        "--config_file",
        str(REPO_ROOT / "launch/fsdp.yaml"),
        "--num_processes",
        str(processes),
        "--mixed_precision",
        precision,
    ]


def check_fsdp_fp16(run: Runner) -> str:
    cfg = run.config("fsdp_fp16", train={"mixed_precision": "fp16"})
    r = run.run("fsdp_fp16", "--phase", "pretrain", "--config", str(cfg), launch=fsdp_launch(precision="fp16"))
    expect("gradients reduced in float32" in r.stderr, "the FSDP2 precision line does not say fp32 reduction")
    meta = run.meta("fsdp_fp16")
    expect(meta["grad_scaler"] is not None, "no loss scaler state in the checkpoint (fp16 needs one)")
    losses = val_losses(run, "fsdp_fp16", "pretrain")
    skips, scale = scaler_figures(run, "fsdp_fp16")
    return f"val {losses[0]:.3f} -> {losses[-1]:.3f}, scaler skipped {skips} (scale now {scale:g})"


def check_fsdp_compile(run: Runner) -> str:
    cfg = run.config("fsdp_compile", train={"mixed_precision": "bf16", "compile": True})
    first = run.run("fsdp_compile", "--phase", "pretrain", "--config", str(cfg), launch=fsdp_launch(), env=COMPILE_LOGS)
    again = run.run(
        "fsdp_compile",
        "--phase",
        "pretrain",
        "--config",
        str(cfg),
        "--set",
        "train_cfg.total_steps=30",
        launch=fsdp_launch(),
        env=COMPILE_LOGS,
    )
    expect("at step 20" in again.stderr, "the second run did not resume at step 20")
    losses = val_losses(run, "fsdp_compile", "pretrain")
    graphs = compile_figures(run, "fsdp_compile", "pretrain")
    return (
        f"val {losses[0]:.3f} -> {losses[-1]:.3f}, {graphs}, recompiles {recompiles(first)} / {recompiles(again)}, "
        f"{tokens_per_sec(run, 'fsdp_compile')}"
    )


def weight_names(run: Runner, artifacts: str) -> list[str]:
    from safetensors import safe_open

    path = run.workdir / artifacts / "checkpoints/pretrain/latest/model.safetensors"
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def check_activation_checkpointing(run: Runner) -> str:
    """One process, a Llama-style model in bf16: every block recomputed vs none, the same steps and data. The
    GPU's kernels are not bitwise deterministic, so the losses are compared to a tolerance and the names exactly."""
    results = {}
    for artifacts, every in (("ac_off", 0), ("ac_on", 1)):
        cfg = run.config(artifacts, model=LLAMA, train={"mixed_precision": "bf16", "activation_checkpointing": every})
        run.run(artifacts, "--phase", "pretrain", "--config", str(cfg))
        results[artifacts] = run.meta(artifacts)["last_val_loss"]
    expect(weight_names(run, "ac_off") == weight_names(run, "ac_on"), "the checkpoints' weight names differ")
    gap = abs(results["ac_on"] - results["ac_off"])
    expect(gap < 0.02, f"val loss {results['ac_on']:.4f} with recomputation, {results['ac_off']:.4f} without")
    return f"val {results['ac_on']:.4f} recomputed vs {results['ac_off']:.4f} kept (|diff| {gap:.1e}), names equal"


def check_fsdp_activation_checkpointing(run: Runner) -> str:
    cfg = run.config("fsdp_ac", model=LLAMA, train={"mixed_precision": "bf16", "activation_checkpointing": 1})
    first = run.run("fsdp_ac", "--phase", "pretrain", "--config", str(cfg), launch=fsdp_launch())
    expect("activation checkpointing: 4 of 4 blocks recomputed" in first.stderr, "activation checkpointing not on")
    again = run.run(
        "fsdp_ac",
        "--phase",
        "pretrain",
        "--config",
        str(cfg),
        "--set",
        "train_cfg.total_steps=30",
        launch=fsdp_launch(),
    )
    expect("at step 20" in again.stderr, "the second run did not resume at step 20")
    losses = val_losses(run, "fsdp_ac", "pretrain")
    return f"Llama-style, 20 + 10 steps, val {losses[0]:.3f} -> {losses[-1]:.3f}, {tokens_per_sec(run, 'fsdp_ac')}"


def check_hf_export_of_fsdp(run: Runner) -> str:
    """The FSDP2 Llama-style checkpoint exported as a Hugging Face directory, read back by transformers: its
    logits equal ours in fp32 on the CPU."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise Skipped("transformers is not installed (pip install -e '.[hf]')") from None
    ckpt = run.workdir / "fsdp_ac/checkpoints/pretrain/latest"
    expect(ckpt.is_dir(), f"{ckpt} is missing (the FSDP2 activation-checkpointing check failed)")
    out = run.workdir / "fsdp_ac_hf"
    run.run("fsdp_ac", "--format", "hf", "--checkpoint", str(ckpt), "--out", str(out), module="export")
    from trainer_accel.tools.bench import in_fresh_process

    diff = in_fresh_process(hf_logit_diff, (str(ckpt), str(out)))
    expect(diff["max_abs"] < 1e-4, f"logits differ by {diff['max_abs']:.2e}")
    return f"{diff['architecture']}: max |logit diff| {diff['max_abs']:.1e} vs ours (fp32, CPU)"


def hf_logit_diff(paths: tuple[str, str]) -> dict:
    from transformers import AutoModelForCausalLM

    from trainer_accel.checkpoints.loading import load_checkpoint
    from trainer_accel.config import ModelConfig
    from trainer_accel.models.build import build_model

    ckpt, hf_dir = paths
    loaded = load_checkpoint(Path(ckpt), with_optimizer=False)
    cfg = ModelConfig(**loaded.meta["model_cfg"])
    ours = build_model(cfg)
    ours.load_state_dict(loaded.model_state)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).float()  # what the export stores, then fp32 as ours
    x = torch.randint(0, cfg.V, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.eval()(x) - theirs.eval()(x).logits).abs().max().item()
    return {"max_abs": diff, "architecture": type(theirs).__name__}


def attention_kernels(_: object = None) -> list[str]:
    """The CUDA kernels of one bf16 training step of the trainer's model, prepared by Accelerate as a run does."""
    from torch.profiler import ProfilerActivity, profile

    from trainer_accel.config import ModelConfig
    from trainer_accel.devices.accelerator import make_accelerator
    from trainer_accel.models.build import build_model

    acc = make_accelerator("cuda", "bf16")
    model = build_model(ModelConfig(**MODEL))
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters()))
    x = torch.randint(0, MODEL["V"], (8, MODEL["T"]), device=acc.device)
    acc.backward(model(x).float().logsumexp(-1).mean())  # warm-up: kernel selection
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        acc.backward(model(x).float().logsumexp(-1).mean())
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if re.search("flash|fmha|attention|sdpa|efficient", e.name, re.I)})


def masked_attention_kernels(_: object = None) -> dict:
    """For bf16 and fp16 at T = 320 and 1088 (T % 128 == 64): the attention kernels one forward and backward of a
    Llama-style model (grouped-query heads) on packed rows runs, and whether every gradient is finite."""
    from torch.profiler import ProfilerActivity, profile

    from trainer_accel.config import ModelConfig
    from trainer_accel.models.build import build_model

    found = {}
    for dtype in (torch.bfloat16, torch.float16):
        for T in (320, 1088):
            torch.manual_seed(0)
            model = build_model(ModelConfig(**{**LLAMA, "T": T}), "cuda")
            x = torch.randint(0, LLAMA["V"], (4, T), device="cuda")
            segments = torch.cumsum(torch.rand(4, T, device="cuda") < 0.01, dim=1)  # examples of ~100 tokens
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                with torch.autocast("cuda", dtype=dtype):
                    loss = model(x, segments, targets=x)
                loss.backward()
                torch.cuda.synchronize()
            finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
            names = sorted(
                {e.name for e in prof.events() if re.search("flash|fmha|attention|sdpa|efficient|cudnn", e.name, re.I)}
            )
            found[f"{str(dtype).removeprefix('torch.')} T={T}"] = {"kernels": names, "finite": finite}
    return found


def check_masked_attention(run: Runner) -> str:
    from trainer_accel.tools.bench import in_fresh_process

    found = in_fresh_process(masked_attention_kernels, None)
    for case, f in found.items():
        expect(f["finite"], f"{case}: non-finite gradients")
        efficient = [k for k in f["kernels"] if re.search("efficient_attention|fmha_cutlass", k, re.I)]
        cudnn = [k for k in f["kernels"] if "cudnn" in k.lower()]
        expect(bool(efficient) and not cudnn, f"{case}: expected the memory-efficient kernel, ran {f['kernels'][:4]}")
    return f"memory-efficient kernel, finite gradients: {', '.join(found)}"


def check_flash(run: Runner) -> str:
    from trainer_accel.tools.bench import in_fresh_process

    kernels = in_fresh_process(attention_kernels, None)
    flash = [k for k in kernels if "flash" in k.lower()]
    expect(bool(flash), f"no flash kernel among the attention kernels: {kernels or 'none'}")
    return f"{flash[0][:70]}"


def largest_batch(job: tuple[str, list[int], float]) -> dict:
    """The largest B of `candidates` at which one training step of the config's model (bf16 autocast, its
    activation checkpointing, fused AdamW, no compile: compile only lowers the peak) fits in `budget` bytes of
    the GPU's memory."""
    from trainer_accel.models.build import build_model
    from trainer_accel.phases.registry import load_config

    config, candidates, budget = job
    cfg = load_config(config, "pretrain")
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(0).total_memory))
    model = build_model(cfg.model, "cuda")
    model.checkpoint_every = cfg.train.activation_checkpointing
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    return first_batch_that_fits(model, opt, cfg, candidates, steps=1)


def first_batch_that_fits(model, opt, cfg, candidates: list[int], steps: int) -> dict:
    """The first B of `candidates` whose `steps` training steps (bf16 autocast) run without running out of memory:
    B, the peak memory and (steps > 1) the median step time after the first."""
    for B in candidates:
        try:
            x = torch.randint(0, cfg.model.V, (B, cfg.seq_len), device="cuda")
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x, targets=x)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            step = sorted(times[1:])[len(times[1:]) // 2] if steps > 1 else None
            return {"B": B, "peak": torch.cuda.max_memory_allocated(), "step_s": step}
        except torch.OutOfMemoryError:
            pass
        # out of the except block: its traceback no longer holds the failed step's activations
        x = loss = None
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return {"B": None, "peak": None}


def check_lora_compile(run: Runner) -> str:
    """LoRA SFT (all-linear, dropout) from the bf16 pretrain under bf16 + compile: the adapter alone in the
    checkpoint, a resume, and the PEFT export read back."""
    init = run.workdir / "bf16/checkpoints/pretrain/best"
    expect(init.is_dir(), f"{init} is missing (the bf16 pretrain check failed)")
    adapter = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    train = {"mixed_precision": "bf16", "compile": True, "base_lr": 2e-3}
    cfg = run.config("lora", "sft", train=train, init_from=str(init), adapter=adapter)
    r = run.run("lora", "--phase", "sft", "--config", str(cfg), env=COMPILE_LOGS)
    expect("trainable: adapter rank 16" in r.stderr, "the run did not say its trainable parameters")
    again = run.run("lora", "--phase", "sft", "--config", str(cfg), "--set", "train_cfg.total_steps=30")
    expect("resumed from" in again.stderr and "at step 20" in again.stderr, "the adapter run did not resume at 20")
    meta = run.meta("lora", "sft")
    size = (run.workdir / "lora/checkpoints/sft/latest/model.safetensors").stat().st_size
    expect("adapter" in meta, "the checkpoint records no adapter")
    run.run("lora", "--checkpoint", str(run.workdir / "lora/checkpoints/sft/latest"), "--format", "peft", "--out",
            str(run.workdir / "lora_peft"), module="export")  # fmt: skip
    evals = [e["val/loss"] for e in run.events("lora", "eval") if e["phase"] == "sft"]
    expect(evals[-1] < evals[0], f"LoRA SFT val loss did not fall: {evals}")
    return f"val {evals[0]:.3f} -> {evals[-1]:.3f}, adapter file {size / 1e6:.2f} MB, recompiles {recompiles(r)}"


def check_preference(run: Runner) -> str:
    """DPO from the bf16 SFT best under bf16: the reference computed once on the GPU (the first loss ln 2), a
    resume that reads it back; then a LoRA DPO under FSDP2 whose reference is the adapter off, computed live on
    the sharded model."""
    init = run.workdir / "bf16/checkpoints/sft/best"
    expect(init.is_dir(), f"{init} is missing (the SFT check failed)")
    common = {"pref_sources": {"facts": 1.0}, "init_from": str(init), "preference": {"loss": "dpo"}}
    cfg = run.config("dpo", "preference", train={"mixed_precision": "bf16", "base_lr": 1e-4}, **common)
    r = run.run("dpo", "--phase", "preference", "--config", str(cfg))
    expect("computing the reference" in r.stderr, "the reference log-probabilities were not computed")
    first = run.events("dpo", "train")[0]["train/loss"]
    expect(abs(first - 0.6931) < 0.02, f"the first DPO loss is {first:.4f}, not ln 2 (the policy is its reference)")
    again = run.run("dpo", "--phase", "preference", "--config", str(cfg), "--set", "train_cfg.total_steps=30")
    expect("at step 20" in again.stderr and "computing the reference" not in again.stderr, "no resume on the file")
    adapter = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
    lora = run.config("dpo_lora", "preference", train={"mixed_precision": "bf16", "base_lr": 1e-3}, adapter=adapter,
                      **common)  # fmt: skip
    run.run("dpo_lora", "--phase", "preference", "--config", str(lora), launch=fsdp_launch(1))
    acc = [e["val/rewards/accuracies"] for e in run.events("dpo_lora", "eval")]
    margins = [e["val/rewards/margins"] for e in run.events("dpo_lora", "eval")]
    expect(margins[-1] > margins[0], f"the LoRA DPO val margin did not rise: {margins}")
    return f"first loss {first:.4f}; LoRA under FSDP2: val pair accuracy {acc[0]:.2f} -> {acc[-1]:.2f}"


def check_qlora_fsdp(run: Runner) -> str:
    """QLoRA: the Llama-style base in NF4 under FSDP2 (one process) with bf16, trained, resumed and exported."""
    if importlib.util.find_spec("torchao") is None:
        raise Skipped("torchao is not installed (pip install -e '.[qlora]')")
    base = run.config("qlora_base", model=LLAMA)
    run.run("qlora", "--phase", "pretrain", "--config", str(base))
    init = run.workdir / "qlora/checkpoints/pretrain/best"
    adapter = {"r": 8, "alpha": 16, "target_modules": "all-linear", "quantize_base": "nf4"}
    cfg = run.config("qlora", "sft", model=LLAMA, train={"mixed_precision": "bf16"}, init_from=str(init),
                     adapter=adapter)  # fmt: skip
    run.run("qlora", "--phase", "sft", "--config", str(cfg), launch=fsdp_launch(1))
    again = run.run("qlora", "--phase", "sft", "--config", str(cfg), "--set", "train_cfg.total_steps=30",
                    launch=fsdp_launch(1))  # fmt: skip
    expect("at step 20" in again.stderr, "the QLoRA run did not resume at step 20")
    run.run("qlora", "--checkpoint", str(run.workdir / "qlora/checkpoints/sft/latest"), "--out",
            str(run.workdir / "qlora.pt"), module="export")  # fmt: skip
    evals = [e["val/loss"] for e in run.events("qlora", "eval") if e["phase"] == "sft"]
    return f"val {evals[0]:.3f} -> {evals[-1]:.3f}, resumed, merged best.pt written"


QLORA_BUDGET = 24 * 2**30  # the card most people fine-tune on


def qlora_largest_batch(job: tuple[str, list[int]]) -> dict:
    """The Llama-3.2-1B-shaped model as QLoRA trains it (NF4 base, r 16 all-linear adapter, bf16, activation
    checkpointing, T=2048): the largest B whose step fits in 24 GiB, with its step time."""
    from trainer_accel.models.build import build_model
    from trainer_accel.models.lora import AdapterConfig, is_adapter_name, lora_converter
    from trainer_accel.models.nf4 import quantize_base
    from trainer_accel.phases.registry import load_config

    config, candidates = job
    cfg = load_config(config, "pretrain")
    torch.cuda.set_per_process_memory_fraction(
        min(1.0, QLORA_BUDGET / torch.cuda.get_device_properties(0).total_memory)
    )
    adapter = AdapterConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear", quantize_base="nf4")
    model = build_model(cfg.model, "cuda", converters=[lora_converter(adapter, cfg.model)], trains=is_adapter_name,
                        activation_checkpointing=1, after_load=[quantize_base])  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, fused=True)
    torch.cuda.reset_peak_memory_stats()  # the fp32 weights it was quantized from are gone
    fit = first_batch_that_fits(model, opt, cfg, candidates, steps=4)
    if fit["B"] is None:
        return fit
    return {
        **fit,
        "tokens_per_s": fit["B"] * cfg.seq_len / fit["step_s"],
        "trainable": sum(p.numel() for p in trainable),
    }


def check_qlora_1b(run: Runner) -> str:
    if importlib.util.find_spec("torchao") is None:
        raise Skipped("torchao is not installed (pip install -e '.[qlora]')")
    from trainer_accel.tools.bench import in_fresh_process

    f = in_fresh_process(qlora_largest_batch, (str(REPO_ROOT / BENCHES["llama1b"][0]), BATCH_CANDIDATES))
    expect(f["B"] is not None, "not even B=1 fits in 24 GiB")
    return (f"B={f['B']} x T=2048 fits in 24 GiB (peak {f['peak'] / 2**30:.1f} GiB), {f['step_s']:.2f} s/step, "
            f"{f['tokens_per_s']:,.0f} tokens/s, {f['trainable']:,} trainable")  # fmt: skip


def bench_config(run: Runner, name: str) -> tuple[Path, str]:
    """The bench's config: as committed, or (llama1b) at the largest batch that fits, written to the work dir."""
    config = REPO_ROOT / BENCHES[name][0]
    if name != "llama1b":
        return config, ""
    from trainer_accel.tools.bench import in_fresh_process

    # the paired bench holds two models at once: a step of one that fits in half of an 80 GB GPU (or of this one,
    # if smaller) leaves room for both, and shows the model trains on an 80 GB-class GPU
    budget = min(BENCH_MEMORY_BUDGET, torch.cuda.get_device_properties(0).total_memory // 2)
    fit = in_fresh_process(largest_batch, (str(config), BATCH_CANDIDATES, budget))
    expect(fit["B"] is not None, f"not even B=1 fits in {budget / 2**30:.0f} GiB")
    data = json.loads(config.read_text())
    data["train_cfg"]["B"] = fit["B"]
    path = run.workdir / f"{name}_B{fit['B']}.json"
    path.write_text(json.dumps(data))
    return path, f"B={fit['B']} (the largest whose step fits in {budget / 2**30:.0f} GiB: {fit['peak'] / 2**30:.1f}), "


def check_bench(run: Runner, name: str, windows: int, timeout: float) -> list[Result]:
    """`trainer_accel.bench` of one config on the GPU: its step time next to a plain loop's, and MFU against the
    datasheet peak (model FLOPs: recomputed blocks are not counted)."""
    label, target = f"bench {name} ({Path(BENCHES[name][0]).name})", BENCHES[name][1]
    config, batch = bench_config(run, name)
    out = run.workdir / f"bench_{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "trainer_accel.bench",
        "--config",
        str(config),
        "--device",
        "cuda",
        "--windows",
        str(windows),
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=run.workdir, capture_output=True, text=True, timeout=max(1.0, timeout), env=run.env)
    (run.workdir / f"bench_{name}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise CheckFailed(f"exit {r.returncode}: {last_error(r.stderr)} (log: bench_{name}.log)")
    f = json.loads(out.read_text())
    results = [Result(label, "pass", batch + bench_figures(f))]
    mfu = f["trainer"]["mfu"]
    if target is not None:
        results.append(
            Result(
                f"MFU >= {100 * target:.0f}% ({name}, trainer)",
                "pass" if mfu >= target else "MISS",
                f"{100 * mfu:.1f}% (plain loop {100 * f['plain loop']['mfu']:.1f}%)",
            )
        )
    return results


def bench_figures(f: dict) -> str:
    """One table cell from the bench's JSON: the training step, what evaluation and checkpoints add, MFU."""
    t = f["trainer"]
    return (
        f"trainer {t['train_ms']:.1f} ms/step training (+{t['eval_ms_amortised']:.1f} eval, "
        f"+{t['ckpt_ms_amortised']:.1f} checkpoints, amortised), {t['tokens_per_sec']:,.0f} tok/s, "
        f"MFU {100 * t['mfu']:.1f}% of {f['peak_flops'] / 1e12:.0f} TFLOP/s ({f['peak_source']}); "
        f"trainer/plain {f['ratio']:.3f}, peak memory {t['peak_memory'] / 2**30:.1f} GiB"
    )


def run_tests(workers: int, log: Path) -> subprocess.Popen:
    """The CPU test suite on this machine (its conftest hides the GPU), in the background. Each test process and
    each command it starts would take a thread per core: workers x cores threads fighting for the cores."""
    threads = str(max(1, (os.cpu_count() or 2) // (2 * workers)))
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "-p", "no:cacheprovider", "tests"],
        cwd=REPO_ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "OMP_NUM_THREADS": threads,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        },
    )


def tests_result(proc: subprocess.Popen, log: Path, started: float, timeout: float) -> Result:
    try:
        code = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        return Result(
            "test suite on CPU (this machine)",
            "FAIL",
            f"not finished after {time.perf_counter() - started:.0f} s (--time-limit); see tests.log",
        )
    lines = [line for line in log.read_text().splitlines() if re.search(r"\d+ (passed|failed)", line)]
    summary = lines[-1].strip("= ") if lines else f"exit {code}"
    return Result(
        "test suite on CPU (this machine)",
        "pass" if code == 0 else "FAIL",
        f"{summary} ({time.perf_counter() - started:.0f} s)",
    )


def run_checks(args: argparse.Namespace, workdir: Path) -> int:
    start = time.perf_counter()

    def left() -> float:
        return args.time_limit - (time.perf_counter() - start)

    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    import accelerate

    print(
        f"gpu_check: {gpus} x {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), accelerate "
        f"{accelerate.__version__}; work dir {workdir}",
        flush=True,
    )
    run = Runner(workdir, start + args.time_limit)
    missing: list[Result] = []  # checks left out for want of an optional package, said so in the table
    subprocess.run(
        [sys.executable, "-m", "trainer_accel.prepare", "--demo"],
        cwd=workdir,
        env=run.env,
        check=True,
        capture_output=True,
    )
    tests = None
    if not args.no_tests and importlib.util.find_spec("pytest") is None:
        missing.append(
            Result("test suite on CPU (this machine)", "skip", "pytest is not installed (pip install -e '.[test]')")
        )
    elif not args.no_tests and (REPO_ROOT / "tests").is_dir():
        tests_started = time.perf_counter()
        # most of the suite waits on process starts, so it takes half the cores; the checks beside it need few
        tests = run_tests(max(2, (os.cpu_count() or 4) // 2), workdir / "tests.log")
    # Each chain runs its checks in order (SFT starts from the bf16 pretrain's best, the HF export reads the FSDP2
    # checkpoint before it); the chains run at once, since each check is a few small trainer processes that wait
    # on start-up and compilation, not on the GPU. Each `accelerate launch` gets a port of its own.
    chains = [
        [
            ("bf16 + compile pretrain, ckpt at last step, resume", lambda: check_bf16_compile(run)),
            ("SFT bf16 + compile from that pretrain", lambda: check_sft_compile(run)),
            ("LoRA SFT bf16 + compile from it, resume, PEFT export", lambda: check_lora_compile(run)),
            ("DPO from the SFT best: reference once, resume; LoRA DPO live under FSDP2", lambda: check_preference(run)),
        ],
        [("QLoRA: NF4 base under FSDP2, bf16, resume, merged export", lambda: check_qlora_fsdp(run))],
        [("fp16, on_nonfinite stop", lambda: check_fp16_stop(run))],
        [("fp16, on_nonfinite skip, forced overflow", lambda: check_fp16_skip(run))],
        [("FSDP2 1 process: samples, resume, best.pt", lambda: check_fsdp(run, 1, "fsdp1"))]
        + (
            [
                (f"DDP across {gpus} GPUs", lambda: check_ddp(run, gpus)),
                (f"FSDP2 across {gpus} GPUs", lambda: check_fsdp(run, gpus, "fsdpN")),
            ]
            if gpus >= 2
            else []
        ),
        [
            ("fused AdamW after a resume from CPU", lambda: check_fused_after_cpu(run)),
            ("packed SFT, Llama-style, replay, bf16 + compile, T=320", lambda: check_packed_sft(run)),
        ],
        [
            ("flash attention under bf16", lambda: check_flash(run)),
            ("masked (packed) attention bf16/fp16: kernel, gradients", lambda: check_masked_attention(run)),
            ("activation checkpointing, 1 process: loss, names", lambda: check_activation_checkpointing(run)),
        ],
        [
            ("FSDP2 fp16", lambda: check_fsdp_fp16(run)),
            ("FSDP2 bf16 + compile, resume", lambda: check_fsdp_compile(run)),
            ("FSDP2 + activation checkpointing, Llama-style, resume", lambda: check_fsdp_activation_checkpointing(run)),
            ("HF export of that FSDP2 checkpoint, read by transformers", lambda: check_hf_export_of_fsdp(run)),
        ],
    ]
    chains = [c for c in (selected(chain, args.only) for chain in chains) if c]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(chains))) as pool:
        done = pool.map(run_chain, chains)
        results = [r for chain in done for r in chain] + missing
    if tests is not None:  # before the bench: its timings should not share the CPU with the tests
        results.append(tests_result(tests, workdir / "tests.log", tests_started, left()))
    if not args.no_bench and selected([("QLoRA Llama-3.2-1B shape, largest batch in 24 GiB", None)], args.only):
        try:
            results.append(Result("QLoRA Llama-3.2-1B shape, largest batch in 24 GiB", "pass", check_qlora_1b(run)))
        except Skipped as e:
            results.append(Result("QLoRA Llama-3.2-1B shape, largest batch in 24 GiB", "skip", str(e)))
        except Exception as e:
            results.append(Result("QLoRA Llama-3.2-1B shape, largest batch in 24 GiB", "FAIL", failure(e)))
    for name in [] if args.no_bench else [b for b in args.bench.split(",") if b]:
        t0 = time.perf_counter()
        if left() < 60:
            results.append(Result(f"bench {name}", "skip", "not run: --time-limit reached (run it with --bench)"))
            continue
        try:
            results += check_bench(run, name, args.bench_windows, left())
        except Exception as e:
            results.append(Result(f"bench {name}", "FAIL", failure(e)))
        print(f"  {results[-1].status:<5} bench {name} ({time.perf_counter() - t0:.0f} s)", flush=True)

    width = max(len(r.name) for r in results)
    print(f"\n{'check':<{width}}  result  figures")
    for r in results:
        print(f"{r.name:<{width}}  {r.status:<6}  {r.figures}")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "MISS", "skip")}
    print(
        f"\nsummary: {counts['pass']} passed, {counts['FAIL']} failed, {counts['MISS']} target(s) missed, "
        f"{counts['skip']} skipped, "
        f"{time.perf_counter() - start:.0f} s on {gpus} x {name}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": name, "gpus": gpus, "torch": torch.__version__, "results": [r.__dict__ for r in results]},
                indent=2,
            )
            + "\n"
        )
    return 1 if counts["FAIL"] else 0
