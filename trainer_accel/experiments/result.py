"""The result protocol for orchestrators: one JSON file written atomically when `run` exits, also on failure.

A scheduler or a script reads `status` and `exit_code` and the paths it needs instead of parsing logs:
    status     completed | bad_input | interrupted | failed  (exit codes 0, 2, 3, 1)
    runs       per phase that started: run_id, final_step, best_val_loss, best/latest dirs, manifest path
    best_pt    the exported file, when the run got that far; verdict: the SFT promotion gate's, if any
    failure    one line saying why, when it did not complete
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_accel.devices.stopping import INTERRUPTED_EXIT
from trainer_accel.errors import USER_ERROR_EXIT
from trainer_accel.fsio import now_iso, write_atomic
from trainer_accel.paths import Paths

EXIT_CODES = {"completed": 0, "failed": 1, "bad_input": USER_ERROR_EXIT, "interrupted": INTERRUPTED_EXIT}


def _absolute(path: Path) -> str | None:
    """Paths in the result are absolute (an orchestrator's working directory is not the run's); None if absent."""
    return str(Path(path).resolve()) if Path(path).exists() else None


class Outcome:
    """What the phases of one `run` invocation did so far; turned into the result file at exit."""

    def __init__(self, phase: str, config: Path, overrides: list[str], paths: Paths):
        self.phase, self.config, self.overrides, self.paths = phase, config, overrides, paths
        # of each phase that started, in order: (phase, total steps, its loop state as it goes on, its folder); not
        # the Trainer, whose model must be freed before the process group ends (devices/collective.end_process_group)
        self.phases: list[tuple[str, int, Any, Path]] = []
        self.best_pt: Path | None = None
        self.verdict: str | None = None

    def started(self, trainer) -> None:
        self.phases.append((trainer.cfg.phase, trainer.t.total_steps, trainer.state, trainer.phase_dir))

    def _phase_record(self, phase: str, total_steps: int, s, phase_dir: Path) -> dict[str, Any]:
        return {
            "phase": phase,
            "run_id": s.run_id,
            "final_step": s.step,
            "total_steps": total_steps,
            "best_val_loss": s.best_val_loss,
            "best_val_step": s.best_val_step,
            "best": _absolute(phase_dir / "best"),
            "latest": _absolute(phase_dir / "latest"),
            "manifest": _absolute(self.paths.manifest(s.run_id)),
        }

    def to_dict(self, status: str, failure: str | None) -> dict[str, Any]:
        runs = [self._phase_record(*p) for p in self.phases]
        last = runs[-1] if runs else {}
        return {
            "status": status,
            "exit_code": EXIT_CODES[status],
            "phase": self.phase,
            "config": str(Path(self.config).resolve()),
            "overrides": self.overrides,
            "run_ids": [r["run_id"] for r in runs],
            "runs": runs,
            "final_step": last.get("final_step"),
            "best_val_loss": last.get("best_val_loss"),
            "best": last.get("best"),
            "latest": last.get("latest"),
            "best_pt": _absolute(self.best_pt) if self.best_pt else None,
            "verdict": self.verdict,
            "failure": failure,
            "finished_at": now_iso(),
        }

    def write(self, path: Path, status: str, failure: str | None) -> None:
        write_atomic(path, (json.dumps(self.to_dict(status, failure), indent=2) + "\n").encode())
