"""The run's event log: one JSON object per line in metrics/events.jsonl, appended and flushed.

Every record carries `event`, `step`, `phase`, `run_id` and `time` (unix seconds); training records use the
canonical metric names (`train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_sec`,
`train/tokens_seen`, `val/loss`, `metrics/stage_id`). Only the main process gets a real log; the others get
one that drops everything, so no caller has to ask which process it is.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class EventLog:
    def __init__(self, path: Path, phase: str, run_id: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.phase, self.run_id = path, phase, run_id
        self._f = open(path, "a", encoding="utf-8")

    def write(self, event: str, step: int, **fields: Any) -> None:
        record = {"event": event, "step": step, "phase": self.phase, "run_id": self.run_id, "time": time.time()}
        record.update({k: _jsonable(v) for k, v in fields.items()})
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class NullEventLog:
    def write(self, event: str, step: int, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


def open_event_log(path: Path, phase: str, run_id: str, is_main: bool) -> EventLog | NullEventLog:
    return EventLog(path, phase, run_id) if is_main else NullEventLog()


def read_events(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
