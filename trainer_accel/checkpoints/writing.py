"""Writing checkpoints whole or not at all: a directory is written under a hidden temporary name, every file and
the directory fsynced, then renamed into place; `latest` and `best` are replaced by renaming too; old step
directories are pruned (never best/); what a killed write left behind is swept up before anything reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainer_accel.checkpoints.layout import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SEAL,
    STEP_DIR,
    InvalidCheckpoint,
    canonical_state,
    read_meta,
    sidecar_sha256,
)
from trainer_accel.errors import UserError
from trainer_accel.faults import fault_point
from trainer_accel.fsio import (
    FILE_MODE,
    TMP_PREFIX,
    TRASH_PREFIX,
    fsync_dir,
    fsync_file,
    sha256_file,
    swap_into_place,
    write_atomic,
)

log = logging.getLogger(__name__)


def _temp_dir_for(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    return tmp


def write_checkpoint(
    target: Path,
    model_state: dict[str, torch.Tensor],
    tied: dict[str, str],
    optimizer_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write a complete checkpoint directory at `target` (replacing one there). Main process only."""
    tensors = canonical_state(model_state, tied)
    tmp = _temp_dir_for(target)
    writers = {
        # safetensors writes its file 0600; the checkpoint's other files get the usual mode, so this one too
        MODEL_FILE: (
            "model",
            lambda path: (save_file(tensors, str(path), metadata={"format": FORMAT}), os.chmod(path, FILE_MODE)),
        ),
        OPTIMIZER_FILE: ("optimizer", lambda path: torch.save(optimizer_state, path)),
    }
    files = {}
    for name, (point, write) in writers.items():
        fault_point(f"before_{point}")
        write(tmp / name)
        fault_point(f"while_{point}", partial=tmp / name)
        fsync_file(tmp / name)
        fault_point(f"after_{point}")
        files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "tied": dict(tied), "files": files}
    full_meta[SEAL] = sidecar_sha256(full_meta)
    fault_point("before_meta")
    write_atomic(tmp / META_FILE, (json.dumps(full_meta, indent=2) + "\n").encode())
    fault_point("while_meta", partial=tmp / META_FILE)
    fault_point("after_meta")
    fsync_dir(tmp)
    fault_point("before_rename")
    swap_into_place(tmp, target)
    return target


def cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor copied to CPU memory: a snapshot that training can no
    longer change while it is written (tied weights are already left out, so nothing is copied twice)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def ensure_free_space(directory: Path, needed: int, copies: int = 1) -> None:
    """Refuse to start a save that cannot finish: a full disk must not leave a partial file behind."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(needed * copies * 1.05) + (16 << 20)
    if free < want:
        raise UserError(
            f"{directory}: {free / 2**20:,.0f} MiB free, a checkpoint needs about {want / 2**20:,.0f} MiB; "
            "nothing was written and the earlier checkpoints are intact (free some space and resume)"
        )


def link_pointer(source: Path, target: Path) -> None:
    """Make `target` (latest/, best/) a complete copy of checkpoint `source`: hard links, so no bytes are copied."""
    tmp = _temp_dir_for(target)
    for name in (MODEL_FILE, OPTIMIZER_FILE, META_FILE):
        try:
            os.link(source / name, tmp / name)
        except OSError:
            shutil.copy2(source / name, tmp / name)
            fsync_file(tmp / name)
    fsync_dir(tmp)
    fault_point(f"before_{target.name}")  # before_latest, before_best
    swap_into_place(tmp, target)


def prune_step_dirs(phase_dir: Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest `keep_last_n` step_* directories; nothing else in the folder is touched."""
    steps = sorted((int(m.group(1)), p) for p in phase_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name)))
    doomed = [p for _, p in steps[:-keep_last_n]] if keep_last_n > 0 else []
    for p in doomed:
        shutil.rmtree(p)
        fault_point("pruning")
    return doomed


def sweep_leftovers(phase_dir: Path) -> None:
    """Finish or undo what a killed save left behind: temporary and set-aside directories, export temp files."""
    for tmp in phase_dir.parent.glob(".*.pt.tmp-*"):
        tmp.unlink(missing_ok=True)
    if not phase_dir.is_dir():
        return
    for name in ("latest", "best"):
        if (phase_dir / name).exists():
            continue
        # killed between the two renames of a swap: the new copy if it is complete, else the old one
        for cand in sorted(phase_dir.glob(f"{TMP_PREFIX}{name}-*"), reverse=True) + sorted(
            phase_dir.glob(f"{TRASH_PREFIX}{name}-*")
        ):
            try:
                read_meta(cand)
            except InvalidCheckpoint:
                continue
            os.rename(cand, phase_dir / name)
            log.warning("restored %s from %s left by an interrupted save", phase_dir / name, cand.name)
            break
    for p in list(phase_dir.glob(f"{TMP_PREFIX}*")) + list(phase_dir.glob(f"{TRASH_PREFIX}*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
