"""The one training loop, for every phase, device and process count.

It draws the phase's batches by address and calls its loss, and never asks which phase it runs. Accelerate owns
the device, processes and precision. Gradient accumulation is explicit: Accelerate's own
`gradient_accumulation_steps` stays at 1 and the non-final micro-steps run under `accelerator.no_sync`, because the
loss is weighted: each micro-step backpropagates (its summed loss) / (the weight of the whole step, over all
micro-steps and processes: counted tokens for a token loss), times the process count to undo DDP's gradient
averaging. The gradient is then exactly that of one big batch, whatever the split. Evaluation uses the same
weighting. Saving (saving.py) and what the run tells (progress.py) are the Trainer's collaborators.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer_accel.checkpoints import layout
from trainer_accel.checkpoints.full_state import load_full_optimizer_state, local_value
from trainer_accel.checkpoints.loading import LoadedCheckpoint
from trainer_accel.config import PhaseConfig, TrainConfig
from trainer_accel.data.chat_template import ChatFormat
from trainer_accel.devices.collective import main_process_decides
from trainer_accel.devices.stopping import Interrupted, StopRequest
from trainer_accel.errors import UserError
from trainer_accel.models.lora import parameter_counts
from trainer_accel.observability.compile_report import CompileWatch
from trainer_accel.paths import Paths
from trainer_accel.training.batches import Batch, Batches
from trainer_accel.training.losses import LossOut
from trainer_accel.training.progress import Progress, StepTotals, fmt
from trainer_accel.training.saving import Saver, checkpoint_meta
from trainer_accel.training.start import StartPoint

log = logging.getLogger(__name__)

DROPOUT_TAG = 2


def address_seed(*address: int) -> int:
    """A torch seed that is a pure function of an address such as (seed, tag, step, rank)."""
    return int(np.random.SeedSequence(list(address)).generate_state(1)[0])


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to base_lr over warmup_steps, then cosine down to min_lr at total_steps; a pure function."""
    if step < t.warmup_steps:
        return t.base_lr * (step + 1) / t.warmup_steps
    span = max(1, t.total_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.base_lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only (biases and norm gains are not decayed); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=t.base_lr, betas=(t.beta1, t.beta2), **extra)


def metric_mean(summed: torch.Tensor, weight: torch.Tensor) -> float:
    """A phase's metric over a step or an evaluation: its sum over the weight's first part, or, for a metric given
    as a (sum, count) pair (a token mean beside a pair mean), the ratio of its own two sums."""
    num, den = (summed[0], summed[1]) if summed.numel() == 2 else (summed[0], weight.view(-1)[0])
    return float(num) / float(den) if den else float("nan")


@dataclass
class LoopState:
    """Everything besides weights and optimizer that a resumed run needs; stored in the checkpoint sidecar."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_val_step: int | None = None
    last_val_loss: float | None = None
    skipped_steps: int = 0  # updates skipped for a non-finite loss (on_nonfinite = "skip")


@dataclass
class PhaseResult:
    phase: str
    state: LoopState
    best_dir: Path | None
    latest_dir: Path


class TrainingPhase(Protocol):
    """What the loop needs of a phase (phases/phase.Phase is one)."""

    stage_id: int

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut: ...

    def weight(self, batch: Batch) -> torch.Tensor: ...


class Trainer:
    """One phase of training: set up from a built model (training/start.model_for), its optimizer and the phase,
    then `fit()`: the steps, evaluation and the agreed stop."""

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: PhaseConfig,
        phase: TrainingPhase,
        batches: Batches,
        paths: Paths,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        start: StartPoint | None = None,
        data_info: dict | None = None,
        chat: ChatFormat | None = None,
    ):
        self.acc, self.cfg, self.phase, self.batches = accelerator, cfg, phase, batches
        self.t = cfg.train
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.phase_dir = paths.phase_dir(cfg.phase)
        start = start or StartPoint()
        data_info = self.data_info = data_info or {}
        if cfg.sample_prompts and chat is None:
            log.warning("%s: sample_prompts are set but the caches' tokenizer cannot be found; no samples", cfg.path)
        self.empty_micro_batches = torch.zeros((), dtype=torch.long, device=accelerator.device)  # since the last line
        self.nonfinite_in_a_row = 0
        self.val_metrics: dict[str, float] = {}  # the phase's metrics of the last evaluation, as val/NAME
        self._stop_flag: torch.Tensor | None = None  # all-reduced stop request of the previous step
        self.saver = Saver(accelerator, cfg, paths, chat)
        if accelerator.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.t.tf32
        if self.t.activation_checkpointing:
            recomputed = len(range(0, cfg.model.L, self.t.activation_checkpointing))
            log.info(
                "%s: activation checkpointing: %d of %d blocks recomputed in the backward pass",
                cfg.phase,
                recomputed,
                cfg.model.L,
            )
        self.state = LoopState()
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        if frozen:  # an adapter's base: the same on every process already (built from the same weights), so DDP
            # need not broadcast it at start, and must not: its copy into an NF4 weight quantizes it a second time
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # train_cfg.compile: the forward and the loss as one graph, after Accelerate's wrapping (as its own dynamo
        # plugin does). Compiled apart, the (B, T, V) logits would leave the model's graph in fp32 (Accelerate's
        # autocast output) and the loss would read and write them again, forward and backward: on GPT-2 small at
        # B=16, T=1024 that is 3.3 GB a pass. The model itself stays uncompiled, so checkpoints keep plain names.
        self.loss = torch.compile(phase.loss) if self.t.compile else phase.loss
        self.compile_watch = CompileWatch() if self.t.compile else None  # graphs, graph breaks, recompiles: logged
        if start.resumed is not None:
            self._restore(start.resumed, data_info)
        elif start.initial is not None:
            log.info(
                "initialised weights from %s (step %d, run %s); optimizer fresh",
                start.initial.source,
                start.initial.step,
                start.initial.meta.get("run_id") or "not recorded",
            )
        self.parent = start.lineage()
        if getattr(phase, "setup", None) is not None:  # what the phase does before its first step (its reference)
            phase.setup(self, start)
        resumed_from = str(start.resumed.source) if start.resumed is not None else None
        facts = {
            "data_info": data_info,
            "device": str(accelerator.device),
            "processes": self.world,
            "precision": accelerator.mixed_precision,
            "parent": self.parent,
            "wandb_run_id": self.state.run_id if "wandb" in cfg.tracking.log_with else None,
        }
        self.trainable, total = parameter_counts(model)
        self.adapter_meta = (
            {"config": cfg.adapter.to_dict(), "base": start.base_record, "trainable_parameters": self.trainable}
            if cfg.adapter is not None
            else None
        )
        run_info = {
            "parameters": total,
            "trainable_parameters": self.trainable,
            "processes": self.world,
            "global_batch": self.global_batch,
            "tokenizer": data_info.get("tokenizer"),
            "data_fingerprint": data_info.get("data_fingerprint"),
        }
        self.progress = Progress(
            accelerator, cfg, paths, phase.stage_id, batches.train.names, self.state.run_id, self.state.step, facts,
            resumed_from, run_info,
        )  # fmt: skip
        self.events = self.saver.events = self.progress.events

    # -- resume ---------------------------------------------------------------------------------------------------

    def _restore(self, loaded: LoadedCheckpoint, data_info: dict) -> None:
        meta = loaded.meta
        saved_global = meta.get("global_batch")
        if saved_global is not None and saved_global != self.global_batch:
            raise UserError(
                f"{loaded.source}: checkpoint was trained with a global batch of {saved_global} sequences "
                f"(B x accum_steps x processes), this run has {self.global_batch} "
                f"(B={self.t.B}, accum_steps={self.t.accum_steps}, processes={self.world}); keep the product equal "
                "to resume"
            )
        self._check_same_data(loaded, data_info)
        if loaded.optimizer_state is not None:
            load_full_optimizer_state(self.acc, self.model, self.optimizer, loaded.optimizer_state)
        if self.acc.scaler is not None and meta.get("grad_scaler"):
            self.acc.scaler.load_state_dict(meta["grad_scaler"])
        self.state = LoopState(
            run_id=meta.get("run_id") or self.state.run_id,
            step=loaded.step,
            tokens_seen=int(meta.get("tokens_seen", loaded.step * self.global_batch * self.cfg.seq_len)),
            best_val_loss=loaded.best_val_loss,
            best_val_step=meta.get("best_val_step"),
            last_val_loss=meta.get("last_val_loss"),
            skipped_steps=int(meta.get("skipped_steps", 0)),
        )
        log.info("resumed from %s at step %d (best val loss %s)", loaded.source, loaded.step, fmt(loaded.best_val_loss))

    def _check_same_data(self, loaded: LoadedCheckpoint, data_info: dict) -> None:
        saved, now = loaded.meta.get("caches"), data_info.get("caches")
        if not saved or not now or saved == now:
            return
        diff = "; ".join(
            f"{k}: {saved.get(k, 'absent')[:12]} -> {now.get(k, 'absent')[:12]}"
            for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)
        )
        if not self.t.allow_data_change:
            raise UserError(
                f"{loaded.source}: the caches differ from those this checkpoint was trained on ({diff}); "
                "set train_cfg.allow_data_change to resume anyway"
            )
        log.warning("RESUMING ON CHANGED DATA (train_cfg.allow_data_change is set): %s", diff)

    @property
    def global_batch(self) -> int:
        return self.t.B * self.t.accum_steps * self.world

    # -- one step -------------------------------------------------------------------------------------------------

    def _train_step(self, step: int) -> tuple:
        """One optimizer update. Returns this process's loss sum, the step's global weight (counted tokens), the grad
        norm, this process's counted tokens and rows per source and its sums of the phase's metrics, as device
        tensors: no host sync, and what is summed over processes is summed only at progress lines."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.t)
        device = self.acc.device
        batches = [
            self.batches.train_batch(step, m, self.rank, self.world, self.t.accum_steps).to(device)
            for m in range(self.t.accum_steps)
        ]
        counts = torch.stack([self.phase.weight(b) for b in batches])  # on the device: no host sync
        by_source = torch.stack([self.batches.count_by_source(b) for b in batches]).sum(0)  # (tokens, rows) x sources
        # a loss of several means (ORPO: pairs and tokens) has a weight per part; the first one counts what the
        # micro-batch holds
        self.empty_micro_batches += (counts.reshape(len(batches), -1)[:, 0] == 0).sum()
        counted = self.acc.reduce(counts.sum(0).float(), "sum").clamp_min(1.0)
        loss_sum, metrics = torch.zeros_like(counted), {}
        for m, batch in enumerate(batches):
            # dropout masks by address: the global slice (micro * processes + rank), so any split draws the same
            torch.manual_seed(address_seed(self.t.seed, DROPOUT_TAG, step, m * self.world + self.rank))
            sync = m == len(batches) - 1
            with contextlib.nullcontext() if sync else self.acc.no_sync(self.model), self._watched("train"):
                out = self.loss(self.model, batch)
                self.acc.backward((out.total * (self.world / counted)).sum())
            loss_sum += out.total.detach()
            for name, value in out.metrics.items():
                metrics[name] = metrics.get(name, 0) + value.detach()
        max_norm = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")  # inf: measure, do not clip
        grad_norm = local_value(self.acc.clip_grad_norm_(self.model.parameters(), max_norm))  # FSDP2: a DTensor
        if self.t.on_nonfinite == "skip" and self._update_is_nonfinite(loss_sum, grad_norm):  # host sync, "skip" only
            self._skip_update(step)
        else:
            self.optimizer.step()  # under fp16 the loss scaler skips an overflowed update and lowers its scale itself
            self.nonfinite_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, counted, grad_norm, by_source, metrics

    def _watched(self, mode: str) -> contextlib.AbstractContextManager:
        return self.compile_watch.mode(mode) if self.compile_watch is not None else contextlib.nullcontext()

    def _report_compile(self, step: int) -> None:
        figures = self.compile_watch.report(self.cfg.phase) if self.compile_watch is not None else None
        if figures is not None:
            self.events.write("compile", step, **figures)

    def _update_is_nonfinite(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the trainer skips this update ("skip" mode); the same answer on every process.

        Without a loss scaler, a non-finite loss on any process makes the all-reduced gradient non-finite
        everywhere, so the gradient norm decides for all alike. Under fp16 a non-finite gradient with a finite
        loss is a routine overflow and the scaler's to handle (it skips the update and lowers its scale), so there
        the loss decides, all-reduced.
        """
        if self.acc.scaler is None:
            return not bool(torch.isfinite(grad_norm))
        return bool(self.acc.reduce((~torch.isfinite(loss_sum)).float(), "sum") > 0)

    def _skip_update(self, step: int) -> None:
        if self.acc.scaler is not None:  # it unscaled this step's gradients; without update() the next step fails
            self.acc.scaler.update()
        self.nonfinite_in_a_row += 1
        self.state.skipped_steps += 1
        self.events.write("skipped", step + 1, reason="non-finite loss or gradient norm")
        log.warning(
            "%s step %d: non-finite loss or gradient norm, update skipped (%d in a row)",
            self.cfg.phase,
            step + 1,
            self.nonfinite_in_a_row,
        )
        if self.nonfinite_in_a_row >= self.t.max_nonfinite_skips:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} non-finite updates in a row up to step {step + 1} "
                "(train_cfg.max_nonfinite_skips); the last checkpoint is kept as it was"
            )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Weighted mean loss (token-weighted, for token losses) over the `eval_batches` fixed validation batches of
        B rows.

        The batches are the same whatever the process count or accumulation; process r evaluates batches
        r, r + processes, ... A process with none left in the last round repeats batch 0 with weight 0, so every
        process runs the same number of forward passes (FSDP gathers weights collectively in each).
        """
        self.model.eval()
        total, names, widths = None, [], []
        for first in range(0, self.t.eval_batches, self.world):
            index = first + self.rank
            batch = self.batches.val_batch(index if index < self.t.eval_batches else 0)
            with self._watched("eval"):
                out = self.loss(self.model, batch.to(self.acc.device))
            names = sorted(out.metrics)
            parts = [out.total.float().view(-1), out.weight.float().view(-1)]
            parts += [out.metrics[m].float().view(-1) for m in names]
            widths = [p.numel() for p in parts]
            sums = torch.cat(parts)
            total = torch.zeros_like(sums) if total is None else total
            if index < self.t.eval_batches:
                total += sums
        self.model.train()
        values = self.acc.reduce(total, "sum").split(widths)
        loss_sum, count, *metrics = values
        self.val_metrics = {f"val/{m}": metric_mean(v, count) for m, v in zip(names, metrics)}
        if count[0] == 0:
            log.warning(
                "%s: the validation batches hold no counted tokens (every answer cut off by T?)", self.cfg.phase
            )
            return float("nan")
        return float((loss_sum.double() / count.double().clamp_min(1.0)).sum())  # in float64, as it has always been

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save(self, to_step_dir: bool, to_best: bool) -> None:
        meta = checkpoint_meta(self.cfg, self.state, self.acc, self.global_batch, self.data_info, self.parent)
        if self.adapter_meta is not None:  # the checkpoint holds the adapter alone; this says on what and how
            meta["adapter"] = self.adapter_meta
        self.saver.save(self.model, self.optimizer, meta, to_step_dir, to_best)

    def wait_for_save(self) -> None:
        self.saver.wait()

    # -- the loop -------------------------------------------------------------------------------------------------

    def fit(self) -> PhaseResult:
        """Train to total_steps. A progress bar on a terminal, else a plain progress line every log_every steps."""
        show_bar = self.acc.is_main_process and sys.stderr.isatty()
        with (
            StopRequest() as stop,
            logging_redirect_tqdm(),
            tqdm(
                total=self.t.total_steps,
                initial=self.state.step,
                desc=self.cfg.phase,
                unit="step",
                disable=not show_bar,
                dynamic_ncols=True,
            ) as self.progress.bar,
        ):
            try:
                return self._fit(stop)
            except Interrupted:
                raise
            except BaseException as e:
                self.events.write("failure", self.state.step, error=f"{type(e).__name__}: {e}")
                raise
            finally:
                try:  # a checkpoint in flight holds a good earlier state: finish it whatever happened
                    self.wait_for_save()
                finally:
                    self.saver.close()
                    self.events.close()

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop; all processes must stop after the same step.

        With several processes the request is all-reduced each step and read one step later: by then the next
        step is queued, so reading it waits only for work already done and never stalls the device.
        """
        failed = self.acc.is_main_process and self.saver.failure() is not None
        if self.world == 1:
            if failed:
                self.saver.raise_failure(self.state.step)
            return stop.requested
        previous = self._stop_flag
        flags = torch.zeros(2, device=self.acc.device)  # filled on the device: a tensor from a list would copy from
        flags[0], flags[1] = float(stop.requested), float(failed)  # the host and wait for the GPU's queue every step
        self._stop_flag = self.acc.reduce(flags, "sum")
        if previous is None:
            return False
        requested, save_failed = previous.tolist()
        if save_failed > 0:  # every process raises the main process's error together
            main_process_decides(self.acc, lambda: self.saver.raise_failure(self.state.step))
        return requested > 0

    def _fit(self, stop: StopRequest) -> PhaseResult:
        t, s = self.t, self.state
        tokens_per_step = self.global_batch * self.cfg.seq_len
        self.events.write(
            "run_start",
            s.step,
            total_steps=t.total_steps,
            processes=self.world,
            device=str(self.acc.device),
            stage_id=self.phase.stage_id,
        )
        log.info(
            "%s: steps %d -> %d, %d processes on %s, precision %s, %d CPU threads, %s tokens/step, %s parameters%s",
            self.cfg.phase,
            s.step,
            t.total_steps,
            self.world,
            self.acc.device,
            self.acc.mixed_precision,
            torch.get_num_threads(),
            f"{tokens_per_step:,}",
            f"{self.acc.unwrap_model(self.model).num_params():,}",
            f" ({self.trainable:,} trainable: adapter rank {self.cfg.adapter.r} on a frozen base)"
            if self.cfg.adapter
            else "",
        )
        if s.step > t.total_steps:
            log.warning(
                "%s: resumed at step %d, past train_cfg.total_steps=%d: nothing to train (raise total_steps to "
                "go on, or --no-resume to start again)",
                self.cfg.phase,
                s.step,
                t.total_steps,
            )
        if s.step == 0:  # where the phase starts from, for comparison; never a "best"
            s.last_val_loss = self.evaluate()
            self.events.write("eval", 0, **{"val/loss": s.last_val_loss}, **self.val_metrics)
            log.info("%s step 0 | val loss %.4f (before training)", self.cfg.phase, s.last_val_loss)
        self.model.train()
        pending: list[StepTotals] = []  # the updates since the last progress line
        names = self.batches.train.names
        log.info(
            "%s: rows drawn from %s (shares of the rows)",
            self.cfg.phase,
            ", ".join(f"{n} {p:.1%}" for n, p in zip(names, self.batches.train.probs)),
        )
        window_start, window_tokens = time.perf_counter(), 0
        first_step = s.step
        while s.step < t.total_steps:
            loss_sum, counted, grad_norm, by_source, metrics = self._train_step(s.step)
            lr = self.optimizer.param_groups[0]["lr"]
            s.step += 1
            s.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            pending.append(StepTotals(s.step, s.tokens_seen, lr, loss_sum, counted, grad_norm, by_source, metrics))
            self.progress.bar.update(1)
            stopping = self._stop_agreed(stop) and s.step < t.total_steps  # at the end, just finish
            due = s.step % t.ckpt_every == 0 or s.step == t.total_steps or stopping
            if s.step % t.log_every == 0 or due:  # also checks the losses are finite before a checkpoint
                tps = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                self.progress.train_lines(pending, tps, self.empty_micro_batches, s.last_val_loss)
                self._report_compile(s.step)
                pending, window_start, window_tokens = [], time.perf_counter(), 0
            improved = False
            if s.step % t.eval_every == 0 or s.step == t.total_steps:
                improved = self._eval_and_track()
            if due or improved:
                self.save(to_step_dir=due, to_best=improved)
            if stopping:  # everyone waits for the write: a process that exits first would have the launcher kill it
                main_process_decides(self.acc, self.wait_for_save)
                self.events.write("stopped", s.step, signal=stop.signum)
                raise Interrupted(
                    f"{self.cfg.phase} stopped by a signal after step {s.step}; its checkpoint is "
                    f"{self.phase_dir / layout.step_dir_name(s.step)} (run the same command to resume)"
                )
        # A step ran: the last one was due and saved. None ran (resumed at the end): save only if this phase has
        # no latest/ yet (resumed from elsewhere), as the main process sees it once its writes are done.
        latest, best = self.phase_dir / "latest", self.phase_dir / "best"
        main_process_decides(self.acc, self.wait_for_save)
        if s.step == first_step and main_process_decides(self.acc, lambda: not latest.exists()):
            self.save(to_step_dir=True, to_best=False)
            main_process_decides(self.acc, self.wait_for_save)
        # the main process answers once its writes are done, so every process returns with them complete on disk
        best_dir = best if main_process_decides(self.acc, best.exists) else None
        if self.progress.rows_drawn.sum():
            log.info(
                "%s: rows drawn in this session: %s (configured %s)",
                self.cfg.phase,
                ", ".join(
                    f"{k.removeprefix('train/mixture/')} {v:.1%}" for k, v in self.progress.realised_mixture().items()
                ),
                ", ".join(f"{n} {p:.1%}" for n, p in zip(self.batches.train.names, self.batches.train.probs)),
            )
        self._report_compile(s.step)  # the last evaluation's compiles, if any
        self.events.write(
            "run_end",
            s.step,
            best_val_loss=s.best_val_loss,
            best_val_step=s.best_val_step,
            **self.progress.realised_mixture(),
        )
        return PhaseResult(self.cfg.phase, s, best_dir, latest)

    def _eval_and_track(self) -> bool:
        s = self.state
        val = self.evaluate()
        s.last_val_loss = val
        improved = math.isfinite(val) and (s.best_val_loss is None or val < s.best_val_loss)
        if improved:
            s.best_val_loss, s.best_val_step = val, s.step
        self.events.write("eval", s.step, **{"val/loss": val}, **self.val_metrics)
        log.info("%s step %d | val loss %.4f%s", self.cfg.phase, s.step, val, " (best)" if improved else "")
        return improved
