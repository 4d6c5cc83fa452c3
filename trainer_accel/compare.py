"""CLI: put runs side by side, from their event logs.

`python -m trainer_accel.compare`: its command line and one call into observability/compare.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.observability.compare import format_table, load_runs, plot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="artifacts dir or events.jsonl")
    p.add_argument(
        "--out", type=Path, default=None, help="the PNG to draw (default compare.png, when matplotlib is installed)"
    )
    args = p.parse_args(argv)
    try:
        series = load_runs(args.runs)
    except UserError as e:
        return report(e)
    print(format_table(series))  # the table needs nothing more; the picture needs matplotlib
    try:
        plot(series, args.out or Path("compare.png"))
    except UserError as e:
        if args.out is not None:
            return report(e)
        print("compare: no picture (drawing needs matplotlib: pip install -e '.[plot]')", file=sys.stderr)
        return 0
    print(f"wrote {args.out or 'compare.png'}")
    return 0


if __name__ == "__main__":
    exit_with(main)
