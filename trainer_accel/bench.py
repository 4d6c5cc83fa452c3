"""Is the trainer as fast as a hand-written loop on this machine? Measured, in one run, on the same model,

`python -m trainer_accel.bench`: its command line and one call into tools/bench.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer_accel.devices.accelerator import DEVICES
from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.phases.registry import phase_names
from trainer_accel.tools.bench import packing_bench, run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a pretrain or sft config (model, batch, precision, cadence)")
    p.add_argument("--phase", choices=phase_names(), default=phase_names()[0])
    p.add_argument(
        "--device", choices=DEVICES, default=None, help="default: as `run` picks, CUDA, else Apple MPS, else CPU"
    )
    p.add_argument("--windows", type=int, default=6, help="measured windows of log_every steps (after 1 warm-up)")
    p.add_argument(
        "--interleave",
        choices=("step", "window"),
        default=None,
        help="how the plain loop runs between the trainer's steps: alternating step by step (default on "
        "CPU) or a window's worth mid-window (default on a GPU, whose steps are asynchronous)",
    )
    p.add_argument("--big-cache-gb", type=float, default=0.0, help="also show resident memory on a cache this big")
    p.add_argument("--json", type=Path, default=None, help="write every figure here as JSON")
    p.add_argument(
        "--packing",
        action="store_true",
        help="SFT only: counted (answer) tokens per second with train_cfg.pack off and on, same T and B",
    )
    args = p.parse_args(argv)
    if args.windows < 1:
        p.error(f"--windows: expected a positive number of windows, got {args.windows}")
    try:
        return packing_bench(args) if args.packing else run_bench(args)
    except UserError as e:
        return report(e)


if __name__ == "__main__":
    exit_with(main)
