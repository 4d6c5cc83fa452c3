"""The best.pt exports: a checkpoint as the six-key dict with its record beside it, and the copies a run's end keeps.

`checkpoints/best.pt` is what every run's end writes and `python -m trainer_accel.export` writes by default;
its record (`best.pt.json`) says where it came from and, through the promotion gate's summary (evaluation), the
verdict on its weights, which decides whether it is also kept as best.deployable.pt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from trainer_accel.checkpoints.layout import InvalidCheckpoint, model_sha256, read_meta
from trainer_accel.checkpoints.loading import export_best_pt
from trainer_accel.checkpoints.records import read_export_record, record_path
from trainer_accel.errors import UserError
from trainer_accel.experiments.evaluation import find_verdict
from trainer_accel.fsio import loads, now_iso, sha256_file, write_atomic
from trainer_accel.hf.directory import is_hf_dir
from trainer_accel.paths import Paths
from trainer_accel.phases.registry import phase_names
from trainer_accel.training.start import merged_weights

log = logging.getLogger(__name__)


def newest_best(paths: Paths) -> Path:
    """The best/ checkpoint written last among the phases (after a pipeline: the SFT best)."""
    found = []
    for phase in phase_names():
        best = paths.phase_dir(phase) / "best"
        try:
            found.append((read_meta(best, verify=False).get("created_at", 0.0), best))
        except InvalidCheckpoint:
            continue
    if not found:
        tried = ", ".join(str(paths.phase_dir(p) / "best") for p in phase_names())
        raise UserError(f"no best checkpoint to export (looked in {tried}); pass --checkpoint PATH")
    return max(found)[1]


def known_verdict(paths: Paths, source: Path) -> str | None:
    """The promotion verdict of a checkpoint's weights, if they were evaluated (for a .pt: what its record says)."""
    if source.is_file():
        return (read_export_record(source) or {}).get("verdict")
    if not source.is_dir() or is_hf_dir(source):
        return None
    return verdict_of(paths, read_meta(source, verify=False))


def verdict_of(paths: Paths, meta: dict) -> str | None:
    """The promotion verdict of the weights a sidecar describes, if they were evaluated."""
    summary = find_verdict(paths, meta.get("run_id"), model_sha256(meta))
    return summary["verdict"] if summary else None


def overwrite_problems(out: Path) -> list[str]:
    """An explicit --out replaces only an earlier export of ours: the file with its record beside it, the same bytes
    the record names. Anything else there is the user's (`--out configs/pretrain.json` used to turn a config into
    a zip), and so is a file where the record would go (`--out configs/pretrain` writes configs/pretrain.json)."""
    problems, record = [], record_path(out)
    if out.is_file():
        earlier = read_export_record(out)
        if earlier is None:
            problems.append(
                f"--out {out}: an existing file that is not an earlier export (no {record.name} "
                "record of it beside it); nothing was written: choose another path, or move it away"
            )
        elif earlier.get("best_pt_sha256") and sha256_file(out) != earlier["best_pt_sha256"]:
            problems.append(
                f"--out {out}: changed since it was exported (its sha256 is not the one {record.name} "
                "records); nothing was written: choose another path, or move it away"
            )
    elif record.exists() and not _is_export_record(record):
        problems.append(
            f"--out {out}: {record} exists and is not an export record of this trainer (the record of "
            "--out is written there); nothing was written: choose another path"
        )
    return problems


def _is_export_record(path: Path) -> bool:
    try:
        record = loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == "trainer_accel.export"


def export_with_record(source: Path, out: Path, paths: Paths, approved: str | None = None) -> dict:
    """Write best.pt from a checkpoint directory and its record beside it; returns the record."""
    loaded = export_best_pt(source, out, approved, load=merged_weights)
    meta = loaded.meta
    record = {
        "format": "trainer_accel.export",
        "best_pt": str(out.resolve()),
        "best_pt_sha256": sha256_file(out),
        "best_pt_size": out.stat().st_size,
        "exported_at": now_iso(),
        "source": str(loaded.origin or Path(source).resolve()),
    }
    if Path(source).is_dir():
        record.update(
            {
                k: meta.get(k)
                for k in (
                    "phase",
                    "run_id",
                    "step",
                    "best_val_loss",
                    "data_fingerprint",
                    "config_fingerprint",
                    "parent",
                    "caches",
                    "global_batch",
                    "tokenizer",
                    "tokenizer_path",
                    "chat",
                )
            }
        )
        record.update({"added_tokens": meta["added_tokens"]} if "added_tokens" in meta else {})
        record.update(model_sha256=model_sha256(meta), verdict=verdict_of(paths, meta))
    else:  # re-exporting a .pt keeps what its own record knew
        earlier = read_export_record(Path(source))
        if earlier is None:  # a record would vouch for a file nothing verified; out stays as unverified as it came
            if _is_export_record(record_path(out)):  # an earlier export's, which would now describe another file
                record_path(out).unlink()
            log.warning(
                "%s came without a record (%s), so %s gets none: nothing can vouch for where it came from",
                source,
                record_path(Path(source)).name,
                out,
            )
            return record
        record.update({k: v for k, v in earlier.items() if k not in record})
    write_atomic(record_path(out), (json.dumps(record, indent=2) + "\n").encode())
    return record


def export_run_best(source: Path, paths: Paths, approved: str | None = None) -> dict:
    """Export to checkpoints/best.pt, as every run's end does, and keep what a later export would take away.

    best.pt is replaced by every run, whatever its phase: a pretrain run after a pipeline used to take the
    deployable SFT model with it. So each export is also kept as best.{phase}.pt, and the newest one with a `pass`
    verdict as best.deployable.pt, each with its record. Names that hold the same export are hard links to one
    file: the history costs disk only once the files differ."""
    record = export_with_record(source, paths.best_pt, paths, approved)
    kept = [f"best.{record['phase']}.pt"] if record.get("phase") in phase_names() else []
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
