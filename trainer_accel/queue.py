"""CLI: a local job queue, so one machine works through a night of trainings unattended.

`python -m trainer_accel.queue`: its command line and one call into experiments/queue.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.experiments.queue import PRIORITIES, JobQueue, add_job, format_jobs, plan_jobs, work
from trainer_accel.paths import resolve_paths
from trainer_accel.phases.registry import PIPELINE, phase_names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.queue", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="queue a job")
    add.add_argument("--phase", required=True, choices=(*phase_names(), PIPELINE))
    add.add_argument("--config", required=True, type=Path)
    add.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    add.add_argument("--priority", choices=tuple(PRIORITIES), default="normal")
    add.add_argument("--launch", type=Path, help="accelerate config file (launch/*.yaml); default: accelerate's own")
    add.add_argument(
        "--max-attempts", type=int, default=2, help="attempts before a failing job is given up (default 2)"
    )
    add.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment of the job")
    add.add_argument(
        "--artifacts-dir", type=Path, help="where the job writes (default: jobs/{id} under the artifacts dir)"
    )
    sub.add_parser("list", help="all jobs")
    sub.add_parser("plan", help="what would run, in order, with estimates")
    run = sub.add_parser("run", help="work through the queue")
    run.add_argument("--watch", action="store_true", help="keep waiting for new jobs when the queue is empty")
    run.add_argument("--poll", type=float, default=10.0, help="seconds between looks at an empty queue (--watch)")
    cancel = sub.add_parser("cancel", help="cancel a queued job, or stop a running one gracefully")
    cancel.add_argument("id", type=int)
    args = p.parse_args(argv)
    paths = resolve_paths()
    try:
        if args.command == "add":
            return add_job(JobQueue(paths), args)
        queue = JobQueue(paths)
        if args.command == "list":
            print(format_jobs(queue.jobs()) if queue.jobs() else "queue: no jobs")
        elif args.command == "plan":
            print(plan_jobs(queue))
        elif args.command == "run":
            return work(queue, args.watch, args.poll)
        else:
            print(f"job {args.id}: {queue.cancel(args.id)}")
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    exit_with(main)
