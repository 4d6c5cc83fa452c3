"""The best.pt exports: a checkpoint as the six-key dict with its record beside it, and the copies a run's end keeps.

`checkpoints/best.pt` is what every run's end writes and `python -m trainer_accel.export` writes by default;
its record (`best.pt.json`) says where it came from and, through the promotion gate's summary (evaluation), the
verdict on its weights, which decides whether it is also kept as best.deployable.pt.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trainer_accel.checkpoints.store import (
    InvalidCheckpoint,
    export_best_pt,
    model_sha256,
    read_export_record,
    read_meta,
    record_path,
)
from trainer_accel.config import PHASES
from trainer_accel.errors import UserError
from trainer_accel.experiments.evaluation import find_verdict
from trainer_accel.fsio import now_iso, sha256_file, write_atomic
from trainer_accel.hf.directory import is_hf_dir
from trainer_accel.paths import Paths


def newest_best(paths: Paths) -> Path:
    """The best/ checkpoint written last among the phases (after a pipeline: the SFT best)."""
    found = []
    for phase in PHASES:
        best = paths.phase_dir(phase) / "best"
        try:
            found.append((read_meta(best, verify=False).get("created_at", 0.0), best))
        except InvalidCheckpoint:
            continue
    if not found:
        tried = ", ".join(str(paths.phase_dir(p) / "best") for p in PHASES)
        raise UserError(f"no best checkpoint to export (looked in {tried}); pass --checkpoint PATH")
    return max(found)[1]


def known_verdict(paths: Paths, source: Path) -> str | None:
    """The promotion verdict of a checkpoint's weights, if they were evaluated (for a .pt: what its record says)."""
    if source.is_file():
        return (read_export_record(source) or {}).get("verdict")
    if not source.is_dir() or is_hf_dir(source):
        return None
    meta = read_meta(source, verify=False)
    summary = find_verdict(paths, meta.get("run_id"), model_sha256(meta))
    return summary["verdict"] if summary else None


def export_with_record(source: Path, out: Path, paths: Paths) -> dict:
    """Write best.pt from a checkpoint directory and its record beside it; returns the record."""
    out = export_best_pt(source, out)
    record = {"format": "trainer_accel.export", "best_pt": str(out.resolve()), "best_pt_sha256": sha256_file(out),
              "best_pt_size": out.stat().st_size,
              "exported_at": now_iso(), "source": str(Path(source).resolve())}
    if Path(source).is_dir():
        meta = read_meta(source, verify=False)
        record.update({k: meta.get(k) for k in ("phase", "run_id", "step", "best_val_loss", "data_fingerprint",
                                                "config_fingerprint", "parent", "caches", "global_batch", "tokenizer",
                                                "tokenizer_path")})
        record.update(model_sha256=model_sha256(meta), verdict=known_verdict(paths, Path(source)))
    else:  # re-exporting a .pt keeps what its own record knew
        earlier = read_export_record(Path(source)) or {}
        record.update({k: v for k, v in earlier.items() if k not in record})
    write_atomic(record_path(out), (json.dumps(record, indent=2) + "\n").encode())
    return record


def export_run_best(source: Path, paths: Paths) -> dict:
    """Export to checkpoints/best.pt, as every run's end does, and keep what a later export would take away.

    best.pt is replaced by every run, whatever its phase: a pretrain run after a pipeline used to take the
    deployable SFT model with it. So each export is also kept as best.{phase}.pt, and the newest one with a `pass`
    verdict as best.deployable.pt, each with its record. Names that hold the same export are hard links to one
    file: the history costs disk only once the files differ."""
    record = export_with_record(source, paths.best_pt, paths)
    kept = [f"best.{record['phase']}.pt"] if record.get("phase") in PHASES else []
    kept += ["best.deployable.pt"] if record.get("verdict") == "pass" else []
    for name in kept:
        link_export(paths.best_pt, paths.checkpoints / name, record)
    return record


def link_export(exported: Path, name: Path, record: dict) -> None:
    """`name` becomes the same file as `exported` (a copy where links are not possible), then its record."""
    tmp = name.with_name(f".{name.name}.tmp-{os.getpid()}")
    try:
        try:
            os.link(exported, tmp)
        except OSError:
            shutil.copyfile(exported, tmp)
        os.replace(tmp, name)
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(record_path(name), (json.dumps({**record, "best_pt": str(name.resolve())}, indent=2) + "\n").encode())
