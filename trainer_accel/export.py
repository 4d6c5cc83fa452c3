"""CLI: checkpoint directory -> the six-key best.pt dict downstream code loads.

    python -m trainer_accel.export [--checkpoint PATH] [--out PATH]

Without --checkpoint, the most recently written best/ among the phases is exported; without --out, it goes to
checkpoints/best.pt. The file is written atomically. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .checkpoint import InvalidCheckpoint, export_best_pt, read_meta
from .config import PHASES
from .errors import UserError, report
from .paths import Paths, resolve_paths

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (or a .pt to re-export)")
    p.add_argument("--out", type=Path, help="where to write (default: checkpoints/best.pt)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = resolve_paths()
    try:
        source = args.checkpoint or newest_best(paths)
        out = export_best_pt(source, args.out or paths.best_pt)
    except UserError as e:
        return report(e)
    log.info("exported %s from %s", out, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
