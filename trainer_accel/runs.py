"""CLI: the run registry under runs/, read back.

`python -m trainer_accel.runs`: its command line and one call into experiments/runs.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer_accel.devices.accelerator import pick_device
from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.experiments.evaluation import (
    evaluate_checkpoints,
    format_summary,
    not_its_parent,
)
from trainer_accel.experiments.runs import find_run, format_lineage, lineage, list_runs
from trainer_accel.paths import resolve_paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.runs", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="a table of the runs under runs/")
    show = sub.add_parser("show", help="one run's manifest")
    show.add_argument("run_id")
    lin = sub.add_parser("lineage", help="from a checkpoint or best.pt back to the data")
    lin.add_argument("path", type=Path)
    lin.add_argument("--json", action="store_true", help="the chain as JSON")
    ev = sub.add_parser("evaluate", help="eval summary and promotion verdict of an SFT checkpoint")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--baseline", type=Path, required=True, help="the checkpoint it started from")
    ev.add_argument(
        "--tolerance", type=float, default=None, help="default: the candidate's train_cfg.forgetting_tolerance"
    )
    ev.add_argument(
        "--min-improvement",
        type=float,
        default=None,
        help="how far each SFT val loss must fall (nats/token); default: the candidate's "
        "train_cfg.min_improvement. It must also fall by more than twice its standard error",
    )
    ev.add_argument(
        "--device",
        default=None,
        help="cpu, mps, cuda or cuda:N; default: as `run` picks, CUDA, else Apple MPS, else CPU",
    )
    args = p.parse_args(argv)
    paths = resolve_paths()
    try:
        if args.command == "list":
            print(list_runs(paths))
        elif args.command == "show":
            print(json.dumps(find_run(paths, args.run_id), indent=2))
        elif args.command == "lineage":
            nodes = lineage(paths, args.path)
            print(json.dumps(nodes, indent=2) if args.json else format_lineage(nodes))
        else:
            summary = evaluate_checkpoints(
                paths, args.checkpoint, args.baseline, args.tolerance, pick_device(args.device), args.min_improvement
            )
            print(format_summary(summary))
            return 0 if summary["verdict"] == "pass" and not not_its_parent(summary) else 1
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    exit_with(main)
