"""The background checkpoint writer: the loop hands over a CPU copy of its state and trains on while it is written.

The write, fsync, hashing and the moves of latest/ and best/ run on one thread, one checkpoint at a time, and a
checkpoint still appears only when it is complete (writing.write_checkpoint), so a crash at any moment leaves the
newest complete checkpoint to resume from. The loop polls `failure()` every step without waiting, so a failed
write stops the run at the next step instead of at the next save.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from pathlib import Path

from trainer_accel.checkpoints import layout, writing
from trainer_accel.errors import UserError


@dataclass
class Snapshot:
    """One checkpoint's content, already copied to the CPU: the training thread may change its tensors now."""

    model_state: dict
    tied: dict
    optimizer_state: dict
    meta: dict


@dataclass
class _InFlight:
    meta: dict
    future: concurrent.futures.Future


def write_snapshot(phase_dir: Path, snap: Snapshot, to_step_dir: bool, to_best: bool, keep_last_n: int) -> Path:
    """Files only: a step directory that latest/ (and best/) then point at, or best/ alone. Returns what it wrote."""
    if not to_step_dir:
        return writing.write_checkpoint(
            phase_dir / "best", snap.model_state, snap.tied, snap.optimizer_state, snap.meta
        )
    step_dir = writing.write_checkpoint(
        phase_dir / layout.step_dir_name(snap.meta["step"]),
        snap.model_state,
        snap.tied,
        snap.optimizer_state,
        snap.meta,
    )
    writing.link_pointer(step_dir, phase_dir / "latest")
    if to_best:
        writing.link_pointer(step_dir, phase_dir / "best")
    writing.prune_step_dirs(phase_dir, keep_last_n)
    return step_dir


class CheckpointWriter:
    """One writer thread for a phase folder, started at the first save; the main process alone writes."""

    def __init__(self, phase_dir: Path, keep_last_n: int):
        self.phase_dir, self.keep_last_n = phase_dir, keep_last_n
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: _InFlight | None = None

    def submit(self, snap: Snapshot, to_step_dir: bool, to_best: bool) -> None:
        if self._in_flight is not None:
            raise RuntimeError("a checkpoint is still being written: wait() for it first (one save at a time)")
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        future = self._thread.submit(write_snapshot, self.phase_dir, snap, to_step_dir, to_best, self.keep_last_n)
        self._in_flight = _InFlight(snap.meta, future)

    def wait(self) -> tuple[dict, Path] | None:
        """Block until the checkpoint being written is complete: its sidecar and directory (None if none was).
        A disk or permission error becomes the user's one line; the checkpoints written before it are intact."""
        if self._in_flight is None:
            return None
        done, self._in_flight = self._in_flight, None
        try:
            return done.meta, done.future.result()
        except OSError as e:
            raise UserError(
                f"{self.phase_dir}: writing the checkpoint of step {done.meta['step']} failed "
                f"({type(e).__name__}: {e}); the checkpoints written before it are intact"
            ) from None

    def failure(self) -> BaseException | None:
        """The error of the write in flight, once it has failed; never waits."""
        f = self._in_flight.future if self._in_flight is not None else None
        return f.exception() if f is not None and f.done() else None

    def raise_failure(self, at_step: int) -> None:
        """Report a failed write as one line and forget it (so closing does not raise it again as a traceback)."""
        meta, e = self._in_flight.meta, self.failure()
        self._in_flight = None
        raise UserError(
            f"{self.phase_dir}: writing the checkpoint of step {meta['step']} failed "
            f"({type(e).__name__}: {e}); training stopped at step {at_step}, the checkpoints "
            "written before it are intact"
        )

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown()
            self._thread = None
