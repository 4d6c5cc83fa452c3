"""CLI: check the machine and the files a run is about to use, one line per check, before hours are spent.

`python -m trainer_accel.doctor`: its command line and one call into experiments/doctor.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.experiments.doctor import run_checks
from trainer_accel.paths import resolve_paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.doctor", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help="a phase or pipeline config: check its caches and checkpoint disk too")
    p.add_argument("--launch", type=Path, help="the accelerate launch file to check (default: accelerate's own)")
    p.add_argument("--quick", action="store_true", help="do not hash the caches (size and dtype are still checked)")
    args = p.parse_args(argv)
    try:
        checks = run_checks(resolve_paths(), args.config, args.launch, args.quick)
    except UserError as e:
        return report(e)
    for check in checks:
        print(check)
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    print(f"doctor: {failed} failed, {warned} warning(s), {len(checks) - failed - warned} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    exit_with(main)
