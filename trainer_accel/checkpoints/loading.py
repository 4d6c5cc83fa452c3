"""Loading a checkpoint directory or an exported best.pt, verified against its sidecar or record; the best.pt dict
`{model_cfg, train_cfg, model_state, optimizer_state, step, best_val_loss}` derived from a checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainer_accel.checkpoints.discovery import files_identity, read_steadily
from trainer_accel.checkpoints.layout import (
    BEST_PT_KEYS,
    MODEL_FILE,
    OPTIMIZER_FILE,
    InvalidCheckpoint,
    expand_aliases,
    loop_state_problems,
    model_sha256,
    read_meta,
    step_dir_name,
)
from trainer_accel.checkpoints.records import RECORD_CHECKS, verified_export_record
from trainer_accel.checkpoints.shapes import state_problems
from trainer_accel.config import (
    MODEL_FUNCTION_KEYS,
    MODEL_SHAPE_KEYS,
    complete_model_cfg,
    model_cfg_problems,
    resolved_model_cfg,
    shape_diff,
)
from trainer_accel.errors import UserError, first_line
from trainer_accel.faults import fault_point
from trainer_accel.fsio import (
    fsync_file,
)


@dataclass
class LoadedCheckpoint:
    source: Path
    model_state: dict[str, torch.Tensor]  # full state dict, tied keys restored
    optimizer_state: dict[str, Any] | None
    step: int
    best_val_loss: float | None
    meta: dict[str, Any]  # the sidecar (for a .pt: what the .pt carries, phase unknown)
    origin: Path | None = None  # where the weights live for good: for latest/ or best/, the step directory they were


def _origin(ckpt: Path, step: int) -> Path:
    """The step directory holding the same files as `ckpt` when it is latest/ or best/ (which move on; a step
    directory does not), else `ckpt`: what a record names as the source."""
    ckpt = Path(ckpt).resolve()
    if ckpt.name not in ("best", "latest"):
        return ckpt
    target = ckpt.with_name(step_dir_name(step))
    return target if files_identity(target) == files_identity(ckpt) else ckpt


def _load_optimizer(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusal, truncated zip: the user has to see which file
        raise UserError(f"{path}: cannot load optimizer state safely ({first_line(e)})") from None


def load_checkpoint(path: Path, with_optimizer: bool = True, approved: str | None = None) -> LoadedCheckpoint:
    """Load one of our checkpoint directories or an exported best.pt (a Hugging Face directory is a start point:
    training/start.py). Every read is safetensors or weights_only=True. `approved`: the sha256 of the weights a
    check made before the load passed (a promotion verdict); other weights are refused."""
    path = Path(path)
    if path.is_file():
        return _load_best_pt(path)
    if not path.exists():
        raise UserError(
            f"{path}: checkpoint not found (expected a checkpoint directory, an exported .pt file or a "
            "Hugging Face model directory)"
        )
    loaded = read_steadily(path, lambda p: _load_directory(p, with_optimizer))
    if approved is not None and model_sha256(loaded.meta) != approved:
        raise UserError(
            f"{path}: moved on to step {loaded.step} after it was checked (a run is saving there), and "
            "those weights were not; nothing was written: name the checkpoint's step directory instead"
        )
    return loaded


def _load_directory(path: Path, with_optimizer: bool) -> LoadedCheckpoint:
    try:
        meta = read_meta(path)
    except InvalidCheckpoint as e:
        raise UserError(f"{path}: invalid checkpoint: {e}") from None
    try:
        tensors = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / MODEL_FILE}: unreadable weights ({e})") from None
    optimizer_state = _load_optimizer(path / OPTIMIZER_FILE) if with_optimizer else None
    return LoadedCheckpoint(
        source=path,
        model_state=expand_aliases(tensors, meta.get("tied", {})),
        optimizer_state=optimizer_state,
        step=int(meta["step"]),
        best_val_loss=meta["best_val_loss"],
        meta=meta,
        origin=_origin(path, int(meta["step"])),
    )


def _load_best_pt(path: Path) -> LoadedCheckpoint:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a loadable best.pt ({first_line(e)})") from None
    if not isinstance(blob, dict) or set(blob) != set(BEST_PT_KEYS):
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise UserError(f"{path}: expected a best.pt dict with keys {', '.join(BEST_PT_KEYS)}, found {keys}")
    problems = loop_state_problems(blob)
    if isinstance(blob["model_cfg"], dict):
        problems += model_cfg_problems(complete_model_cfg(blob["model_cfg"]), "model_cfg", known_only=True)
    if problems:
        raise UserError(f"{path}: not a usable best.pt: {'; '.join(problems)}")
    # what the record knows of the run that wrote it (phase, caches, batch) is checked as a sidecar's is; the run id
    # is not carried: a run started from a .pt is a new run whose parent is that .pt (manifest.parent_record)
    record = verified_export_record(path) or {}
    meta = {
        "model_cfg": complete_model_cfg(blob["model_cfg"]),
        "train_cfg": blob["train_cfg"],
        "phase": record.get("phase"),
        "run_id": None,
        **{k: record[k] for k in RECORD_CHECKS if record.get(k) is not None},
    }
    return LoadedCheckpoint(
        source=path,
        model_state=blob["model_state"],
        optimizer_state=blob["optimizer_state"],
        step=int(blob["step"]),
        best_val_loss=blob["best_val_loss"],
        meta=meta,
    )


def check_model_cfg(loaded: LoadedCheckpoint, model_cfg: dict[str, Any]) -> None:
    """Refuse weights that do not fit or would mean another function: shape, biases and tying change the state
    dict; the activation, norms, positions and attention layout what it computes (dropout changes neither)."""
    saved = resolved_model_cfg(loaded.meta.get("model_cfg") or {})
    diff = shape_diff(saved, resolved_model_cfg(model_cfg), (*MODEL_SHAPE_KEYS, *MODEL_FUNCTION_KEYS))
    if diff:
        raise UserError(
            f"{loaded.source}: checkpoint model shape differs from the config ({diff}; checkpoint vs config)"
        )


def best_pt_dict(loaded: LoadedCheckpoint) -> dict[str, Any]:
    ckpt = loaded.source
    problems = state_problems(loaded.model_state, loaded.meta["model_cfg"])
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(
            f"{ckpt}: its weights do not fit its model_cfg: {'; '.join(problems[:3])}{more}; nothing was written"
        )
    return {
        "model_cfg": loaded.meta["model_cfg"],
        "train_cfg": loaded.meta["train_cfg"],
        "model_state": loaded.model_state,
        "optimizer_state": loaded.optimizer_state,
        "step": loaded.step,
        "best_val_loss": loaded.best_val_loss,
    }


def export_best_pt(
    ckpt: Path, out: Path, approved: str | None = None, load: Callable[..., LoadedCheckpoint] | None = None
) -> LoadedCheckpoint:
    """Write the six-key best.pt atomically: a kill leaves the old file or none, never part of one. Returns what
    was loaded: its sidecar is the one of the weights written (a re-read of latest/ could be the next save's).
    `load(path, approved)`: how the weights are read (training/start.py's, which merges an adapter into its
    base); by default a checkpoint's own files."""
    loaded = (load or (lambda p, a: load_checkpoint(p, approved=a)))(ckpt, approved)
    blob = best_pt_dict(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(blob, tmp)
        fault_point("export", partial=tmp)
        fsync_file(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return loaded
