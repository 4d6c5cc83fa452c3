"""Every CUDA path of the trainer, run for real on the GPU at hand, in one command, with a table at the end.

    python -m trainer_accel.gpu_check [--workdir DIR] [--json PATH] [--no-tests] [--no-bench] [--time-limit S]

The CPU test suite proves the loop, checkpoints and resume; what only a GPU can show is checked here, each as a
user runs it (the real CLI, in fresh processes, on small models of the demo data): bf16 + torch.compile
pretraining with a checkpoint at the last step and a resume (recompiles counted), SFT with compile from it, fp16
with on_nonfinite "stop" and "skip" (an overflow forced early: the loss scaler skips it and lowers its scale,
and the trainer counts no skip of its own), FSDP2 on one process with samples and a resume, fused AdamW after a
resume from a CPU checkpoint, flash attention under bf16, the CPU test suite on this machine, and
`trainer_accel.bench` on GPT-2 small (configs/bench/gpt2_124m.json) with MFU against this GPU's datasheet peak.
With two or more GPUs it adds DDP and FSDP across all of them. The checks run at once with the test suite beside
them, then the bench alone: 6:47 on one H200 with 16 cores (docs/devices.md). On a machine without CUDA it says
so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer_accel.paths import REPO_ROOT

MODEL = {"V": 260, "T": 256, "C": 256, "L": 4, "H": 4, "d_ff": 1024}
TRAIN = {"seed": 1, "B": 16, "total_steps": 20, "base_lr": 1e-3, "warmup_steps": 5, "min_lr": 1e-4, "eval_every": 10,
         "eval_batches": 4, "ckpt_every": 20, "log_every": 10}
SAMPLES = [{"prompt": "The zordax is", "max_new_tokens": 16, "temperature": 0.0}]
FORCED_SCALE = 2.0**32  # the loss gradient times this is far past fp16's range (65504): the next updates overflow


@dataclass
class Result:
    name: str
    status: str  # "pass", "FAIL", or "MISS" (ran, but a speed target was not met)
    figures: str


class Runner:
    """Runs the trainer's commands in a work dir of its own, with the demo caches and fresh artifacts per check."""

    def __init__(self, workdir: Path, deadline: float):
        self.workdir, self.deadline = workdir, deadline  # deadline: time.perf_counter() value
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINER_DATA_DIR": str(workdir / "data"),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                    "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    def config(self, name: str, phase: str = "pretrain", train: dict | None = None, **top) -> Path:
        cfg = {"model_cfg": MODEL, "train_cfg": {**TRAIN, **(train or {})}, "tracking": {"log_with": []}, **top}
        if phase == "sft":
            cfg.setdefault("sft_sources", {"dolly": 0.5, "oasst1": 0.4, "primer": 0.1})
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(cfg))
        return path

    def run(self, artifacts: str, *args: str, launch: list[str] | None = None, env: dict | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
        """`python -m trainer_accel.run ARGS`, or through `accelerate launch LAUNCH` when given; a run that hangs
        (a collective waiting for a process that never comes) fails its check after `timeout` seconds."""
        timeout = max(10.0, min(timeout, self.deadline - time.perf_counter()))
        head = [sys.executable, "-m", "accelerate.commands.launch", *launch] if launch else [sys.executable]
        cmd = [*head, "-m", "trainer_accel.run", *args]
        r = subprocess.run(cmd, cwd=self.workdir, capture_output=True, text=True, timeout=timeout,
                           env={**self.env, "TRAINER_ARTIFACTS_DIR": str(self.workdir / artifacts), **(env or {})})
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


class CheckFailed(Exception):
    pass


def run_chain(chain: list[tuple]) -> list[Result]:
    """Run (label, check) pairs in order; a check that breaks is a failed check and the next still runs."""
    results = []
    for label, check in chain:
        t0 = time.perf_counter()
        try:
            results.append(Result(label, "pass", check()))
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
    again = run.run("bf16", "--phase", "pretrain", "--config", str(cfg), "--set", "train_cfg.total_steps=40",
                    env=COMPILE_LOGS)
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
    expect(meta["step"] == 30 and meta["skipped_steps"] == 0, f"step {meta['step']}, trainer skips {meta['skipped_steps']}")
    return f"30 steps, scaler skipped {skips} (scale now {scale:g}), trainer skips 0, val {meta['last_val_loss']:.3f}"


def check_fp16_skip(run: Runner) -> str:
    cfg = run.config("fp16_skip", train={"mixed_precision": "fp16", "on_nonfinite": "skip", "total_steps": 10,
                                         "ckpt_every": 10})
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
    return (f"scale set to 2^32 at step 10, 40 more steps: scaler skipped {skips}, scale now {scale:g}, trainer skips 0, "
            f"val {before['last_val_loss']:.3f} -> {after['last_val_loss']:.3f}")


def check_fsdp(run: Runner, processes: int, artifacts: str) -> str:
    cfg = run.config(artifacts, train={"mixed_precision": "bf16"}, sample_prompts=SAMPLES)
    launch = ["--config_file", str(REPO_ROOT / "launch/fsdp.yaml"), "--num_processes", str(processes)]
    first = run.run(artifacts, "--phase", "pretrain", "--config", str(cfg), launch=launch)
    expect("gradients reduced in float32" in first.stderr, "the FSDP2 precision line does not say fp32 reduction")
    again = run.run(artifacts, "--phase", "pretrain", "--config", str(cfg), "--set", "train_cfg.total_steps=30",
                    launch=launch)
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
    cfg = run.config("fused", train={"total_steps": 4, "warmup_steps": 1, "ckpt_every": 4, "eval_every": 4,
                                     "log_every": 2})
    run.run("fused", "--phase", "pretrain", "--config", str(cfg), "--device", "cpu")
    on_cpu = {g.get("fused") for g in run.optimizer_groups("fused")}
    run.run("fused", "--phase", "pretrain", "--config", str(cfg), "--set", "train_cfg.total_steps=8")
    on_gpu = {g.get("fused") for g in run.optimizer_groups("fused")}
    expect(on_gpu == {True}, f"after the resume on CUDA the AdamW groups say fused={on_gpu}")
    return f"fused {sorted(map(str, on_cpu))} on CPU -> {sorted(map(str, on_gpu))} after the resume on CUDA"


def attention_kernels(_: object = None) -> list[str]:
    """The CUDA kernels of one bf16 training step of the trainer's model, prepared by Accelerate as a run does."""
    from torch.profiler import ProfilerActivity, profile

    from trainer_accel.config import ModelConfig
    from trainer_accel.devices.accelerator import make_accelerator
    from trainer_accel.models.gpt import GPT

    acc = make_accelerator("cuda", "bf16")
    model = GPT(ModelConfig(**MODEL))
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters()))
    x = torch.randint(0, MODEL["V"], (8, MODEL["T"]), device=acc.device)
    acc.backward(model(x).float().logsumexp(-1).mean())  # warm-up: kernel selection
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        acc.backward(model(x).float().logsumexp(-1).mean())
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if re.search("flash|fmha|attention|sdpa|efficient", e.name, re.I)})


def check_flash(run: Runner) -> str:
    from trainer_accel.tools.bench import in_fresh_process

    kernels = in_fresh_process(attention_kernels, None)
    flash = [k for k in kernels if "flash" in k.lower()]
    expect(bool(flash), f"no flash kernel among the attention kernels: {kernels or 'none'}")
    return f"{flash[0][:70]}"


def check_bench(run: Runner, windows: int, out: Path, timeout: float) -> tuple[str, str, str]:
    cmd = [sys.executable, "-m", "trainer_accel.bench", "--config", str(REPO_ROOT / "configs/bench/gpt2_124m.json"),
           "--device", "cuda", "--windows", str(windows), "--json", str(out)]
    r = subprocess.run(cmd, cwd=run.workdir, capture_output=True, text=True, timeout=max(1.0, timeout), env=run.env)
    (run.workdir / "bench.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise CheckFailed(f"exit {r.returncode}: {last_error(r.stderr)} (log: bench.log)")
    f = json.loads(out.read_text())
    t = f["trainer"]
    mfu = t["mfu"]
    figures = (f"trainer {t['ms_per_step']:.1f} ms/step, {t['tokens_per_sec']:,.0f} tok/s, "
               f"MFU {100 * mfu:.1f}% of {f['peak_flops'] / 1e12:.0f} TFLOP/s ({f['peak_source']}); "
               f"trainer/plain {f['ratio']:.3f}")
    return figures, ("pass" if mfu >= 0.45 else "MISS"), f"{100 * mfu:.1f}% (plain loop {100 * f['plain loop']['mfu']:.1f}%)"


def run_tests(workers: int, log: Path) -> subprocess.Popen:
    """The CPU test suite on this machine (its conftest hides the GPU), in the background. Each test process and
    each command it starts would take a thread per core: workers x cores threads fighting for the cores."""
    threads = str(max(1, (os.cpu_count() or 2) // (2 * workers)))
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-n", str(workers), "-p", "no:cacheprovider", "tests"],
                            cwd=REPO_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": threads,
                                 "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))})


def tests_result(proc: subprocess.Popen, log: Path, started: float, timeout: float) -> Result:
    try:
        code = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        return Result("test suite on CPU (this machine)", "FAIL", f"not finished after {time.perf_counter() - started:.0f} s "
                      "(--time-limit); see tests.log")
    lines = [line for line in log.read_text().splitlines() if re.search(r"\d+ (passed|failed)", line)]
    summary = lines[-1].strip("= ") if lines else f"exit {code}"
    return Result("test suite on CPU (this machine)", "pass" if code == 0 else "FAIL",
                  f"{summary} ({time.perf_counter() - started:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="keep runs and logs here (default: a temporary dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-tests", action="store_true", help="skip the CPU test suite")
    p.add_argument("--no-bench", action="store_true", help="skip the GPT-2 small bench")
    p.add_argument("--bench-windows", type=int, default=2, help="measured bench windows (default 2)")
    p.add_argument("--time-limit", type=float, default=900.0, metavar="SECONDS",
                   help="stop waiting for the test suite and the bench when this much time has passed, so that the "
                        "table is still printed (default 900)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing was run")
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        return run_checks(args, workdir)


def run_checks(args: argparse.Namespace, workdir: Path) -> int:
    start = time.perf_counter()

    def left() -> float:
        return args.time_limit - (time.perf_counter() - start)
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    import accelerate

    print(f"gpu_check: {gpus} x {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), accelerate "
          f"{accelerate.__version__}; work dir {workdir}", flush=True)
    run = Runner(workdir, start + args.time_limit)
    subprocess.run([sys.executable, "-m", "trainer_accel.prepare", "--demo"], cwd=workdir, env=run.env, check=True,
                   capture_output=True)
    tests = None
    if not args.no_tests and (REPO_ROOT / "tests").is_dir():
        tests_started = time.perf_counter()
        # most of the suite waits on process starts, so it takes half the cores; the checks beside it need few
        tests = run_tests(max(2, (os.cpu_count() or 4) // 2), workdir / "tests.log")
    # Each chain runs its checks in order (SFT starts from the bf16 pretrain's best); the chains run at once, since
    # each check is a few small trainer processes that wait on start-up and compilation, not on the GPU. The
    # launched checks share a chain: `accelerate launch` listens on one port.
    chains = [
        [("bf16 + compile pretrain, ckpt at last step, resume", lambda: check_bf16_compile(run)),
         ("SFT bf16 + compile from that pretrain", lambda: check_sft_compile(run))],
        [("fp16, on_nonfinite stop", lambda: check_fp16_stop(run))],
        [("fp16, on_nonfinite skip, forced overflow", lambda: check_fp16_skip(run))],
        [("FSDP2 1 process: samples, resume, best.pt", lambda: check_fsdp(run, 1, "fsdp1"))]
        + ([(f"DDP across {gpus} GPUs", lambda: check_ddp(run, gpus)),
            (f"FSDP2 across {gpus} GPUs", lambda: check_fsdp(run, gpus, "fsdpN"))] if gpus >= 2 else []),
        [("fused AdamW after a resume from CPU", lambda: check_fused_after_cpu(run))],
        [("flash attention under bf16", lambda: check_flash(run))],
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(chains)) as pool:
        done = pool.map(run_chain, chains)
        results = [r for chain in done for r in chain]
    if tests is not None:  # before the bench: its timings should not share the CPU with the tests
        results.append(tests_result(tests, workdir / "tests.log", tests_started, left()))
    if not args.no_bench and (REPO_ROOT / "configs/bench/gpt2_124m.json").is_file():
        t0 = time.perf_counter()
        try:
            figures, target, mfu = check_bench(run, args.bench_windows, workdir / "bench.json", left())
            results += [Result("bench GPT-2 124M bf16 + compile, T=1024", "pass", figures),
                        Result("MFU >= 45% (trainer)", target, mfu)]
        except Exception as e:
            results.append(Result("bench GPT-2 124M bf16 + compile, T=1024", "FAIL", failure(e)))
        print(f"  {results[-1].status:<5} bench ({time.perf_counter() - t0:.0f} s)", flush=True)

    width = max(len(r.name) for r in results)
    print(f"\n{'check':<{width}}  result  figures")
    for r in results:
        print(f"{r.name:<{width}}  {r.status:<6}  {r.figures}")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "MISS")}
    print(f"\nsummary: {counts['pass']} passed, {counts['FAIL']} failed, {counts['MISS']} target(s) missed, "
          f"{time.perf_counter() - start:.0f} s on {gpus} x {name}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "gpus": gpus, "torch": torch.__version__,
                                         "results": [r.__dict__ for r in results]}, indent=2) + "\n")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
