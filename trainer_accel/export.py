"""CLI: checkpoint directory -> the six-key best.pt dict downstream code loads, or a Hugging Face directory.

    python -m trainer_accel.export [--checkpoint PATH] [--out PATH] [--deployable-only]
    python -m trainer_accel.export --format hf [--out DIR] [--checkpoint PATH] [--tokenizer PATH] [--deployable-only]

Without --checkpoint, the most recently written best/ among the phases is exported; without --out, it goes to
checkpoints/best.pt, and is kept as well per phase (best.pretrain.pt, best.sft.pt) and, with a `pass` verdict, as
best.deployable.pt (see `publish`). The file is written atomically, and beside it `best.pt.json` records where it came from
(checkpoint, run, step, fingerprints, the eval verdict), since the six-key dict itself has no room for that:
`python -m trainer_accel.runs lineage checkpoints/best.pt` follows it. --deployable-only refuses a checkpoint
whose weights have no `pass` verdict (see evaluation.py). `--format hf` writes a directory that transformers'
AutoModelForCausalLM and AutoTokenizer load (default checkpoints/hf; hf_export.py, and docs/huggingface.md for
what maps to what). Exit codes: 0 done, 2 bad input or not deployable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from .checkpoint import InvalidCheckpoint, export_best_pt, read_export_record, read_meta, record_path
from .config import PHASES
from .data import sha256_file, write_atomic
from .errors import UserError, exit_with, raise_if_any, report
from .evaluation import find_verdict, require_deployable
from .hf_export import export_hf
from .hf_gpt2 import is_hf_dir
from .manifest import model_sha256, now_iso
from .paths import Paths, output_file_problem, resolve_paths

log = logging.getLogger("trainer_accel")


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


def export(source: Path, out: Path, paths: Paths) -> dict:
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


def publish(source: Path, paths: Paths) -> dict:
    """Export to checkpoints/best.pt, as every run's end does, and keep what a later export would take away.

    best.pt is replaced by every run, whatever its phase: a pretrain run after a pipeline used to take the
    deployable SFT model with it. So each export is also kept as best.{phase}.pt, and the newest one with a `pass`
    verdict as best.deployable.pt, each with its record. Names that hold the same export are hard links to one
    file: the history costs disk only once the files differ."""
    record = export(source, paths.best_pt, paths)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (or a .pt to re-export)")
    p.add_argument("--format", choices=("pt", "hf"), default="pt",
                   help="pt: the best.pt dict (default); hf: a Hugging Face transformers directory")
    p.add_argument("--out", type=Path, help="where to write (default: checkpoints/best.pt; with --format hf: checkpoints/hf)")
    p.add_argument("--tokenizer", type=Path,
                   help="--format hf: the tokenizer.json the caches were made with, if it has moved since")
    p.add_argument("--deployable-only", action="store_true",
                   help="refuse unless the checkpoint's weights passed the SFT promotion gate")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = resolve_paths()
    try:
        if args.tokenizer is not None and args.format != "hf":
            raise UserError("--tokenizer: only for --format hf (best.pt holds no tokenizer)")
        source = args.checkpoint or newest_best(paths)
        summary = require_deployable(paths, source) if args.deployable_only else None
        if args.format == "hf":
            out = args.out or paths.checkpoints / "hf"
            verdict = summary["verdict"] if summary else known_verdict(paths, source)
            record = export_hf(source, out, paths, args.tokenizer, verdict)
            log.info("exported %s (Hugging Face transformers) from %s (step %d, verdict: %s)", out, source,
                     record["step"], record.get("verdict") or "not evaluated")
            return 0
        out = args.out or paths.best_pt
        raise_if_any(output_file_problem("--out", out))
        record = export(source, out, paths) if args.out else publish(source, paths)
    except UserError as e:
        return report(e)
    except InvalidCheckpoint as e:
        return report(UserError(f"{source}: invalid checkpoint: {e}"))
    log.info("exported %s from %s (verdict: %s)", out, source, record.get("verdict") or "not evaluated")
    return 0


if __name__ == "__main__":
    exit_with(main)
