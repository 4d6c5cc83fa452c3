"""CLI: a local job queue, so one machine works through a night of trainings unattended.

    python -m trainer_accel.queue add --phase P --config C [--set K=V ...] [--priority high|normal|low]
                                      [--launch FILE] [--max-attempts N] [--env K=V ...] [--artifacts-dir DIR]
    python -m trainer_accel.queue list
    python -m trainer_accel.queue plan
    python -m trainer_accel.queue run [--watch] [--poll SECONDS]
    python -m trainer_accel.queue cancel ID

Jobs live in a SQLite database, `queue.db` under the artifacts dir. A worker claims a job inside an immediate
transaction (SQLite's write lock), so two workers never take the same one. Jobs run in priority, then submission
order, each through `accelerate launch` with its launch file, in its own artifacts dir (`jobs/{id}/` by default:
two jobs of one phase must not resume each other's checkpoints), and with the shared run registry (`runs/`).
The job's `--result-json` is how the worker learns what happened, since `accelerate launch` turns every failing
exit code into 1. Outcomes: completed; interrupted (runnable again: it resumes from its latest checkpoint);
failed with exit 2, bad input, at once (retrying cannot fix a config); any other failure is retried until
`max_attempts` attempts have failed. A worker sent SIGTERM or SIGINT passes it on to its training processes, waits
for the job's checkpoint, marks it interrupted and exits 3.
Scheduling across machines is out of scope (use SLURM or Ray).
Exit codes: 0 done (queue run: the queue is empty), 2 bad input, 3 the worker was stopped by a signal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer_accel.errors import UserError
from trainer_accel.fsio import loads, now_iso
from trainer_accel.paths import Paths, resolve_paths

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
RUNNABLE = ("queued", "interrupted")
NO_RETRY_EXIT = (2,)  # bad input: retrying cannot help, so the job fails at once
PLACEMENT_ENV = ("TRAINER_CHECKPOINTS_DIR", "TRAINER_SAMPLES_DIR", "TRAINER_METRICS_DIR", "TRAINER_EVENTS_PATH")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    phase TEXT NOT NULL, config TEXT NOT NULL, sets TEXT NOT NULL, env TEXT NOT NULL,
    priority INTEGER NOT NULL, launch TEXT, cwd TEXT NOT NULL, artifacts TEXT,
    status TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
    submitted_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, exit_code INTEGER, run_ids TEXT,
    failure TEXT, worker TEXT, pid INTEGER, cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL, worker TEXT NOT NULL,
    started_at TEXT NOT NULL, finished_at TEXT, exit_code INTEGER, outcome TEXT
);
"""


@dataclass
class Job:
    id: int
    phase: str
    config: str
    sets: list[str]
    env: dict[str, str]
    priority: int
    launch: str | None
    cwd: str
    artifacts: str
    status: str
    attempts: int
    failures: int
    max_attempts: int
    row: sqlite3.Row

    @classmethod
    def from_row(cls, row: sqlite3.Row, queue_artifacts: Path) -> Job:
        return cls(
            id=row["id"],
            phase=row["phase"],
            config=row["config"],
            sets=json.loads(row["sets"]),
            env=json.loads(row["env"]),
            priority=row["priority"],
            launch=row["launch"],
            cwd=row["cwd"],
            artifacts=row["artifacts"] or str(queue_artifacts / "jobs" / str(row["id"])),
            status=row["status"],
            attempts=row["attempts"],
            failures=row["failures"],
            max_attempts=row["max_attempts"],
            row=row,
        )

    def run_env(self, runs_dir: Path) -> dict[str, str]:
        """The worker's environment, the job's own variables, its artifacts dir and the shared run registry."""
        env = {k: v for k, v in os.environ.items() if k not in PLACEMENT_ENV}
        env.update(self.env)
        env.update(TRAINER_ARTIFACTS_DIR=self.artifacts, TRAINER_RUNS_DIR=str(runs_dir), PYTHONUNBUFFERED="1")
        return env

    @property
    def result_path(self) -> Path:
        return Path(self.artifacts) / f"result-attempt{self.attempts}.json"

    def command(self) -> list[str]:
        launch = ["--config_file", self.launch] if self.launch else []
        sets = [arg for s in self.sets for arg in ("--set", s)]
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launch,
            "-m",
            "trainer_accel.run",
            "--phase",
            self.phase,
            "--config",
            self.config,
            *sets,
            "--result-json",
            str(self.result_path),
        ]


class JobQueue:
    """The queue database. Every change is one transaction; claiming takes SQLite's write lock first."""

    def __init__(self, paths: Paths):
        self.artifacts = paths.artifacts.resolve()
        self.runs = paths.runs.resolve()
        self.path = paths.queue_db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # transactions are explicit
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")  # the write lock now, not at the first write: no lost race
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def add(
        self,
        phase: str,
        config: Path,
        sets: list[str],
        env: dict[str, str],
        priority: str,
        launch: Path | None,
        max_attempts: int,
        artifacts: Path | None,
    ) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO jobs (phase, config, sets, env, priority, launch, cwd, artifacts, max_attempts, "
                "submitted_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    phase,
                    str(config.resolve()),
                    json.dumps(sets),
                    json.dumps(env),
                    PRIORITIES[priority],
                    str(launch.resolve()) if launch else None,
                    os.getcwd(),
                    str(artifacts.resolve()) if artifacts else None,
                    max_attempts,
                    now_iso(),
                ),
            )
            return int(cur.lastrowid)

    def jobs(self, statuses: tuple[str, ...] | None = None) -> list[Job]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [Job.from_row(r, self.artifacts) for r in rows if statuses is None or r["status"] in statuses]

    def runnable_in_order(self) -> list[Job]:
        return sorted(self.jobs(RUNNABLE), key=lambda j: (j.priority, j.id))

    def recover_orphans(self) -> list[int]:
        """Jobs marked running by a worker on this host that no longer exists (killed) become interrupted."""
        recovered = []
        with self.transaction() as db:
            for row in db.execute("SELECT id, worker, pid FROM jobs WHERE status = 'running'").fetchall():
                host = (row["worker"] or "").rsplit(":", 1)[0]
                if host == socket.gethostname() and row["pid"] and not _alive(row["pid"]):
                    db.execute(
                        "UPDATE jobs SET status = 'interrupted', failure = 'its worker died' WHERE id = ?", (row["id"],)
                    )
                    recovered.append(row["id"])
        return recovered

    def claim(self, worker: str) -> Job | None:
        """Take the next job: highest priority, then oldest. Atomic: a job goes to exactly one worker."""
        with self.transaction() as db:
            row = db.execute(
                f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(RUNNABLE))}) AND cancel_requested = 0 "
                "ORDER BY priority, id LIMIT 1",
                RUNNABLE,
            ).fetchone()
            if row is None:
                return None
            now = now_iso()
            db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, worker = ?, pid = ?, started_at = ?,"
                " finished_at = NULL WHERE id = ?",
                (worker, os.getpid(), now, row["id"]),
            )
            db.execute("INSERT INTO attempts (job_id, worker, started_at) VALUES (?, ?, ?)", (row["id"], worker, now))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return Job.from_row(row, self.artifacts)

    def finish(self, job: Job, exit_code: int | None, outcome: str, failure: str | None, run_ids: list[str]) -> str:
        """Record an attempt's end; returns the job's new status (a retryable failure goes back to the queue)."""
        with self.transaction() as db:
            cancelled = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job.id,)).fetchone()[0]
            failures = job.failures + (outcome == "failed")
            if cancelled:
                status = "cancelled"
            elif outcome == "failed" and exit_code not in NO_RETRY_EXIT and failures < job.max_attempts:
                status = "queued"  # a retry
            else:
                status = outcome
            now = now_iso()
            db.execute(
                "UPDATE jobs SET status = ?, failures = ?, finished_at = ?, exit_code = ?, failure = ?, run_ids = ?,"
                " pid = NULL WHERE id = ?",
                (status, failures, now, exit_code, failure, json.dumps(run_ids), job.id),
            )
            db.execute(
                "UPDATE attempts SET finished_at = ?, exit_code = ?, outcome = ? WHERE id = "
                "(SELECT MAX(id) FROM attempts WHERE job_id = ?)",
                (now, exit_code, outcome, job.id),
            )
        return status

    def cancel(self, job_id: int) -> str:
        with self.transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UserError(f"job {job_id}: no such job in {self.path}")
            if row["status"] in RUNNABLE:
                db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?", (now_iso(), job_id))
                return "cancelled"
            if row["status"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return "cancelling (its worker stops it gracefully)"
            raise UserError(f"job {job_id}: already {row['status']}, nothing to cancel")

    def cancel_requested(self, job_id: int) -> bool:
        return bool(self.db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the worker ---------------------------------------------------------------------------------------------------


class Signals:
    """The worker's own stop request: the first SIGTERM/SIGINT stops the job gracefully, a second one kills it."""

    def __init__(self) -> None:
        self.count = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        print(
            f"queue: {signal.Signals(signum).name} received; "
            + ("stopping the job gracefully (again to kill it)" if self.count == 1 else "killing the job"),
            file=sys.stderr,
        )


def run_attempt(queue: JobQueue, job: Job, signals: Signals) -> tuple[int | None, str, str | None, list[str]]:
    """Run one attempt of a job to its end; (exit code, outcome, failure, run ids) from its result file."""
    log_path = Path(job.artifacts) / "job.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    job.result_path.unlink(missing_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n=== attempt {job.attempts} at {now_iso()}: {' '.join(job.command())}\n")
        log.flush()
        proc = subprocess.Popen(
            job.command(),
            cwd=job.cwd,
            env=job.run_env(queue.runs),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sent = 0
        while True:
            try:
                proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            wanted = max(signals.count, int(queue.cancel_requested(job.id)))
            if wanted > sent:
                if wanted == 1:
                    _signal_trainers(proc.pid, signal.SIGTERM)
                else:
                    _signal_group(proc.pid, signal.SIGKILL)
                sent = wanted
        # the launcher can exit before its children (it does not forward signals): wait for all of them
        while _group_alive(proc.pid):
            if signals.count > max(sent, 1):
                _signal_group(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
    result = _read_result(job.result_path)
    if result is None and sent:
        return proc.returncode, "interrupted", "stopped before it could write a result", []
    if result is None:
        return (
            proc.returncode,
            "failed",
            f"exit code {proc.returncode} and no result file (killed, or crashed at start)",
            [],
        )
    outcome = {"completed": "completed", "interrupted": "interrupted"}.get(result["status"], "failed")
    return result["exit_code"], outcome, result.get("failure"), result.get("run_ids", [])


def _signal_trainers(launcher: int, sig: int) -> None:
    """Signal the training processes, not the launcher: `accelerate launch` (from 1.16) answers a SIGTERM by
    terminating its children and killing them 5 s later, which would cut a large checkpoint short. Signalled
    directly, each trainer saves at its own pace and the launcher exits when they have."""
    import psutil

    try:
        children = psutil.Process(launcher).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children or []:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(sig)
    if not children:  # not started yet: the launcher is all there is
        _signal_group(launcher, sig)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: an orphaned child that exited waits for
    init to reap it, and in a container whose PID 1 never reaps, `killpg(pgid, 0)` would say alive forever."""
    import psutil

    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _read_result(path: Path) -> dict | None:
    try:
        return loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def work(queue: JobQueue, watch: bool, poll: float) -> int:
    worker = f"{socket.gethostname()}:{os.getpid()}"
    signals = Signals()
    for job_id in queue.recover_orphans():
        print(f"queue: job {job_id} was left running by a worker that is gone; it resumes when run again")
    while not signals.count:
        job = queue.claim(worker)
        if job is None:
            if not watch:
                print("queue: empty")
                return 0
            time.sleep(poll)
            continue
        print(
            f"queue: job {job.id} attempt {job.attempts}: {job.phase} {job.config}"
            + (f" --set {' '.join(job.sets)}" if job.sets else "")
            + f" (log: {Path(job.artifacts) / 'job.log'})",
            flush=True,
        )
        code, outcome, failure, run_ids = run_attempt(queue, job, signals)
        status = queue.finish(job, code, outcome, failure, run_ids)
        print(
            f"queue: job {job.id} {outcome} (exit {code}) -> {status}" + (f": {failure}" if failure else ""), flush=True
        )
    return 3


# -- CLI ----------------------------------------------------------------------------------------------------------


def format_jobs(jobs: list[Job]) -> str:
    rows = [("id", "prio", "status", "tries", "phase", "config", "overrides", "exit", "runs", "submitted", "finished")]
    names = {v: k for k, v in PRIORITIES.items()}
    for j in jobs:
        r = j.row
        rows.append(
            (
                j.id,
                names[j.priority],
                j.status,
                f"{j.attempts}/{j.max_attempts}",
                j.phase,
                Path(j.config).name,
                " ".join(j.sets) or "-",
                "-" if r["exit_code"] is None else r["exit_code"],
                ",".join(json.loads(r["run_ids"] or "[]")) or "-",
                r["submitted_at"],
                r["finished_at"] or "-",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def plan_jobs(queue: JobQueue) -> str:
    """What `queue run` would do next, in order, with each job's --plan estimates."""
    from trainer_accel.experiments.plan import command_plans, load_configs
    from trainer_accel.overrides import parse_overrides

    lines = []
    for order, job in enumerate(queue.runnable_in_order(), 1):
        lines.append(
            f"{order}. job {job.id} ({job.status}): {job.phase} {job.config}"
            + (f" --set {' '.join(job.sets)}" if job.sets else "")
            + f", artifacts {job.artifacts}"
        )
        paths = resolve_paths(job.run_env(queue.runs))
        cwd = os.getcwd()
        try:
            os.chdir(job.cwd)  # relative paths in the job's config resolve as they will when it runs
            processes = _launch_processes(job.launch)
            for p in command_plans(
                job.phase, load_configs(job.phase, job.config, parse_overrides(job.sets)), paths, processes
            ):
                d = p.to_dict()
                lines.append(
                    f"   {p.cfg.phase}: {d['parameters']:,} params, {processes} process(es), {d['steps_to_run']:,} "
                    f"steps, {d['tokens_to_run']:,} tokens, {d['flops_to_run']:.3g} FLOP, "
                    f"{d['checkpoint_bytes'] / 2**20:,.1f} MiB per checkpoint; {p.start}"
                )
                lines += [f"   problem: {problem}" for problem in p.problems]
        except UserError as e:
            lines += [f"   problem: {problem}" for problem in e.problems]
        finally:
            os.chdir(cwd)
    return "\n".join(lines) if lines else "queue: nothing to run"


def _launch_processes(launch: str | None) -> int:
    if not launch:
        return 1
    from accelerate.commands.config.config_args import load_config_from_file

    return int(load_config_from_file(launch).num_processes or 1)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {v}: expected NAME=VALUE")
        out[key] = value
    return out


def add_job(queue: JobQueue, args: argparse.Namespace) -> int:
    """`queue add`: the job checked as far as it can be before it runs (config, launch file, --set), then queued."""
    from trainer_accel.overrides import parse_overrides

    problems = []
    if not args.config.is_file():
        problems.append(f"{args.config}: config not found")
    if args.launch is not None and not args.launch.is_file():
        problems.append(f"{args.launch}: launch file not found (see launch/*.yaml)")
    if args.max_attempts < 1:
        problems.append(f"--max-attempts: must be at least 1, got {args.max_attempts}")
    if problems:
        raise UserError(problems)
    parse_overrides(args.sets)  # malformed KEY=VALUE fails now, not at night
    job_id = queue.add(
        args.phase,
        args.config,
        args.sets,
        _pairs(args.env, "--env"),
        args.priority,
        args.launch,
        args.max_attempts,
        args.artifacts_dir,
    )
    print(f"job {job_id} queued ({args.priority})")
    return 0
