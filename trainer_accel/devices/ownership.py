"""One live run per phase folder.

Two runs of the same command in one artifacts dir used to train into the same `checkpoints/{phase}/`, each
sweeping the other's unfinished saves as leftovers and interleaving both in `events.jsonl`. A run that trains a
phase holds `checkpoints/{phase}.lock` for as long as it runs: an advisory lock (flock) on the file, which the
operating system drops when the process ends however it ends, plus a record of the owner in the file, for the
message a second run gets. A record with no lock behind it is what a killed run leaves: taken over, with a
warning. Commands that only read (`export`, `runs`, `--plan`) take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from trainer_accel.devices.collective import main_process_decides
from trainer_accel.errors import UserError
from trainer_accel.fsio import loads
from trainer_accel.paths import Paths

log = logging.getLogger(__name__)


def lock_path(paths: Paths, phase: str) -> Path:
    return paths.checkpoints / f"{phase}.lock"


def describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {started}: {owner.get('command')}"


def read_owner(path: Path) -> dict | None:
    try:
        text = path.read_text()
        return loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def busy(paths: Paths, phase: str) -> str:
    owner = read_owner(lock_path(paths, phase))
    return (
        f"{paths.phase_dir(phase)}: another run is training this phase here "
        f"({describe(owner) if owner else 'owner unknown'}); wait for it, stop it, or give this run its own "
        "TRAINER_ARTIFACTS_DIR"
    )


def in_use(paths: Paths, phase: str) -> str | None:
    """For --plan, which takes no lock: the problem a run would meet, if another run holds the phase now."""
    try:
        with open(lock_path(paths, phase)) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed, at once
    except BlockingIOError:
        return busy(paths, phase)
    except OSError:
        pass  # no lock file: nobody has trained here
    return None


def take(paths: Paths, phase: str):
    """Lock the phase folder for this process, or raise UserError naming the run that holds it."""
    path = lock_path(paths, phase)
    if paths.phase_dir(phase).exists() and not paths.phase_dir(phase).is_dir():
        raise UserError(f"{paths.phase_dir(phase)}: a file where the {phase} checkpoints folder belongs; move it away")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as e:
        raise UserError(f"{path.parent}: cannot write the checkpoints here ({e.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(busy(paths, phase)) from None
    left = read_owner(path)
    if left is not None:  # the lock was free: its owner has ended (a clean end leaves no record)
        elsewhere = left.get("host") != socket.gethostname()
        log.warning(
            "%s: taking over the lock left by %s, %s",
            path,
            describe(left),
            "on another host: make sure it has stopped" if elsewhere else "which is no longer running",
        )
    handle.seek(0)
    handle.truncate()
    handle.write(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "command": " ".join(sys.argv),
                "phase": phase,
            }
        )
    )
    handle.flush()
    return handle


@contextlib.contextmanager
def own_phases(acc, paths: Paths, phases: tuple[str, ...]) -> Iterator[None]:
    """Hold the locks of `phases` while the block runs (the main process holds them for all processes)."""
    held = []
    made_dir = not paths.checkpoints.exists()

    def take_all() -> None:
        for phase in phases:
            held.append((phase, take(paths, phase)))

    try:
        main_process_decides(acc, take_all)
        yield
    finally:
        for phase, handle in held:  # a clean end: no record left to take over
            handle.seek(0)
            handle.truncate()
            if not paths.phase_dir(phase).exists():  # refused before it trained: leave no trace
                lock_path(paths, phase).unlink(missing_ok=True)
            handle.close()
        if held and made_dir and not any(paths.checkpoints.iterdir()):
            paths.checkpoints.rmdir()
