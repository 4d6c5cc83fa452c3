"""What `python -m trainer_accel.export` does: a checkpoint (or an exported .pt) as the six-key best.pt dict or
as a Hugging Face directory, each written atomically with its record, refused unless deployable when asked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trainer_accel.checkpoints.layout import InvalidCheckpoint
from trainer_accel.errors import UserError, raise_if_any
from trainer_accel.experiments.best_pt import (
    export_run_best,
    export_with_record,
    known_verdict,
    newest_best,
    overwrite_problems,
    verdict_of,
)
from trainer_accel.experiments.evaluation import require_deployable
from trainer_accel.hf.export import export_hf
from trainer_accel.paths import Paths, output_file_problem, unwritable
from trainer_accel.phases.registry import is_chat_model

log = logging.getLogger(__name__)


def export(
    paths: Paths,
    checkpoint: Path | None,
    fmt: str,
    out: Path | None,
    tokenizer: Path | None,
    deployable_only: bool,
) -> dict:
    """Export `checkpoint` (default: the newest best/ among the phases) as `fmt` ("pt" or "hf") to `out` (default:
    checkpoints/best.pt, kept per phase too; checkpoints/hf); returns the export's record."""
    if tokenizer is not None and fmt != "hf":
        raise UserError("--tokenizer: only for --format hf (best.pt holds no tokenizer)")
    source = checkpoint or newest_best(paths)
    try:
        return _export(paths, source, fmt, out, tokenizer, deployable_only)
    except InvalidCheckpoint as e:
        raise UserError(f"{source}: invalid checkpoint: {e}") from None
    except OSError as e:  # the disk, not the input: full, read-only, or changed under the export
        raise UserError(f"{e.filename or out}: cannot write the export ({e.strerror or e})") from None


def _export(paths: Paths, source: Path, fmt: str, out: Path | None, tokenizer: Path | None, deployable_only: bool):
    summary = require_deployable(paths, source) if deployable_only else None
    approved = summary["candidate"]["model_sha256"] if summary else None  # latest/ may move on before the load
    if fmt == "hf":
        out = out or paths.checkpoints / "hf"
        raise_if_any(
            unwritable([("--out", out.parent)])
            or ([f"--out {out}: is a file; give a directory"] if out.exists() and not out.is_dir() else [])
        )
        verdict = (
            (lambda meta: summary["verdict"])
            if summary
            else (lambda meta: known_verdict(paths, source) if Path(source).is_file() else verdict_of(paths, meta))
        )
        record = export_hf(source, out, paths, tokenizer, verdict, approved, chat_model=is_chat_model)
        log.info(
            "exported %s (Hugging Face transformers) from %s (step %d, verdict: %s)",
            out,
            source,
            record["step"],
            record.get("verdict") or "not evaluated",
        )
        return record
    given = out
    out = out or paths.best_pt
    raise_if_any(output_file_problem("--out", out) + (overwrite_problems(out) if given else []))
    record = export_with_record(source, out, paths, approved) if given else export_run_best(source, paths, approved)
    log.info("exported %s from %s (verdict: %s)", out, source, record.get("verdict") or "not evaluated")
    return record
