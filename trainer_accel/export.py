"""CLI: checkpoint directory -> the six-key best.pt dict downstream code loads, or a Hugging Face directory.

    python -m trainer_accel.export [--checkpoint PATH] [--out PATH] [--deployable-only]
    python -m trainer_accel.export --format hf [--out DIR] [--checkpoint PATH] [--tokenizer PATH] [--deployable-only]

Without --checkpoint, the most recently written best/ among the phases is exported; without --out, it goes to
checkpoints/best.pt, and is kept as well per phase (best.pretrain.pt, best.sft.pt) and, with a `pass` verdict, as
best.deployable.pt (experiments/best_pt.py). The file is written atomically, and beside it `best.pt.json` records
where it came from (checkpoint, run, step, fingerprints, the eval verdict), since the six-key dict itself has no
room for that: `python -m trainer_accel.runs lineage checkpoints/best.pt` follows it. --deployable-only refuses a
checkpoint whose weights have no `pass` verdict (experiments/evaluation.py). `--format hf` writes a directory
that transformers' AutoModelForCausalLM and AutoTokenizer load (default checkpoints/hf; hf/export.py, and
docs/huggingface.md for what maps to what). Exit codes: 0 done, 2 bad input or not deployable.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from trainer_accel.checkpoints.layout import InvalidCheckpoint
from trainer_accel.errors import UserError, exit_with, raise_if_any, report
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
from trainer_accel.paths import output_file_problem, resolve_paths, unwritable
from trainer_accel.phases.registry import is_chat_model

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (or a .pt to re-export)")
    p.add_argument(
        "--format",
        choices=("pt", "hf"),
        default="pt",
        help="pt: the best.pt dict (default); hf: a Hugging Face transformers directory",
    )
    p.add_argument(
        "--out", type=Path, help="where to write (default: checkpoints/best.pt; with --format hf: checkpoints/hf)"
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="--format hf: the tokenizer.json the caches were made with, if it has moved since (or "
        "'bytes': the built-in byte tokenizer, for a .pt that records none)",
    )
    p.add_argument(
        "--deployable-only",
        action="store_true",
        help="refuse unless the checkpoint's weights passed the SFT promotion gate",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = resolve_paths()
    try:
        if args.tokenizer is not None and args.format != "hf":
            raise UserError("--tokenizer: only for --format hf (best.pt holds no tokenizer)")
        source = args.checkpoint or newest_best(paths)
        summary = require_deployable(paths, source) if args.deployable_only else None
        approved = summary["candidate"]["model_sha256"] if summary else None  # latest/ may move on before the load
        if args.format == "hf":
            out = args.out or paths.checkpoints / "hf"
            raise_if_any(
                unwritable([("--out", out.parent)])
                or ([f"--out {out}: is a file; give a directory"] if out.exists() and not out.is_dir() else [])
            )
            verdict = (
                (lambda meta: summary["verdict"])
                if summary
                else (lambda meta: known_verdict(paths, source) if Path(source).is_file() else verdict_of(paths, meta))
            )
            record = export_hf(source, out, paths, args.tokenizer, verdict, approved, is_chat_model)
            log.info(
                "exported %s (Hugging Face transformers) from %s (step %d, verdict: %s)",
                out,
                source,
                record["step"],
                record.get("verdict") or "not evaluated",
            )
            return 0
        out = args.out or paths.best_pt
        raise_if_any(output_file_problem("--out", out) + (overwrite_problems(out) if args.out else []))
        record = (
            export_with_record(source, out, paths, approved) if args.out else export_run_best(source, paths, approved)
        )
    except UserError as e:
        return report(e)
    except InvalidCheckpoint as e:
        return report(UserError(f"{source}: invalid checkpoint: {e}"))
    except OSError as e:  # the disk, not the input: full, read-only, or changed under the export
        return report(UserError(f"{e.filename or args.out}: cannot write the export ({e.strerror or e})"))
    log.info("exported %s from %s (verdict: %s)", out, source, record.get("verdict") or "not evaluated")
    return 0


if __name__ == "__main__":
    exit_with(main)
