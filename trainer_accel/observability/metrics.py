"""What a run records, under one set of names, to every sink.

Canonical names: `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_sec`, `train/tokens_seen`,
`val/loss`, `metrics/stage_id` (0 pretrain, 1 sft), and under fp16 `train/loss_scale` and `train/scaler_skips`
(updates the loss scaler skipped in a progress window); anything else a phase reports (its loss's metrics, as
train/NAME) keeps its own prefix.
Aliases are folded into them here and nowhere else. Every record carries `event`, `step`, `phase`, `run_id`
and `time` (unix seconds).

Sinks: `metrics/events.jsonl` (every event: run_start, train, progress, eval, checkpoint, skipped, resume,
stopped, failure, run_end, compile), `metrics/metrics.csv` (train and eval records, one column per metric name, columns
added as new names appear without losing earlier rows) and the trackers. `train` holds one step's values;
`progress` sums up a progress line's window of steps (mean loss and grad norm, the lr and tokens at its last
step) and is what the trackers chart, with `eval`: a point per window, not per step, because a tracker call
costs about 0.3 ms (wandb) and a flush (Accelerate's TensorBoard tracker flushes at every call), which every
step would pay while the device waits. A resumed run continues the same history: records its
earlier process wrote after the resume step are superseded (removed) before it logs again, so every step
appears once. Only the main process gets real sinks; the others get a log that drops everything.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from trainer_accel.fsio import loads

ALIASES = {
    "loss": "train/loss",
    "train_loss": "train/loss",
    "lr": "train/lr",
    "learning_rate": "train/lr",
    "train_lr": "train/lr",
}
METRIC_EVENTS = ("train", "eval")  # every step's and every evaluation's values: the CSV holds these
TRACKED_EVENTS = ("progress", "eval")  # what TensorBoard and wandb chart: a point per progress line, per evaluation
ID_COLUMNS = ["event", "step", "phase", "run_id", "time"]


def canonical(values: dict[str, Any], extra_prefix: str) -> dict[str, Any]:
    """Fold aliases into canonical names; a bare name that is not an alias goes under `extra_prefix/`."""
    out = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if "/" not in name:
            name = f"{extra_prefix}/{name}"
        out[name] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


def _rewrite_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _parse(line: str) -> dict | None:
    """A JSONL record, or None for a blank line or one torn by a killed writer."""
    try:
        record = loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and line.endswith("\n") else None


def _superseded(record: dict, run_id: str, phase: str, step: int) -> bool:
    return record.get("run_id") == run_id and record.get("phase") == phase and int(record.get("step", -1)) > step


class JsonlSink:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def supersede_after(self, run_id: str, phase: str, step: int) -> int:
        self._f.close()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [
            line
            for line in lines
            if (record := _parse(line)) is not None and not _superseded(record, run_id, phase, step)
        ]
        if len(keep) != len(lines):
            _rewrite_atomic(self.path, "".join(keep))
        self._f = open(self.path, "a", encoding="utf-8")
        return len(lines) - len(keep)

    def close(self) -> None:
        self._f.close()


class CsvSink:
    """One row per train/eval record; a new metric name adds a column (the file is rewritten once for it)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.columns: list[str] = []
        if path.exists() and path.stat().st_size:
            with open(path, newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f))
        self._f = None  # opened on the first row, reopened after a rewrite

    def _rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict]) -> None:
        self.close()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        _rewrite_atomic(self.path, buf.getvalue())

    def write(self, record: dict) -> None:
        if record["event"] not in METRIC_EVENTS:
            return
        new = [k for k in record if k not in self.columns]
        if new:
            rows = self._rows()
            self.columns = (self.columns or list(ID_COLUMNS)) + [k for k in new if k not in ID_COLUMNS]
            self._rewrite(rows)
        if self._f is None:
            self._f = open(self.path, "a", newline="", encoding="utf-8")
        csv.DictWriter(self._f, fieldnames=self.columns, extrasaction="ignore").writerow(
            {k: "" if v is None else v for k, v in record.items()}
        )
        self._f.flush()

    def supersede_after(self, run_id: str, phase: str, step: int) -> int:
        self.close()
        rows = self._rows()
        keep = [r for r in rows if not _superseded(r, run_id, phase, step)]
        if len(keep) != len(rows):
            self._rewrite(keep)
        return len(rows) - len(keep)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class MetricsLog:
    """The run's records, fanned out to its sinks."""

    def __init__(self, sinks: list, phase: str, run_id: str, stage_id: int):
        self.sinks, self.phase, self.run_id, self.stage_id = sinks, phase, run_id, stage_id

    def write(self, event: str, step: int, **fields: Any) -> None:
        record = {"event": event, "step": step, "phase": self.phase, "run_id": self.run_id, "time": time.time()}
        if event in METRIC_EVENTS or event in TRACKED_EVENTS:
            fields = {**canonical(fields, self.phase), "metrics/stage_id": self.stage_id}
        record.update({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()})
        for sink in self.sinks:
            sink.write(record)

    def continue_from(self, step: int) -> int:
        """Resuming at `step`: drop what an earlier process of this run logged after it; returns how many records."""
        return max((s.supersede_after(self.run_id, self.phase, step) for s in self.sinks), default=0)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_metrics(
    metrics_dir: Path, events_path: Path, phase: str, run_id: str, stage_id: int, is_main: bool
) -> MetricsLog:
    sinks = [JsonlSink(events_path), CsvSink(metrics_dir / "metrics.csv")] if is_main else []
    return MetricsLog(sinks, phase, run_id, stage_id)


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete record. Text after the last newline is a record still being written (`compare` on a live
    run) or torn by a kill (the resume drops it): left out, not an error."""
    with open(path, encoding="utf-8") as f:
        return [loads(line) for line in f if line.strip() and line.endswith("\n")]
