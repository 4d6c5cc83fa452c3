"""CLI: flags -> the phase or pipeline policy (experiments/runner.py).

    accelerate launch -m trainer_accel.run --phase {pretrain,sft,...,pipeline} --config configs/X.json
    python -m trainer_accel.run ...   (one process, no launcher)

Exit codes: 0 done, 2 bad input (config, caches, checkpoint, flags; one line per problem), 3 stopped by
SIGTERM/SIGINT after writing a checkpoint, 1 anything else. `--result-json PATH` also writes them down for
orchestrators (result.py); `--plan` prints what the run would do and trains nothing (plan.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.experiments.runner import run
from trainer_accel.phases.registry import PIPELINE, describe, phase_names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.run", description=__doc__.split("\n")[0])
    p.add_argument("--phase", required=True, choices=(*phase_names(), PIPELINE), help=describe())
    p.add_argument("--config", required=True, type=Path, help="phase config JSON (pipeline: the pipeline config)")
    p.add_argument(
        "--device",
        choices=("cpu", "mps", "cuda"),
        default=None,
        help="default: CUDA, else MPS, else CPU; under accelerate launch the launcher decides unless cpu",
    )
    p.add_argument("--resume", type=Path, default=None, help="checkpoint directory or exported .pt to resume from")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train_cfg.base_lr=1e-3 (repeatable; VALUE is JSON; "
        "in a pipeline prefix a phase's name, e.g. sft., to reach one phase)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print what the run would do (config, compute, data, checkpoints, resume) and exit without training",
    )
    p.add_argument(
        "--result-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a machine-readable result here when the run exits, also on failure",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (Accelerate, trackers, checkpoints)")
    args = p.parse_args(argv)
    if args.resume is not None and args.no_resume:
        p.error("--resume and --no-resume contradict each other")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)  # the --phase choices come from the registry, installed phases included
    except UserError as e:
        return report(e)
    return run(args)


if __name__ == "__main__":
    exit_with(main)
