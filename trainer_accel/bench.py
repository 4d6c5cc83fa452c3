"""Is the trainer as fast as a hand-written loop on this machine? Measured, in one run, on the same model,
batches and precision.

    python -m trainer_accel.bench --config configs/bench/cpu_4x128.json
    python -m trainer_accel.bench --config configs/bench/gpt2_124m.json --device cuda

Each loop runs in its own fresh process, so neither inherits the other's memory or warm caches: (1) the
trainer's own loop (`Trainer.fit`, with its metric sinks and trackers) and (2) a plain PyTorch loop written
below, with no Accelerate, no logging and no checkpointing. Both are timed over windows of `log_every` steps
after one warm-up window (the trainer logs, and so syncs, at each window's end; the plain loop syncs there too),
and the median window counts. Evaluation and checkpointing are timed on their own and amortised at the
config's cadence (eval_every, ckpt_every): both loops evaluate, only the trainer checkpoints. Also measured:
FLOP/s and MFU against the device's peak (a measured matmul peak on CPU, a datasheet table on GPU), checkpoint
save and load next to a plain torch.save / torch.load of the same state, peak memory, and how much faster the
data sampling is than the model consumes tokens. Figures only: timing is no test (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from .config import PhaseConfig, load_phase_config
from .data import CACHE_FORMAT, CACHE_VERSION, Cache, stream_rows
from .errors import UserError, report
from .hardware import gpu_peak_flops, measured_matmul_flops
from .paths import resolve_paths

MIB = 2**20


# -- measuring ----------------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory while a loop runs: the CUDA allocator's peak on a GPU, else resident memory sampled every 10 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, me.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int = 5, device: torch.device = torch.device("cpu"), before=None) -> float:
    """Median wall time of `fn` (device work included); `before` runs untimed ahead of each repetition."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class WindowClock:
    """A metric sink that notes the time at each progress line: the end of a window of `log_every` steps."""

    def __init__(self, log_every: int):
        self.log_every, self.ends = log_every, []

    def write(self, record: dict) -> None:
        if record["event"] == "train" and record["step"] % self.log_every == 0:
            self.ends.append((record["step"], time.perf_counter()))

    def supersede_after(self, *args) -> int:
        return 0

    def close(self) -> None:
        pass


def window_ms_per_step(ends: list[tuple[int, float]], start: float) -> list[float]:
    """ms/step of each window after the first (warm-up) one."""
    marks = [(0, start)] + ends
    return [1e3 * (t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks[1:], marks[2:])]


# -- the two loops, each run in a fresh process -------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    config: str
    phase: str
    device: str | None  # as asked (None: Accelerate's choice)
    resolved: str  # the device that choice comes to
    windows: int
    data_dir: str
    workdir: str


def _setup(job: Job):
    from .inputs import check_phase_inputs

    cfg = load_phase_config(job.config, job.phase)
    t = dataclasses.replace(cfg.train, total_steps=(job.windows + 1) * cfg.train.log_every,
                            eval_every=10**9, ckpt_every=10**9)  # measured windows hold training steps only
    cfg = dataclasses.replace(cfg, train=t)
    work = Path(job.workdir)
    paths = resolve_paths({"TRAINER_DATA_DIR": job.data_dir, "TRAINER_ARTIFACTS_DIR": str(work)})
    return cfg, paths, check_phase_inputs(cfg, paths)


def trainer_loop(job: Job) -> dict:
    """The trainer as a run uses it; afterwards its evaluation and checkpoint save/load, and torch.save/load."""
    from . import checkpoint as ckpt
    from .full_state import full_model_state, full_optimizer_state
    from .loop import Trainer
    from .run import make_accelerator

    cfg, paths, inputs = _setup(job)
    acc = make_accelerator(job.device, cfg.train.mixed_precision)
    trainer = Trainer(acc, cfg, inputs.strategy, paths, data_info=inputs.data_info(), tokenizer=inputs.decoder())
    clock = WindowClock(cfg.train.log_every)
    trainer.events.sinks.append(clock)
    with PeakMemory(acc.device) as memory:
        start = time.perf_counter()
        trainer.fit()
    trainer.events.sinks = []  # fit() closed them; the timings below log nothing
    out = {"window_ms": window_ms_per_step(clock.ends, start), "peak_memory": memory.peak,
           "eval_s": median_seconds(trainer.evaluate, device=acc.device)}

    # checkpoints: what the loop pays (gather, CPU snapshot) and until the background write is durable (written,
    # fsynced, hashed, published as latest), vs torch.save of the same state
    out["save_s"] = median_seconds(lambda: trainer.save(to_step_dir=True, to_best=False), before=trainer.wait_for_save)
    trainer.wait_for_save()
    out["save_durable_s"] = median_seconds(lambda: (trainer.save(to_step_dir=True, to_best=False), trainer.wait_for_save()))
    step_dir = paths.phase_dir(cfg.phase) / ckpt.step_dir_name(trainer.state.step)
    out["ckpt_bytes"] = sum((step_dir / f).stat().st_size for f in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE))
    out["load_s"] = median_seconds(lambda: ckpt.load_checkpoint(step_dir))
    state = {"model": full_model_state(acc, trainer.model), "optimizer": full_optimizer_state(acc, trainer.model, trainer.optimizer)}
    plain = Path(job.workdir) / "plain.pt"
    out["torch_save_s"] = median_seconds(lambda: torch.save(state, plain))
    out["torch_save_fsync_s"] = median_seconds(lambda: _save_and_fsync(state, plain))
    out["torch_load_s"] = median_seconds(lambda: torch.load(plain, map_location="cpu", weights_only=True))
    out["torch_bytes"] = plain.stat().st_size
    return out


def _save_and_fsync(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def plain_loop(job: Job) -> dict:
    """What a user would write by hand with the same model, optimizer settings, batches and precision."""
    from .model import GPT

    cfg, _, inputs = _setup(job)
    device, t, strategy = torch.device(job.resolved), cfg.train, inputs.strategy
    torch.manual_seed(t.seed)
    model = GPT(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=t.base_lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if t.compile else model
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision or "no")
    scaler = torch.amp.GradScaler(device.type, enabled=half is torch.float16)

    def to_device(a: torch.Tensor) -> torch.Tensor:
        return a.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else a

    def loss_of(batch) -> torch.Tensor:
        x, y = to_device(batch.x), to_device(strategy.targets(batch))
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            logits = fwd(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)

    ends, start = [], time.perf_counter()
    with PeakMemory(device) as memory:
        for step in range(t.total_steps):
            for m in range(t.accum_steps):
                loss = loss_of(strategy.train_batch(step, m, 0, 1, t.accum_steps)) / t.accum_steps
                scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % t.log_every == 0:
                loss.item()  # the one sync per window, as a hand-written loop prints its loss
                ends.append((step + 1, time.perf_counter()))

    @torch.no_grad()
    def evaluate() -> None:
        fwd.eval()
        total = sum(loss_of(strategy.val_batch(j)) for j in range(t.eval_batches))
        fwd.train()
        total.item()

    return {"window_ms": window_ms_per_step(ends, start), "peak_memory": memory.peak,
            "eval_s": median_seconds(evaluate, device=device)}


def _quiet() -> None:
    os.environ["WANDB_SILENT"] = "true"  # the offline wandb run's summary would bury the table


def merge_rounds(results: list[dict]) -> dict:
    """Windows of all rounds together; every other figure as the median over rounds (memory: the highest)."""
    merged = {k: statistics.median(r[k] for r in results) for k in results[0] if k not in ("window_ms", "peak_memory")}
    merged["window_ms"] = [w for r in results for w in r["window_ms"]]
    merged["peak_memory"] = max(r["peak_memory"] for r in results)
    return merged


def in_fresh_process(fn, job: Job) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_quiet) as pool:
        return pool.submit(fn, job).result()


# -- data ---------------------------------------------------------------------------------------------------------

def sampling_tokens_per_sec(config: str, phase: str, data_dir: Path, steps: int = 200) -> float:
    """Tokens/s the strategy produces on one process (batches drawn, nothing trained)."""
    from .inputs import check_phase_inputs

    cfg = load_phase_config(config, phase)
    paths = dataclasses.replace(resolve_paths(), data=data_dir)
    strategy, t = check_phase_inputs(cfg, paths).strategy, cfg.train
    start = time.perf_counter()
    for step in range(steps):
        for m in range(t.accum_steps):
            strategy.train_batch(step, m, 0, 1, t.accum_steps)
    return steps * t.B * t.accum_steps * cfg.seq_len / (time.perf_counter() - start)


class OneMapCache(Cache):
    """The control for big_cache_rss: one memmap kept for the whole run, as a naive loader would."""

    @property
    def tokens(self) -> np.ndarray:
        if "_held" not in self.__dict__:
            self.__dict__["_held"] = np.memmap(self.path, dtype=np.uint16, mode="r")
        return self.__dict__["_held"]


def big_cache_rss(gb: float, workdir: Path, batches: int = 20000, B: int = 16, T: int = 128) -> dict:
    """Resident memory while drawing batches from a cache of `gb` GB: the trainer's per-batch map vs one
    long-lived memmap (the control that shows what is being avoided)."""
    path = workdir / "big_train.bin"
    n = int(gb * 2**30) // 2
    with open(path, "wb") as f:
        rng = np.random.default_rng(0)
        for first in range(0, n, 1 << 26):
            f.write(rng.integers(0, 256, min(1 << 26, n - first), dtype=np.uint16).tobytes())
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "kind": "stream", "dtype": "uint16", "num_tokens": n}
    cache, probs, me = Cache(path=path, meta=meta, starts=None), np.ones(1), psutil.Process()

    def draw(caches) -> tuple[int, int]:
        before = me.memory_info().rss
        peak = before
        for i in range(batches):
            stream_rows(caches, probs, np.random.default_rng([1, i]), B, T)
            if i % 500 == 0:
                peak = max(peak, me.memory_info().rss)
        return before, max(peak, me.memory_info().rss)

    ours = draw([cache])
    control = draw([OneMapCache(path=path, meta=meta, starts=None)])
    path.unlink()
    return {"gb": gb, "batches": batches, "trainer_rss": ours, "persistent_map_rss": control}


# -- report -------------------------------------------------------------------------------------------------------

def flops_per_token(cfg: PhaseConfig) -> float:
    """6N for the weights' matmuls (forward and backward) plus the attention scores, as in the PaLM paper and
    nanoGPT; N leaves out the position embeddings, which are looked up, not multiplied."""
    m = cfg.model
    n = m.V * m.C + m.L * (4 * m.C * m.C + 2 * m.C * m.d_ff)  # token embedding = tied output layer, blocks
    return 6 * n + 12 * m.L * m.C * cfg.seq_len


def fmt_bytes(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a pretrain or sft config (model, batch, precision, cadence)")
    p.add_argument("--phase", choices=("pretrain", "sft"), default="pretrain")
    p.add_argument("--device", choices=("cpu", "mps", "cuda"), default=None)
    p.add_argument("--windows", type=int, default=3, help="measured windows of log_every steps per round (after 1 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="times each loop runs, alternating, in a fresh process")
    p.add_argument("--big-cache-gb", type=float, default=0.0, help="also show resident memory on a cache this big")
    p.add_argument("--json", type=Path, default=None, help="write every figure here as JSON")
    args = p.parse_args(argv)
    try:
        return run_bench(args)
    except UserError as e:
        return report(e)


def run_bench(args: argparse.Namespace) -> int:
    cfg = load_phase_config(args.config, args.phase)
    data_dir = resolve_paths().data
    t = cfg.train
    device = torch.device("cuda" if args.device == "cuda" or (args.device is None and torch.cuda.is_available()) else
                          "mps" if args.device == "mps" else "cpu")
    precision = t.mixed_precision or "no"
    with tempfile.TemporaryDirectory(prefix="trainer_bench_") as tmp:
        jobs = {name: Job(str(args.config), args.phase, args.device, str(device), args.windows, str(data_dir), str(Path(tmp) / name))
                for name in ("trainer", "plain")}
        print(f"bench: {cfg.path} ({args.phase}), {args.rounds} rounds x {args.windows} windows of {t.log_every} steps "
              f"after 1 warm-up; "
              f"{device}, precision {precision}, compile {t.compile}, {torch.get_num_threads()} CPU threads", flush=True)
        # a shared machine's speed drifts: the loops alternate, and the CPU peak is the best of measurements
        # taken before, between and after them
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peaks, rounds = [], {"plain": [], "trainer": []}
        for _ in range(args.rounds):
            if device.type == "cpu":
                peaks.append(measured_matmul_flops(device, dtype))
            for name, fn in (("plain", plain_loop), ("trainer", trainer_loop)):
                rounds[name].append(in_fresh_process(fn, jobs[name]))
        plain, ours = merge_rounds(rounds["plain"]), merge_rounds(rounds["trainer"])
        if device.type == "cuda":
            peak, peak_src = gpu_peak_flops(device, precision)
        else:
            peak = max(peaks + [measured_matmul_flops(device, dtype)])
            peak_src = f"best of {len(peaks) + 1} measured {dtype} matmul peaks on {device}"
        sampled = sampling_tokens_per_sec(str(args.config), args.phase, data_dir)
        big = big_cache_rss(args.big_cache_gb, Path(tmp)) if args.big_cache_gb > 0 else None

    tokens_per_step = t.B * t.accum_steps * cfg.seq_len
    per_token = flops_per_token(cfg)
    rows, figures = [], {"config": str(cfg.path), "device": str(device), "precision": precision, "compile": t.compile,
                         "threads": torch.get_num_threads(), "peak_flops": peak, "peak_source": peak_src}
    for name, r in (("plain loop", plain), ("trainer", ours)):
        train_ms = statistics.median(r["window_ms"])
        eval_ms = 1e3 * r["eval_s"] / t.eval_every
        ckpt_ms = 1e3 * r.get("save_s", 0.0) / t.ckpt_every
        total = train_ms + eval_ms + ckpt_ms
        achieved = per_token * tokens_per_step / (train_ms / 1e3)
        figures[name] = {**r, "train_ms": train_ms, "eval_ms_amortised": eval_ms, "ckpt_ms_amortised": ckpt_ms,
                         "ms_per_step": total, "tokens_per_sec": tokens_per_step / (total / 1e3),
                         "flops": achieved, "mfu": achieved / peak if peak else None}
        rows.append((name, figures[name]))

    a, b = figures["plain loop"], figures["trainer"]
    ratio = b["ms_per_step"] / a["ms_per_step"]
    print(f"\n{'loop':<12}{'train ms':>10}{'+eval':>8}{'+ckpt':>8}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'peak mem':>13}  windows (ms/step)")
    for name, f in rows:
        mfu = "-" if f["mfu"] is None else f"{100 * f['mfu']:.1f}%"
        print(f"{name:<12}{f['train_ms']:>10.2f}{f['eval_ms_amortised']:>8.2f}{f['ckpt_ms_amortised']:>8.2f}"
              f"{f['ms_per_step']:>10.2f}{f['tokens_per_sec']:>12,.0f}{f['flops'] / 1e12:>9.3f}{mfu:>7}"
              f"{fmt_bytes(f['peak_memory']):>13}  {', '.join(f'{w:.1f}' for w in f['window_ms'])}")
    print(f"peak FLOP/s {peak / 1e12 if peak else float('nan'):.3f} T ({peak_src}); "
          f"{per_token / 1e6:.2f} MFLOP/token, {tokens_per_step:,} tokens/step; eval every {t.eval_every}, "
          f"checkpoint every {t.ckpt_every} steps")
    mb = ours["ckpt_bytes"] / 1e6
    print(f"checkpoint {mb:.1f} MB: save {ours['save_s']:.3f} s ({mb / ours['save_s']:.0f} MB/s; until durable "
          f"{ours['save_durable_s']:.3f} s, {mb / ours['save_durable_s']:.0f} MB/s, in the background) vs torch.save "
          f"{ours['torch_save_s']:.3f} s ({ours['torch_bytes'] / 1e6 / ours['torch_save_s']:.0f} MB/s; with fsync "
          f"{ours['torch_save_fsync_s']:.3f} s); load {ours['load_s']:.3f} s vs torch.load {ours['torch_load_s']:.3f} s")
    consumed = b["tokens_per_sec"]
    print(f"data sampling {sampled:,.0f} tokens/s, {sampled / consumed:.0f}x what the trainer consumes")
    if big:
        for label, key in (("trainer (map per batch)", "trainer_rss"), ("control (one long-lived map)", "persistent_map_rss")):
            before, after = big[key]
            print(f"{big['gb']:g} GB cache, {big['batches']:,} batches, {label}: resident {fmt_bytes(before)} -> peak "
                  f"{fmt_bytes(after)} (+{fmt_bytes(after - before)})")
    targets = [
        ("trainer / plain step time <= 1.02", ratio <= 1.02, f"{ratio:.3f}"),
        ("checkpoint save (loop pays) <= 1.2x torch.save", ours["save_s"] <= 1.2 * ours["torch_save_s"],
         f"{ours['save_s'] / ours['torch_save_s']:.2f}x"),
        ("checkpoint load <= torch.load", ours["load_s"] <= ours["torch_load_s"], f"{ours['load_s'] / ours['torch_load_s']:.2f}x"),
        ("data sampling >= 20x consumption", sampled >= 20 * consumed, f"{sampled / consumed:.0f}x"),
        ("trainer peak memory within 10% of plain", b["peak_memory"] <= 1.1 * a["peak_memory"],
         f"{b['peak_memory'] / a['peak_memory']:.3f}x"),
    ]
    if b["mfu"] is not None:
        goal = 0.45 if device.type == "cuda" else 0.50
        targets.append((f"trainer MFU >= {goal:.0%}", b["mfu"] >= goal, f"{100 * b['mfu']:.1f}%"))
    print()
    for label, ok, value in targets:
        print(f"{'met ' if ok else 'MISS'}  {label}: {value}")
    figures.update(ratio=ratio, sampling_tokens_per_sec=sampled, big_cache=big,
                   targets={label: {"met": ok, "value": value} for label, ok, value in targets})
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
