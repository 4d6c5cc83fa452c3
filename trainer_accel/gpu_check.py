"""Every CUDA path of the trainer, run for real on the GPU at hand, in one command, with a table at the end.

`python -m trainer_accel.gpu_check`: its command line and one call into tools/gpu_check.py.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from trainer_accel.errors import exit_with
from trainer_accel.tools.gpu_check import BENCHES, run_checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="keep runs and logs here (default: a temporary dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-tests", action="store_true", help="skip the CPU test suite")
    p.add_argument(
        "--only",
        metavar="WORDS",
        default=None,
        help="run only the checks whose name holds one of these comma-separated words, e.g. "
        "'FSDP2,activation' (with the check each reads from); the suite and benches as their own "
        "flags say",
    )
    p.add_argument("--no-bench", action="store_true", help="skip the benches")
    p.add_argument(
        "--bench",
        default=",".join(BENCHES),
        metavar="NAMES",
        help=f"which benches, comma-separated, in order (default: {','.join(BENCHES)}: GPT-2 small, a "
        "SmolLM2-135M-shaped and a Llama-3.2-1B-shaped model, the last with activation checkpointing "
        "at the largest batch that fits)",
    )
    p.add_argument("--bench-windows", type=int, default=2, help="measured bench windows (default 2)")
    p.add_argument(
        "--time-limit",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="stop waiting for the test suite and the bench when this much time has passed, so that the "
        "table is still printed (default 900)",
    )
    args = p.parse_args(argv)
    unknown = [b for b in args.bench.split(",") if b and b not in BENCHES]
    if unknown:
        p.error(f"--bench {args.bench}: unknown {', '.join(unknown)} (known: {', '.join(BENCHES)})")
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing was run")
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        return run_checks(args, workdir)


if __name__ == "__main__":
    exit_with(main)
