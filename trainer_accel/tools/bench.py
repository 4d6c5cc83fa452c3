"""Is the trainer as fast as a hand-written loop on this machine? Measured, in one run, on the same model,
batches and precision.

    python -m trainer_accel.bench --config configs/bench/cpu_4x128.json
    python -m trainer_accel.bench --config configs/bench/gpt2_124m.json --device cuda

Step time is measured in a paired run: one fresh process runs the trainer's own loop (`Trainer.fit`, with its
metric sinks and trackers) and, interleaved with it, a plain PyTorch loop written below (no Accelerate, no
logging, no checkpointing), so both see the machine at the same moments (see `Pacer`). Each window of
`log_every` trainer steps after a warm-up window is compared with the plain steps run inside it; the median
over windows counts. Evaluation (paired batch by batch) and checkpointing (the trainer's) are timed after
training and amortised at the config's cadence (eval_every, ckpt_every). Also measured: FLOP/s and MFU against the
device's peak (a matmul peak measured in each window on CPU, a datasheet table on GPU), checkpoint save and load next to
a plain torch.save / torch.load of the same state, the peak memory of each loop alone in a fresh process, and
how much faster the data sampling is than the model consumes tokens. Figures only: timing is no test (shared
machines are noisy).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from trainer_accel.config import PhaseConfig
from trainer_accel.data.cache import CACHE_FORMAT, CACHE_VERSION, Cache, stream_rows
from trainer_accel.devices.accelerator import HALF_PRECISION, pick_device
from trainer_accel.devices.hardware import gpu_peak_flops, measured_matmul_flops
from trainer_accel.experiments.plan import flops_per_token
from trainer_accel.paths import resolve_paths
from trainer_accel.phases.registry import load_config, phase_named
from trainer_accel.training.losses import token_cross_entropy

MIB = 2**20


# -- measuring ----------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory while a loop runs: the CUDA allocator's peak on a GPU, else resident memory sampled every 10 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
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
    """Wait for the device's queued work, so that a timer reads the work done, not the work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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


# -- the plain loop -----------------------------------------------------------------------------------------------


class PlainLoop:
    """What a user would write by hand with the same model, optimizer settings, batches and precision: no
    Accelerate, no logging, no checkpoints."""

    def __init__(self, cfg: PhaseConfig, batches, device: torch.device):
        from trainer_accel.models.build import build_model

        self.t, self.batches, self.device = cfg.train, batches, device
        t = self.t
        if device.type == "cuda":  # as the trainer sets them
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
        torch.manual_seed(t.seed)
        # the same blocks recomputed as the trainer's
        self.model = build_model(cfg.model, device, activation_checkpointing=t.activation_checkpointing)
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.base_lr,
            betas=(t.beta1, t.beta2),
            weight_decay=t.weight_decay,
            fused=device.type == "cuda",
        )
        self.half = HALF_PRECISION.get(t.mixed_precision or "no")
        self.forward_loss = torch.compile(self._forward_loss) if t.compile else self._forward_loss  # as nanoGPT
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.half is torch.float16)
        self.last_loss: torch.Tensor | None = None

    def _to_device(self, a: torch.Tensor) -> torch.Tensor:
        return a.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else a

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.half or torch.float32, enabled=self.half is not None):
            logits = self.model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)

    def _loss(self, batch) -> torch.Tensor:
        return self.forward_loss(self._to_device(batch.x), self._to_device(batch.y_masked))

    def step(self, step: int) -> None:
        t = self.t
        for m in range(t.accum_steps):
            loss = self._loss(self.batches.train_batch(step, m, 0, 1, t.accum_steps)) / t.accum_steps
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss

    def sync(self) -> None:
        """The one sync a hand-written loop makes: reading its loss to print it."""
        if self.last_loss is not None:
            self.last_loss.item()

    @torch.no_grad()
    def eval_batch(self, index: int) -> torch.Tensor:
        self.model.eval()
        loss = self._loss(self.batches.val_batch(index))
        self.model.train()
        return loss


# -- the paired run: both loops in one process, interleaved -------------------------------------------------------


class Pacer:
    """The trainer's batches, which also runs the plain loop between the trainer's steps.

    A shared machine's speed drifts within seconds (windows of one loop vary by 30% here), so two loops timed
    one after the other, or in two processes, differ by more than the overhead being measured. Here the plain
    loop runs between the trainer's steps and each window of `log_every` trainer steps is compared with the plain
    steps run inside it: both see the same machine at the same moments. `interleave="step"` (the default on CPU)
    alternates the two step by step. `"window"` (the default on a GPU) runs a window's worth of plain steps
    mid-window with the device synchronised around them, so the trainer's steps stay asynchronous (one drain of
    its queue per window). On CPU a matmul peak is measured mid-window too, for that window's MFU. Evaluation
    is paired batch by batch. Time spent here is excluded from the trainer's timings.
    """

    def __init__(self, batches, device: torch.device, cfg: PhaseConfig, interleave: str | None = None):
        self.batches, self.device, self.log_every = batches, device, cfg.train.log_every
        self.plain = PlainLoop(cfg, batches, device)
        self.interleave = interleave or default_interleave(device)
        self.chunk = 1 if self.interleave == "step" else self.log_every
        self.plain_step = 0
        self.plain_s = self.plain_eval_s = self.excluded_s = 0.0
        self.peaks: list[tuple[int, float]] = []  # (trainer step, measured matmul FLOP/s)

    def __getattr__(self, name: str):
        return getattr(self.batches, name)

    def train_batch(self, step: int, micro: int, rank: int, world: int, accum: int):
        if micro == 0 and (self.chunk == 1 or step % self.log_every == self.log_every // 2):
            self._interlude(step)
        return self.batches.train_batch(step, micro, rank, world, accum)

    def val_batch(self, index: int):
        """Evaluation is paired batch by batch: the plain loop's forward on the same batch first."""
        self.plain_eval_s += self._excluded(lambda: self.plain.eval_batch(index))
        return self.batches.val_batch(index)

    def _interlude(self, step: int) -> None:
        if self.device.type == "cpu" and step % self.log_every == self.log_every // 2:
            self._excluded(
                lambda: self.peaks.append(
                    (step, measured_matmul_flops(self.device, self.plain.half or torch.float32, seconds=0.6))
                )
            )
        self.plain_s += self._excluded(self._plain_steps)

    def _plain_steps(self) -> None:
        for _ in range(self.chunk):
            self.plain.step(self.plain_step)
            self.plain_step += 1
        self.plain.sync()

    def _excluded(self, work) -> float:
        """Run `work` between device syncs (the trainer's queued work stays the trainer's); its seconds are
        left out of the trainer's timings."""
        sync(self.device)
        start = time.perf_counter()
        work()
        sync(self.device)
        spent = time.perf_counter() - start
        self.excluded_s += spent
        return spent


def default_interleave(device: torch.device) -> str:
    return "step" if device.type == "cpu" else "window"


def background_cpu_s() -> float:
    """CPU seconds used so far by the processes this one started (the wandb service, for one)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


class WindowClock:
    """A metric sink that notes, at each progress line (the end of a window of `log_every` steps), the time and
    the pacer's counters."""

    def __init__(self, log_every: int, pacer: Pacer | None = None):
        self.log_every, self.pacer, self.marks = log_every, pacer, []
        self.mark(0)

    def mark(self, step: int) -> None:
        p = self.pacer
        self.marks.append(
            {
                "step": step,
                "t": time.perf_counter(),
                "excluded_s": p.excluded_s if p else 0.0,
                "plain_s": p.plain_s if p else 0.0,
                "plain_steps": p.plain_step if p else 0,
                "background_cpu_s": background_cpu_s(),
            }
        )

    def write(self, record: dict) -> None:
        if record["event"] == "train" and record["step"] % self.log_every == 0:
            self.mark(record["step"])

    def supersede_after(self, *args) -> int:
        return 0

    def close(self) -> None:
        pass

    def windows(self) -> list[dict]:
        """Each window after the first (warm-up) one: trainer ms/step and, when paired, plain ms/step."""
        out = []
        for a, b in zip(self.marks[1:], self.marks[2:]):
            steps, wall = b["step"] - a["step"], b["t"] - a["t"]
            w = {
                "trainer_ms": 1e3 * (wall - (b["excluded_s"] - a["excluded_s"])) / steps,
                "background_cpu": (b["background_cpu_s"] - a["background_cpu_s"]) / wall,
            }
            if self.pacer is not None:
                w["steps"], w["plain_steps"] = steps, b["plain_steps"] - a["plain_steps"]
                w["plain_ms"] = 1e3 * (b["plain_s"] - a["plain_s"]) / max(1, w["plain_steps"])
                w["peak_flops"] = next((f for s, f in self.pacer.peaks if a["step"] <= s < b["step"]), None)
            out.append(w)
        return out


# -- the runs, each in a fresh process ---------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    config: str
    phase: str
    device: str | None  # as asked (None: Accelerate's choice)
    resolved: str  # the device that choice comes to
    windows: int
    data_dir: str
    workdir: str
    interleave: str | None = None  # paired run: "step" or "window" (None: the device's default)


def _setup(job: Job):
    from trainer_accel.training.inputs import check_phase_inputs

    cfg = load_config(job.config, job.phase)
    t = dataclasses.replace(
        cfg.train, total_steps=(job.windows + 1) * cfg.train.log_every, eval_every=10**9, ckpt_every=10**9
    )  # measured windows hold training steps only
    cfg = dataclasses.replace(cfg, train=t)
    work = Path(job.workdir)
    paths = resolve_paths({"TRAINER_DATA_DIR": job.data_dir, "TRAINER_ARTIFACTS_DIR": str(work)})
    return cfg, paths, check_phase_inputs(cfg, paths)


def _trainer(job: Job, wrap=None):
    """The trainer as a run sets it up; `wrap(batches, device, cfg)` may stand in for its batches."""
    from trainer_accel.devices.accelerator import make_accelerator
    from trainer_accel.training.loop import Trainer, build_optimizer
    from trainer_accel.training.start import StartPoint, model_for

    cfg, paths, inputs = _setup(job)
    acc = make_accelerator(job.device, cfg.train.mixed_precision)
    batches = wrap(inputs.batches, acc.device, cfg) if wrap else inputs.batches
    phase, model = phase_named(cfg.phase), model_for(cfg, StartPoint())
    optimizer = build_optimizer(model, cfg.train, acc.device)
    trainer = Trainer(
        acc, cfg, phase, batches, paths, model, optimizer, data_info=inputs.data_info(), chat=inputs.chat_format()
    )
    return trainer, cfg, paths


def paired_run(job: Job) -> dict:
    """Both loops interleaved: step time per window, then evaluation (paired batch by batch) and the trainer's
    checkpoints."""
    from trainer_accel.checkpoints import layout, loading
    from trainer_accel.checkpoints.full_state import (
        full_model_state,
        full_optimizer_state,
    )

    trainer, cfg, paths = _trainer(job, wrap=functools.partial(Pacer, interleave=job.interleave))
    pacer: Pacer = trainer.batches
    acc = trainer.acc
    clock = WindowClock(cfg.train.log_every, pacer)
    trainer.events.sinks.append(clock)
    trainer.fit()
    trainer.events.sinks = []  # fit() closed them; the timings below log nothing
    out = {"windows": clock.windows()}
    # evaluation, paired batch by batch (see Pacer.val_batch): the trainer's pass less the plain loop's batches in it
    passes = []
    for _ in range(3):
        excluded, plain_eval = pacer.excluded_s, pacer.plain_eval_s
        wall = median_seconds(trainer.evaluate, repeats=1, device=acc.device)
        passes.append((wall - (pacer.excluded_s - excluded), pacer.plain_eval_s - plain_eval))
    plain_eval = statistics.median(p for _, p in passes)
    out["eval_ratio"] = statistics.median(t / p for t, p in passes)
    out["eval_s"] = {"trainer": plain_eval * out["eval_ratio"], "plain": plain_eval}

    # checkpoints: what the loop pays (gather, CPU snapshot) and until the background write is durable (written,
    # fsynced, hashed, published as latest), vs torch.save of the same state
    out["save_s"] = median_seconds(lambda: trainer.save(to_step_dir=True, to_best=False), before=trainer.wait_for_save)
    trainer.wait_for_save()
    out["save_durable_s"] = median_seconds(
        lambda: (trainer.save(to_step_dir=True, to_best=False), trainer.wait_for_save())
    )
    step_dir = paths.phase_dir(cfg.phase) / layout.step_dir_name(trainer.state.step)
    out["ckpt_bytes"] = sum((step_dir / f).stat().st_size for f in (layout.MODEL_FILE, layout.OPTIMIZER_FILE))
    out["load_s"] = median_seconds(lambda: loading.load_checkpoint(step_dir))
    state = {
        "model": full_model_state(acc, trainer.model)[0],  # each tied tensor once, as the checkpoint holds it
        "optimizer": full_optimizer_state(acc, trainer.model, trainer.optimizer),
    }
    plain_file = Path(job.workdir) / "plain.pt"
    out["torch_save_s"] = median_seconds(lambda: torch.save(state, plain_file))
    out["torch_save_fsync_s"] = median_seconds(lambda: _save_and_fsync(state, plain_file))
    out["torch_load_s"] = median_seconds(lambda: torch.load(plain_file, map_location="cpu", weights_only=True))
    out["torch_bytes"] = plain_file.stat().st_size
    return out


def _save_and_fsync(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def trainer_alone(job: Job) -> dict:
    """The trainer's fit alone in this process: its peak memory, and its windows as a cross-check."""
    trainer, cfg, _ = _trainer(job)
    clock = WindowClock(cfg.train.log_every)
    trainer.events.sinks.append(clock)
    with PeakMemory(trainer.acc.device) as memory:
        trainer.fit()
    return {"peak_memory": memory.peak, "window_ms": [w["trainer_ms"] for w in clock.windows()]}


def plain_alone(job: Job) -> dict:
    """The plain loop alone in this process, as `trainer_alone`."""
    cfg, _, inputs = _setup(job)
    device, t = torch.device(job.resolved), cfg.train
    plain = PlainLoop(cfg, inputs.batches, device)
    marks = [(0, time.perf_counter())]
    with PeakMemory(device) as memory:
        for step in range(t.total_steps):
            plain.step(step)
            if (step + 1) % t.log_every == 0:
                plain.sync()
                marks.append((step + 1, time.perf_counter()))
    window_ms = [1e3 * (t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks[1:], marks[2:])]
    return {"peak_memory": memory.peak, "window_ms": window_ms}


def _quiet() -> None:
    os.environ["WANDB_SILENT"] = "true"  # the offline wandb run's summary would bury the table


def in_fresh_process(fn, job: Job) -> dict:
    return in_fresh_processes([(fn, job)])[0]


def in_fresh_processes(calls: list[tuple], together: bool = False) -> list[dict]:
    """Each `fn(job)` in a fresh process of its own, one after the other or all at once."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=len(calls) if together else 1, mp_context=ctx, initializer=_quiet
    ) as pool:
        futures = [pool.submit(fn, job) for fn, job in calls]
        return [f.result() for f in futures]


# -- data ---------------------------------------------------------------------------------------------------------


def sampling_tokens_per_sec(config: str, phase: str, data_dir: Path, steps: int = 200) -> float:
    """Tokens/s the batches produces on one process (batches drawn, nothing trained)."""
    from trainer_accel.training.inputs import check_phase_inputs

    cfg = load_config(config, phase)
    paths = dataclasses.replace(resolve_paths(), data=data_dir)
    batches, t = check_phase_inputs(cfg, paths).batches, cfg.train
    start = time.perf_counter()
    for step in range(steps):
        for m in range(t.accum_steps):
            batches.train_batch(step, m, 0, 1, t.accum_steps)
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


def fmt_bytes(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def packing_bench(args: argparse.Namespace, steps: int = 10) -> int:
    """One model trained on the config's SFT rows, alternately unpacked and packed, window by window (so both see
    the machine at the same moments); answer tokens per second of each, and their ratio. Replay is left out:
    its stream rows would be the same in both."""
    from trainer_accel.models.build import build_model
    from trainer_accel.training.inputs import check_phase_inputs

    cfg = load_config(args.config, "sft")
    device = pick_device(args.device)
    paths = resolve_paths()
    by_packing = {
        pack: check_phase_inputs(
            dataclasses.replace(cfg, replay={}, train=dataclasses.replace(cfg.train, pack=pack)), paths
        ).batches
        for pack in (False, True)
    }
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.min_lr)
    counted, seconds = {False: 0, True: 0}, {False: 0.0, True: 0.0}
    for window in range(args.windows + 1):  # window 0 warms up
        for pack, batches in by_packing.items():
            sync(device)
            start = time.perf_counter()
            n = torch.zeros((), device=device)
            for i in range(steps):
                batch = batches.train_batch(window * steps + i, 0, 0, 1, 1).to(device)
                total, count, _ = token_cross_entropy(model, batch)
                (total / count.clamp_min(1)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n += count
            sync(device)
            if window:
                counted[pack] += int(n)
                seconds[pack] += time.perf_counter() - start
    t = cfg.train
    print(
        f"packing bench: {cfg.path}; {device}, T={cfg.seq_len}, B={t.B}, {args.windows} windows of {steps} steps "
        "each way"
    )
    for pack in (False, True):
        print(
            f"  {'packed' if pack else 'one example per row':22} {counted[pack] / seconds[pack]:>10,.0f} answer "
            "tokens/s"
            f"  ({counted[pack] / (args.windows * steps * t.B):.1f} per row)"
        )
    ratio = (counted[True] / seconds[True]) / (counted[False] / seconds[False])
    print(f"  packed / unpacked: {ratio:.2f}x (target >= 2x)")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.phase)
    data_dir = resolve_paths().data
    t = cfg.train
    device = pick_device(args.device)
    precision = t.mixed_precision or "no"
    alone_windows = min(args.windows, 2)
    print(
        f"bench: {cfg.path} ({args.phase}); {device}, precision {precision}, compile {t.compile}, "
        f"{torch.get_num_threads()} CPU threads; both loops interleaved "
        f"({args.interleave or default_interleave(device)}"
        f" by {args.interleave or default_interleave(device)}) in one process over {args.windows} windows "
        f"of {t.log_every} steps after 1 warm-up, then each alone in a fresh process for its peak memory",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="trainer_bench_") as tmp:

        def job(name: str, windows: int) -> Job:
            return Job(
                str(args.config),
                args.phase,
                args.device,
                str(device),
                windows,
                str(data_dir),
                str(Path(tmp) / name),
                args.interleave,
            )

        paired = in_fresh_process(paired_run, job("paired", args.windows))
        # a GPU's allocator peak is per process, so on a GPU both measure at once (each compiles the model anew:
        # a minute saved on GPT-2 small); their step times then shared the GPU and are left out
        together = device.type == "cuda"
        alone = dict(
            zip(
                ("trainer", "plain loop"),
                in_fresh_processes(
                    [(trainer_alone, job("trainer", alone_windows)), (plain_alone, job("plain", alone_windows))],
                    together,
                ),
            )
        )
        if together:
            for a in alone.values():
                a["window_ms"] = []
        sampled = sampling_tokens_per_sec(str(args.config), args.phase, data_dir)
        big = big_cache_rss(args.big_cache_gb, Path(tmp)) if args.big_cache_gb > 0 else None

    windows = paired["windows"]
    if device.type == "cuda":
        datasheet, peak_src = gpu_peak_flops(device, precision, t.tf32)
        for w in windows:
            w["peak_flops"] = datasheet
    else:
        peak_src = f"{'bf16' if precision == 'bf16' else 'fp32'} matmul peak measured on {device} in each window"
    tokens_per_step = t.B * t.accum_steps * cfg.seq_len
    flops_per_step = flops_per_token(cfg) * tokens_per_step
    eval_ms = {
        name: 1e3 * paired["eval_s"][key] / t.eval_every
        for name, key in (("plain loop", "plain"), ("trainer", "trainer"))
    }
    ckpt_ms = {"plain loop": 0.0, "trainer": 1e3 * paired["save_s"] / t.ckpt_every}
    for w in windows:  # each window's whole step time, its ratio and MFU
        w["plain_total_ms"] = w["plain_ms"] + eval_ms["plain loop"]
        w["trainer_total_ms"] = w["trainer_ms"] + eval_ms["trainer"] + ckpt_ms["trainer"]
        w["ratio"] = w["trainer_total_ms"] / w["plain_total_ms"]
        for name, key in (("plain", "plain_ms"), ("trainer", "trainer_ms")):
            w[f"{name}_mfu"] = flops_per_step / (w[key] / 1e3) / w["peak_flops"] if w["peak_flops"] else None

    def median_of(key: str) -> float | None:
        values = [w[key] for w in windows if w[key] is not None]
        return statistics.median(values) if values else None

    figures = {
        "config": str(cfg.path),
        "device": str(device),
        "precision": precision,
        "compile": t.compile,
        "threads": torch.get_num_threads(),
        "peak_flops": median_of("peak_flops"),
        "peak_source": peak_src,
        "interleave": args.interleave or default_interleave(device),
        "windows": windows,
    }
    for name, key in (("plain loop", "plain"), ("trainer", "trainer")):
        train_ms = median_of(f"{key}_ms")
        total = median_of(f"{key}_total_ms")
        alone_ms = statistics.median(alone[name]["window_ms"]) if alone[name]["window_ms"] else None
        figures[name] = {
            "train_ms": train_ms,
            "eval_ms_amortised": eval_ms[name],
            "ckpt_ms_amortised": ckpt_ms[name],
            "ms_per_step": total,
            "tokens_per_sec": tokens_per_step / (total / 1e3),
            "flops": flops_per_step / (train_ms / 1e3),
            "mfu": median_of(f"{key}_mfu"),
            "eval_s": paired["eval_s"][key],
            "peak_memory": alone[name]["peak_memory"],
            "alone_window_ms": alone[name]["window_ms"],
            "alone_train_ms": alone_ms,
        }
    figures["trainer"].update({k: v for k, v in paired.items() if k not in ("windows", "eval_s", "eval_ratio")})
    figures["eval_ratio"] = paired["eval_ratio"]
    a, b = figures["plain loop"], figures["trainer"]
    ratios = [w["ratio"] for w in windows]
    ratio = statistics.median(ratios)

    print(
        f"\n{'loop':<12}{'train ms':>10}{'+eval':>8}{'+ckpt':>8}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>9}"
        f"{'MFU':>7}{'peak mem':>13}"
    )
    for name in ("plain loop", "trainer"):
        f = figures[name]
        mfu = "-" if f["mfu"] is None else f"{100 * f['mfu']:.1f}%"
        print(
            f"{name:<12}{f['train_ms']:>10.2f}{f['eval_ms_amortised']:>8.2f}{f['ckpt_ms_amortised']:>8.2f}"
            f"{f['ms_per_step']:>10.2f}{f['tokens_per_sec']:>12,.0f}{f['flops'] / 1e12:>9.3f}{mfu:>7}"
            f"{fmt_bytes(f['peak_memory']):>13}"
        )
    print("paired windows (trainer / plain train ms/step, ratio with eval and checkpoint amortised):")
    print("  " + ", ".join(f"{w['trainer_ms']:.1f}/{w['plain_ms']:.1f} {w['ratio']:.3f}" for w in windows))
    if a["alone_train_ms"] and b["alone_train_ms"]:
        print(
            f"each loop alone in its own process (the memory runs, unpaired: the machine's drift shows): trainer "
            f"{b['alone_train_ms']:.1f}, plain loop {a['alone_train_ms']:.1f} ms/step"
        )
    peak = figures["peak_flops"]
    print(
        f"evaluation ({t.eval_batches} batches, paired batch by batch): plain loop {a['eval_s']:.3f} s, trainer/plain "
        f"{paired['eval_ratio']:.3f} (median of 3 passes)"
    )
    print(
        f"peak FLOP/s {peak / 1e12 if peak else float('nan'):.3f} T ({peak_src}); "
        f"{flops_per_token(cfg) / 1e6:.2f} MFLOP/token, {tokens_per_step:,} tokens/step; eval every {t.eval_every}, "
        f"checkpoint every {t.ckpt_every} steps"
    )
    background = statistics.median(w["background_cpu"] for w in windows)
    print(
        f"processes the trainer started (the wandb service) used {100 * background:.1f}% of one core while it "
        f"trained; the plain loop, interleaved, shares that cost"
    )
    mb = b["ckpt_bytes"] / 1e6
    print(
        f"checkpoint {mb:.1f} MB: save {b['save_s']:.3f} s ({mb / b['save_s']:.0f} MB/s; until durable "
        f"{b['save_durable_s']:.3f} s, {mb / b['save_durable_s']:.0f} MB/s, in the background) vs torch.save "
        f"{b['torch_save_s']:.3f} s ({b['torch_bytes'] / 1e6 / b['torch_save_s']:.0f} MB/s; with fsync "
        f"{b['torch_save_fsync_s']:.3f} s); load {b['load_s']:.3f} s vs torch.load {b['torch_load_s']:.3f} s"
    )
    consumed = b["tokens_per_sec"]
    print(f"data sampling {sampled:,.0f} tokens/s, {sampled / consumed:.0f}x what the trainer consumes")
    if big:
        for label, key in (
            ("trainer (map per batch)", "trainer_rss"),
            ("control (one long-lived map)", "persistent_map_rss"),
        ):
            before, after = big[key]
            print(
                f"{big['gb']:g} GB cache, {big['batches']:,} batches, {label}: resident {fmt_bytes(before)} -> peak "
                f"{fmt_bytes(after)} (+{fmt_bytes(after - before)})"
            )
    targets = [
        (
            "trainer / plain step time <= 1.02",
            ratio <= 1.02,
            f"{ratio:.3f} (median of {len(ratios)} paired windows, {min(ratios):.3f}-{max(ratios):.3f})",
        ),
        (
            "checkpoint save (loop pays) <= 1.2x torch.save",
            b["save_s"] <= 1.2 * b["torch_save_s"],
            f"{b['save_s'] / b['torch_save_s']:.2f}x",
        ),
        ("checkpoint load <= torch.load", b["load_s"] <= b["torch_load_s"], f"{b['load_s'] / b['torch_load_s']:.2f}x"),
        ("data sampling >= 20x consumption", sampled >= 20 * consumed, f"{sampled / consumed:.0f}x"),
        (
            "trainer peak memory within 10% of plain",
            b["peak_memory"] <= 1.1 * a["peak_memory"],
            f"{b['peak_memory'] / a['peak_memory']:.3f}x",
        ),
    ]
    if b["mfu"] is not None:
        goal = 0.45 if device.type == "cuda" else 0.50
        targets.append(
            (
                f"trainer MFU >= {goal:.0%}",
                b["mfu"] >= goal,
                f"{100 * b['mfu']:.1f}% (plain loop {100 * a['mfu']:.1f}%)",
            )
        )
    print()
    for label, ok, value in targets:
        print(f"{'met ' if ok else 'MISS'}  {label}: {value}")
    figures.update(
        ratio=ratio,
        background_cpu=background,
        sampling_tokens_per_sec=sampled,
        big_cache=big,
        targets={label: {"met": ok, "value": value} for label, ok, value in targets},
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0
