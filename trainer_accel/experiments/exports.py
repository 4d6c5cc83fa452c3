"""What `python -m trainer_accel.export` does: a checkpoint (or an exported .pt) as the six-key best.pt dict or
as a Hugging Face directory (an adapter run's merged into its base), or an adapter run's as PEFT's adapter
directory, each written atomically with its record, refused unless deployable when asked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trainer_accel.checkpoints.layout import InvalidCheckpoint
from trainer_accel.config import ModelConfig
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
from trainer_accel.hf.directory import is_hf_dir
from trainer_accel.hf.export import export_hf
from trainer_accel.hf.peft import write_peft_dir
from trainer_accel.paths import Paths, output_file_problem, unwritable
from trainer_accel.phases.registry import is_chat_model
from trainer_accel.training.adapters import adapter_config_of, is_adapter
from trainer_accel.training.start import load_start

log = logging.getLogger(__name__)


def export(
    paths: Paths,
    checkpoint: Path | None,
    fmt: str,
    out: Path | None,
    tokenizer: Path | None,
    deployable_only: bool,
    base_name: str | None = None,
) -> dict:
    """Export `checkpoint` (default: the newest best/ among the phases) as `fmt` ("pt" or "hf") to `out` (default:
    checkpoints/best.pt, kept per phase too; checkpoints/hf); returns the export's record."""
    if tokenizer is not None and fmt != "hf":
        raise UserError("--tokenizer: only for --format hf (best.pt holds no tokenizer)")
    if base_name is not None and fmt != "peft":
        raise UserError("--base-name: only for --format peft (what adapter_config.json names as the base)")
    source = checkpoint or newest_best(paths)
    try:
        return _export(paths, source, fmt, out, tokenizer, deployable_only, base_name)
    except InvalidCheckpoint as e:
        raise UserError(f"{source}: invalid checkpoint: {e}") from None
    except OSError as e:  # the disk, not the input: full, read-only, or changed under the export
        raise UserError(f"{e.filename or out}: cannot write the export ({e.strerror or e})") from None


def _export(
    paths: Paths,
    source: Path,
    fmt: str,
    out: Path | None,
    tokenizer: Path | None,
    deployable_only: bool,
    base_name: str | None,
):
    summary = require_deployable(paths, source) if deployable_only else None
    approved = summary["candidate"]["model_sha256"] if summary else None  # latest/ may move on before the load
    if fmt == "peft":
        out = out or paths.checkpoints / "peft"
        raise_if_any(unwritable([("--out", out.parent)]))
        return export_peft(source, out, base_name, approved)
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
        record = export_hf(
            source,
            out,
            paths,
            tokenizer,
            verdict,
            approved,
            chat_model=is_chat_model,
            load=lambda path, approved: load_start(path, None, False, approved=approved),
        )
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


def export_peft(source: Path, out: Path, base_name: str | None, approved: str | None) -> dict:
    """An adapter run's checkpoint as PEFT's adapter directory (hf/peft.py), naming the base it was trained on."""
    loaded = load_start(source, None, False, merge=False, approved=approved)
    if not is_adapter(loaded):
        raise UserError(
            f"{source}: a checkpoint of full training has no adapter; --format peft is for a run with an adapter "
            "section (export this one with --format pt or hf)"
        )
    settings, base = adapter_config_of(loaded), loaded.meta["adapter"]["base"]
    name = base_name or base.get("source")
    record = {
        "checkpoint": str(Path(source).resolve()),
        "step": loaded.step,
        "phase": loaded.meta.get("phase"),
        "run_id": loaded.meta.get("run_id"),
        "base": base,
        "trained_against": "the base quantized to NF4" if settings.quantize_base == "nf4" else "the base as it is",
    }
    write_peft_dir(out, settings, loaded.model_state, ModelConfig(**loaded.meta["model_cfg"]), name, record)
    nf4 = " (trained against its NF4 copy)" if settings.quantize_base == "nf4" else ""
    log.info("exported %s (a PEFT LoRA adapter, r=%d) from %s (step %d), on the base %s%s", out, settings.r, source,
             loaded.step, name, nf4)  # fmt: skip
    if base_name is None and not is_hf_dir(Path(name)):
        log.info(
            "the base %s is one of our checkpoints: PEFT and vLLM put an adapter on a Hugging Face model, so export "
            "it with --format hf --checkpoint %s and name that directory with --base-name",
            name,
            name,
        )
    return record
