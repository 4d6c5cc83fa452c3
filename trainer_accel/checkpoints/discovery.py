"""Finding checkpoints: the newest intact one to resume from (broken ones set aside, pointers reconciled after a
kill between renames), reads that retry while best/ is being replaced, and what a phase folder says of its phase.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer_accel.checkpoints.layout import (
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STEP_DIR,
    InvalidCheckpoint,
    read_meta,
    step_dir_name,
)
from trainer_accel.checkpoints.records import read_export_record
from trainer_accel.checkpoints.writing import link_pointer
from trainer_accel.errors import UserError
from trainer_accel.fsio import (
    TRASH_PREFIX,
    loads,
)

log = logging.getLogger(__name__)


def resume_candidates(phase_dir: Path) -> list[Path]:
    """latest/ and the step_* directories, newest step first (latest/ first among equals)."""
    if not phase_dir.is_dir():
        return []
    found = []
    for p in phase_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m:
            found.append((int(m.group(1)), 0, p))
        elif p.name == "latest":
            try:
                found.append((int(loads((p / META_FILE).read_text())["step"]), 1, p))
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                found.append((-1, 1, p))
    return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def set_aside_broken(phase_dir: Path) -> list[Path]:
    """Move checkpoints newer than the newest intact one to {phase}/rejected/, with the reason beside each.

    They are kept for a post-mortem, never deleted, and no longer shadow the good checkpoint. Main process only.
    """
    moved = []
    for cand in resume_candidates(phase_dir):
        try:
            read_meta(cand)
            break
        except InvalidCheckpoint as e:
            dest = phase_dir / "rejected" / f"{cand.name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}"
            dest.parent.mkdir(exist_ok=True)
            os.rename(cand, dest)
            (dest.parent / f"{dest.name}.reason.txt").write_text(f"{e}\n")
            shared = (
                " (a damaged file, not an interrupted save: step directories, latest/ and best/ of one step share "
                "their files by hard link, so the same damage shows in each)"
                if "sha256" in str(e)
                else ""
            )
            log.warning("checkpoint %s is broken (%s); set aside as %s%s", cand, e, dest, shared)
            moved.append(dest)
    return moved


def reconcile_pointers(phase_dir: Path) -> None:
    """Make latest/ and best/ agree with the newest intact checkpoint's sidecar. Main process only.

    A step directory is always complete before latest/ and best/ move, so a kill in between leaves them behind
    it; a run that then resumes at its last step would otherwise finish with a stale latest/ or best/.
    """
    newest = find_resume_checkpoint(phase_dir)
    if newest is None:
        return
    meta = read_meta(newest, verify=False)
    if _intact_step(phase_dir / "latest") != meta["step"]:
        why = _why_not_current(phase_dir / "latest")
        link_pointer(newest, phase_dir / "latest")
        log.warning("latest/ %s; now step %d", why, meta["step"])
    best_step = meta.get("best_val_step")
    source = phase_dir / step_dir_name(best_step) if best_step is not None else None
    if source is not None and _intact_step(phase_dir / "best") != best_step and _intact_step(source) == best_step:
        why = _why_not_current(phase_dir / "best")
        link_pointer(source, phase_dir / "best")
        log.warning("best/ %s; now step %d", why, best_step)


def _why_not_current(pointer: Path) -> str:
    """An older but intact pointer is what an interrupted save leaves; a damaged one is damage, and its files are
    hard links shared with the step directory (and best/ or latest/) of the same step, which it damaged too."""
    if not pointer.exists():
        return "was missing (an interrupted save, or set aside as broken above)"
    try:
        read_meta(pointer)
        return "was behind (an interrupted save)"
    except InvalidCheckpoint as e:
        return (
            f"was DAMAGED ({e}), not interrupted: its files are hard links shared with the step directory of "
            "its step (and latest/ or best/ when they are that step), damaged with it"
        )


def _intact_step(ckpt: Path) -> int | None:
    try:
        return read_meta(ckpt)["step"]
    except InvalidCheckpoint:
        return None


def find_resume_checkpoint(phase_dir: Path) -> Path | None:
    """The newest complete, intact checkpoint of a phase; broken ones are skipped with a warning saying why.
    Read steadily: `run --plan` looks beside a run that may be replacing latest/ as it reads."""
    for cand in resume_candidates(phase_dir):
        try:
            read_steadily(cand, read_meta)
            return cand
        except InvalidCheckpoint as e:
            log.warning("skipping checkpoint %s: %s", cand, e)
    return None


def files_identity(ckpt: Path) -> tuple:
    """Which files a checkpoint directory holds right now: a save never changes a file, it renames new ones in."""
    found = []
    for name in (META_FILE, MODEL_FILE, OPTIMIZER_FILE):
        try:
            st = os.stat(ckpt / name)
            found.append((st.st_dev, st.st_ino, st.st_size))
        except OSError:
            found.append(None)
    return tuple(found)


def _being_swapped(ckpt: Path) -> bool:
    """Whether a save is between the two renames that replace `ckpt` (fsio.swap_into_place), or just after them."""
    return any(ckpt.parent.glob(f"{TRASH_PREFIX}{ckpt.name}-*"))


def read_steadily(ckpt: Path, read: Callable[[Path], Any], attempts: int = 20) -> Any:
    """`read(ckpt)`, done again until the directory held the same files before and after it.

    latest/ and best/ are replaced by renames while a run trains, so a command reading them beside it (export,
    generate, evaluate) could take the sidecar of one save and the weights of the next: the checksums then called
    a sound checkpoint corrupt, and without them the weights would carry another step's name. Step directories
    never change, so for them this is one read. (Pinning latest/ to its step directory instead lost to pruning:
    in a test saving every 5 steps, a step directory lived a fraction of a second.)"""
    error: Exception | None = None
    for _ in range(attempts):
        before = files_identity(ckpt)
        try:
            result, error = read(ckpt), None
        except (InvalidCheckpoint, UserError, OSError) as e:
            result, error = None, e
        moved = files_identity(ckpt) != before
        if not moved and error is None:
            return result
        if not moved and not _being_swapped(ckpt):
            raise error
        time.sleep(0.05)
    if error is not None:
        raise error
    raise UserError(
        f"{ckpt}: replaced {attempts} times while being read (a run is saving there often); read one of "
        "the step_* directories beside it instead"
    )


def checkpoint_phase(path: Path) -> str | None:
    """The phase a checkpoint belongs to: its sidecar's, or for an exported .pt its record's (None if unknown)."""
    if path.is_dir():
        try:
            return read_meta(path, verify=False).get("phase")
        except InvalidCheckpoint:
            return None
    if path.is_file():
        return (read_export_record(path) or {}).get("phase")
    return None


def phase_finished(phase_dir: Path, total_steps: int) -> bool:
    """Whether a phase's newest intact checkpoint has reached total_steps."""
    found = find_resume_checkpoint(phase_dir)
    return found is not None and read_meta(found, verify=False)["step"] >= total_steps
