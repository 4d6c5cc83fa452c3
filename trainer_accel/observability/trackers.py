"""TensorBoard and wandb, through Accelerate's tracker classes, as sinks of the metrics log.

One tracker run per phase run, named "{phase}-{run_id}" unless the config names it: TensorBoard writes under
metrics/tensorboard/{name}/, wandb under metrics/wandb/. A resumed run continues the same history:
TensorBoard with `purge_step` (events an earlier process wrote after the resume step are dropped), wandb under
the same run id (kept in the checkpoint sidecar). wandb runs offline unless credentials exist or WANDB_MODE
says otherwise; `wandb sync metrics/wandb/offline-run-*` uploads later.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from trainer_accel.config import PhaseConfig
from trainer_accel.faults import fault_point
from trainer_accel.observability.metrics import TRACKED_EVENTS

log = logging.getLogger(__name__)


class TrackerSink:
    """Progress lines and evaluations to one Accelerate tracker; other events are the event log's business.

    A tracker is an observer: when it fails (wandb's service gone with the launcher, a full disk under its folder,
    a network error) it is warned about once, naming it and the error, and used no more; the run, its JSONL and
    CSV records and its stop go on as they would have."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.failed = False

    def _guarded(self, what: str, call, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            fault_point("tracker")
            call(*args, **kwargs)
        except Exception as e:  # whatever the tracker's library raises, training is not its to stop
            self.failed = True
            log.warning(
                "tracker %s failed (%s: %s) while %s; it is not used for the rest of this run (the event log "
                "and metrics.csv are complete)",
                self.tracker.name,
                type(e).__name__,
                e,
                what,
            )

    def write(self, record: dict) -> None:
        self._guarded(f"logging step {record.get('step')}", self._write, record)

    def _write(self, record: dict) -> None:
        if record["event"] == "samples":
            self._samples(record["step"], record.get("samples", []))
        elif record["event"] in TRACKED_EVENTS:
            values = {
                k: v for k, v in record.items() if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if values:
                self.tracker.log(values, step=record["step"])

    def _samples(self, step: int, samples: list[dict]) -> None:
        """wandb: a table per checkpoint; TensorBoard: a markdown table as text."""
        columns = ["i", "task", "prompt", "text"]
        rows = [[i, s["task"], s["prompt"], s["text"]] for i, s in enumerate(samples)]
        if hasattr(self.tracker, "log_table") and self.tracker.name == "wandb":
            self.tracker.log_table("samples", columns=columns, data=rows, step=step)
        elif self.tracker.name == "tensorboard":
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            table = "\n".join(
                ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            )
            self.tracker.writer.add_text("samples", table, step)

    def supersede_after(self, run_id: str, phase: str, step: int) -> int:
        return 0  # done when the tracker starts (purge_step, run id)

    def close(self) -> None:
        self._guarded("closing", self.tracker.finish)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train_cfg.B": 32, ...} with values trackers accept (bool, int, float, str)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out


def open_trackers(
    cfg: PhaseConfig, metrics_dir: Path, run_id: str, resume_step: int | None, run_info: dict
) -> list[TrackerSink]:
    """Start the configured trackers (main process only) and record the run's config and identity in them."""
    t = cfg.tracking
    name = t.run_name or f"{cfg.phase}-{run_id}"
    trackers = []
    if "tensorboard" in t.log_with:
        from accelerate.tracking import TensorBoardTracker

        kwargs = {"purge_step": resume_step + 1} if resume_step is not None else {}
        trackers.append(TensorBoardTracker(name, str(metrics_dir / "tensorboard"), **kwargs))
    if "wandb" in t.log_with:
        from accelerate.tracking import WandBTracker

        if "WANDB_MODE" not in os.environ and not wandb_has_credentials():
            os.environ["WANDB_MODE"] = "offline"
        (metrics_dir / "wandb").mkdir(parents=True, exist_ok=True)
        group = t.group or f"{cfg.path.parent.name}/{cfg.path.stem}"
        trackers.append(
            WandBTracker(
                t.project,
                name=name,
                id=run_id,
                resume="allow",
                group=group,
                tags=[cfg.phase, *t.tags],
                dir=str(metrics_dir),
                job_type=cfg.phase,
            )
        )
        log.info("wandb: %s mode, run %s (%s)", os.environ.get("WANDB_MODE", "online"), run_id, metrics_dir / "wandb")
    config = _flat(
        {
            "run_id": run_id,
            "config_path": str(cfg.path),
            **run_info,
            **cfg.resolved(),
            "overrides": list(cfg.overrides),
            "config_fingerprint": cfg.fingerprint,
        }
    )
    sinks = []
    for tracker in trackers:
        sink = TrackerSink(tracker)
        sink._guarded("starting", lambda: (tracker.start(), tracker.store_init_configuration(config)))
        sinks += [] if sink.failed else [sink]
    return sinks
