"""CLI: checkpoint directory -> the six-key best.pt dict downstream code loads, or a Hugging Face directory.

    python -m trainer_accel.export [--checkpoint PATH] [--out PATH] [--deployable-only]
    python -m trainer_accel.export --format hf [--out DIR] [--checkpoint PATH] [--tokenizer PATH] [--deployable-only]
    python -m trainer_accel.export --format peft [--out DIR] [--checkpoint PATH] [--base-name NAME]

Without --checkpoint, the most recently written best/ among the phases is exported; without --out, it goes to
checkpoints/best.pt, and is kept as well per phase (best.pretrain.pt, best.sft.pt) and, with a `pass` verdict, as
best.deployable.pt (experiments/best_pt.py). The file is written atomically, and beside it `best.pt.json` records
where it came from (checkpoint, run, step, fingerprints, the eval verdict), since the six-key dict itself has no
room for that: `python -m trainer_accel.runs lineage checkpoints/best.pt` follows it. --deployable-only refuses a
checkpoint whose weights have no `pass` verdict (experiments/evaluation.py). `--format hf` writes a directory
that transformers' AutoModelForCausalLM and AutoTokenizer load (default checkpoints/hf; hf/export.py, and
docs/huggingface.md for what maps to what). `--format peft` writes an adapter run's adapter as PEFT's
adapter_config.json + adapter_model.safetensors (default checkpoints/peft; docs/adapters.md).
Exit codes: 0 done, 2 bad input or not deployable.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.experiments.exports import export
from trainer_accel.paths import resolve_paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (or a .pt to re-export)")
    p.add_argument(
        "--format",
        choices=("pt", "hf", "peft"),
        default="pt",
        help="pt: the best.pt dict (default); hf: a Hugging Face transformers directory; peft: an adapter run's "
        "adapter as PEFT's adapter directory",
    )
    p.add_argument(
        "--base-name",
        help="--format peft: the base_model_name_or_path to write (default: the base the adapter was trained on)",
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
    try:
        export(
            resolve_paths(),
            args.checkpoint,
            args.format,
            args.out,
            args.tokenizer,
            args.deployable_only,
            args.base_name,
        )
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    exit_with(main)
