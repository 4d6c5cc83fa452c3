"""What a training run tells while it trains: every step's figures to the event log and CSV (and through them the
manifest, TensorBoard and wandb), a summary on the progress line or bar, and the realised mixture of sources.

The loop hands over each update's totals as device tensors; they are summed over processes and read here once
per progress line (one collective, one host sync), so logging never stalls the device between lines.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator

from trainer_accel.config import PhaseConfig
from trainer_accel.observability.manifest import ManifestSink, run_facts
from trainer_accel.observability.metrics import open_metrics
from trainer_accel.observability.trackers import open_trackers
from trainer_accel.paths import Paths

log = logging.getLogger(__name__)


@dataclass
class StepTotals:
    """One update's figures, kept on the device until the next progress line reads them all in one host sync."""

    step: int
    tokens_seen: int
    lr: float
    loss_sum: torch.Tensor  # this process's summed loss
    counted: torch.Tensor  # the step's weight: summed over all micro-steps and processes
    grad_norm: torch.Tensor
    by_source: torch.Tensor  # this process's (tokens, rows) per training source
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # this process's sums of the phase's metrics


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


class Progress:
    """The run's records from its start: the event log (with the manifest and trackers as sinks) and the progress
    line. Opened on every process; only the main one writes (observability/metrics.py decides)."""

    def __init__(
        self,
        acc: Accelerator,
        cfg: PhaseConfig,
        paths: Paths,
        stage_id: int,
        names: list[str],
        run_id: str,
        step: int,
        facts: dict,
        resumed_from: str | None,
        run_info: dict,
    ):
        self.acc, self.cfg, self.names = acc, cfg, names
        self.rows_drawn = np.zeros(len(names))  # per training source, this session, all processes
        self.bar = None  # tqdm's, while fit() runs on a terminal
        self.events = open_metrics(paths.metrics, paths.events, cfg.phase, run_id, stage_id, acc.is_main_process)
        if acc.is_main_process:
            facts = run_facts(run_id=run_id, cfg=cfg, **facts)
            self.events.sinks.append(ManifestSink(paths.manifest(run_id), facts, step, resumed_from))
        if acc.is_main_process and cfg.tracking.log_with:
            first = step if resumed_from is not None else None
            self.events.sinks += open_trackers(cfg, paths.metrics, run_id, first, run_info)
        if resumed_from is not None:  # the same history goes on: what an earlier process logged past here is superseded
            superseded = self.events.continue_from(step)
            self.events.write("resume", step, source=resumed_from, superseded=superseded)

    def train_lines(
        self,
        pending: list[StepTotals],
        tokens_per_sec: float,
        empty_micro_batches: torch.Tensor,
        last_val: float | None,
    ) -> None:
        """Every step's values to the event log and CSV; the window's summary to the progress line and trackers."""
        t, names = self.cfg.train, self.names
        metric_names = sorted(pending[0].metrics)
        parts = [pending[0].loss_sum.numel()] + [pending[0].metrics[m].numel() for m in metric_names]
        local = torch.stack(
            [
                torch.cat(
                    [p.loss_sum.float().view(-1)]
                    + [p.metrics[m].float().view(-1) for m in metric_names]
                    + [p.by_source.flatten()]
                )
                for p in pending
            ]
        )
        reduced = self.acc.reduce(local, "sum")  # loss sums and per-source counts: one collective per progress line
        counted = torch.stack([p.counted.float().view(-1) for p in pending])  # (lines, parts of the weight)
        loss_parts, *metric_sums, counts = reduced.split(parts + [reduced.shape[1] - sum(parts)], dim=1)
        losses = (loss_parts / counted).sum(1)  # a loss of several means is their sum
        # a metric is a sum over the weight's first part, or a (sum, count) pair whose ratio it is
        extra = [m[:, 0] / (m[:, 1] if m.shape[1] == 2 else counted[:, 0]) for m in metric_sums]
        rows = torch.cat(
            [
                torch.stack([losses, torch.stack([p.grad_norm.float() for p in pending])], dim=1),
                counts,
                torch.stack(extra, dim=1) if extra else counts[:, :0],
            ],
            dim=1,
        ).tolist()  # one host sync
        values = [r[:2] for r in rows]
        for p, row in zip(pending, rows):
            per_source = {f"train/tokens/{n}": row[2 + i] for i, n in enumerate(names)}
            per_source |= {f"train/rows/{n}": row[2 + len(names) + i] for i, n in enumerate(names)}
            phase_metrics = {f"train/{m}": row[2 + 2 * len(names) + i] for i, m in enumerate(metric_names)}
            self.events.write(
                "train",
                p.step,
                **{
                    "train/loss": row[0],
                    "train/lr": p.lr,
                    "train/grad_norm": row[1],
                    "train/tokens_seen": p.tokens_seen,
                    "train/tokens_per_sec": tokens_per_sec,
                    **phase_metrics,
                    **per_source,
                },
            )
            self.rows_drawn += np.array(row[2 + len(names) : 2 + 2 * len(names)])
        empty = int(empty_micro_batches)
        if empty:
            log.warning(
                "%s: %d micro-batches up to step %d had no counted tokens (every label -100); they contributed nothing",
                self.cfg.phase,
                empty,
                pending[-1].step,
            )
            empty_micro_batches.zero_()
        finite = [v for v in values if math.isfinite(v[0])]
        if t.on_nonfinite == "stop" and len(finite) < len(values):
            bad = next(p.step for p, v in zip(pending, values) if not math.isfinite(v[0]))
            raise FloatingPointError(
                f"training loss is not finite at step {bad}; the last checkpoint is kept as it was "
                "(try a lower base_lr or grad_clip)"
            )
        avg = sum(v[0] for v in finite) / len(finite) if finite else float("nan")
        norms = [v[1] for v in finite if math.isfinite(v[1])]
        step, tokens, lr = pending[-1].step, pending[-1].tokens_seen, pending[-1].lr
        progress = {
            "train/loss": avg,
            "train/lr": lr,
            "train/tokens_seen": tokens,
            "train/tokens_per_sec": tokens_per_sec,
            "train/grad_norm": sum(norms) / len(norms) if norms else float("nan"),
            **self.realised_mixture(),
        }
        if self.acc.scaler is not None:  # fp16: updates the scaler skipped (finite loss, overflowed gradient)
            progress["train/loss_scale"] = self.acc.scaler.get_scale()
            progress["train/scaler_skips"] = len(finite) - len(norms)
            if len(finite) > len(norms):
                log.info(
                    "%s: the fp16 loss scaler skipped %d of the last %d updates (gradient overflow); scale now %g",
                    self.cfg.phase,
                    len(finite) - len(norms),
                    len(values),
                    progress["train/loss_scale"],
                )
        self.events.write("progress", step, **progress)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(
                loss=f"{avg:.4f}", lr=f"{lr:.2e}", val=fmt(last_val), tok_s=f"{tokens_per_sec:,.0f}", refresh=False
            )
            return
        log.info(
            "%s step %d/%d | lr %.2e | loss %.4f | val %s | %s tok/s",
            self.cfg.phase,
            step,
            t.total_steps,
            lr,
            avg,
            fmt(last_val),
            f"{tokens_per_sec:,.0f}",
        )

    def realised_mixture(self) -> dict[str, float]:
        """Each source's share of the training rows drawn in this session so far (configured: batches.train.probs)."""
        total = self.rows_drawn.sum()
        if not total:
            return {}
        return {f"train/mixture/{n}": float(r / total) for n, r in zip(self.names, self.rows_drawn)}
