"""The local job queue: priority order, retries, one job per worker, and a graceful stop that resumes."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli, start_cli, write_config

from trainer_accel import queue as queue_command
from trainer_accel.checkpoints.layout import read_meta
from trainer_accel.experiments import queue

LAUNCH = Path(__file__).resolve().parent.parent / "launch" / "cpu.yaml"


def add(world, *args: str) -> int:
    assert queue_command.main(["add", "--launch", str(LAUNCH), *args]) == 0
    return sqlite3.connect(world / "queue.db").execute("SELECT MAX(id) FROM jobs").fetchone()[0]


def jobs(world) -> dict[int, sqlite3.Row]:
    db = sqlite3.connect(world / "queue.db")
    db.row_factory = sqlite3.Row
    return {r["id"]: r for r in db.execute("SELECT * FROM jobs")}


def test_jobs_run_by_priority_and_a_failing_one_is_retried(world, capsys):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 4, "ckpt_every": 2, "eval_every": 2})
    low = add(world, "--phase", "pretrain", "--config", str(cfg), "--priority", "low")
    failing = add(
        world, "--phase", "pretrain", "--config", str(cfg), "--env", "TRAINER_FAULT=before_meta", "--max-attempts", "2"
    )  # killed in its first save, every attempt
    high = add(
        world, "--phase", "pretrain", "--config", str(cfg), "--priority", "high", "--set", "train_cfg.base_lr=1e-3"
    )
    capsys.readouterr()
    assert queue_command.main(["plan"]) == 0
    plan = capsys.readouterr().out
    assert plan.index(f"job {high} ") < plan.index(f"job {failing} ") < plan.index(f"job {low} ")
    assert "pretrain: 25,888 params, 1 process(es), 4 steps, 512 tokens" in plan

    r = run_cli("queue", "run", cwd=world)
    assert r.returncode == 0, r.stdout + r.stderr
    db = sqlite3.connect(world / "queue.db")
    order = [row[0] for row in db.execute("SELECT job_id FROM attempts ORDER BY id")]
    assert order == [high, failing, failing, low]
    done = jobs(world)
    assert [(done[j]["status"], done[j]["attempts"], done[j]["exit_code"]) for j in (high, failing, low)] == [
        ("completed", 1, 0),
        ("failed", 2, 1),
        ("completed", 1, 0),
    ]
    assert "no result file" in done[failing]["failure"]
    for j in (high, low):  # each job in its own artifacts dir; runs registered in the shared registry
        (run_id,) = json.loads(done[j]["run_ids"])
        assert read_meta(world / "jobs" / str(j) / "checkpoints/pretrain/latest")["step"] == 4
        manifest = json.loads((world / "runs" / run_id / "run.json").read_text())
        assert manifest["status"] == "completed"
    assert (
        json.loads((world / "runs" / json.loads(done[high]["run_ids"])[0] / "run.json").read_text())["config"][
            "train_cfg"
        ]["base_lr"]
        == 1e-3
    )
    assert queue_command.main(["list"]) == 0
    assert f"{failing}   normal  failed     2/2" in capsys.readouterr().out
    assert queue_command.main(["cancel", str(low)]) == 2  # already completed
    assert "already completed" in capsys.readouterr().err


WORKER = """
import json, sys, time
from pathlib import Path
from trainer_accel.paths import resolve_paths
from trainer_accel.experiments.queue import JobQueue
q = JobQueue(resolve_paths())
Path(f"ready-{sys.argv[1]}").touch()
while not Path("go").exists():
    time.sleep(0.01)
got = []
while (job := q.claim(sys.argv[1])) is not None:
    got.append(job.id)
    time.sleep(0.002)
    q.finish(job, 0, "completed", None, [])
print(json.dumps(got))
"""


def test_two_workers_never_take_the_same_job(world):
    q = queue.JobQueue(queue.resolve_paths())
    ids = [q.add("pretrain", world / "pre.json", [], {}, "normal", None, 1, None) for _ in range(60)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, name], cwd=world, stdout=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    while not all((world / f"ready-{n}").exists() for n in ("a", "b")):
        assert all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (world / "go").touch()
    taken = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(taken), taken  # both worked
    assert sorted(taken[0] + taken[1]) == ids  # every job exactly once
    assert all(row["status"] == "completed" and row["attempts"] == 1 for row in jobs(world).values())


STEPS = 200  # long enough that a cancel, polled by the worker every 0.2 s, always lands inside the loop
LONG = {"total_steps": STEPS, "ckpt_every": 1000, "eval_every": 1000, "log_every": 1, "warmup_steps": 10}


def start_worker_on_one_job(world, steps: int = STEPS):
    """A worker running a `steps`-step job, returned once the job is inside its training loop."""
    cfg = write_config(world / "pre.json", "pretrain", {**LONG, "total_steps": steps})
    job = add(world, "--phase", "pretrain", "--config", str(cfg))
    worker = start_cli("queue", "run", cwd=world)
    events = world / "jobs" / str(job) / "metrics" / "events.jsonl"
    deadline = time.monotonic() + 120
    while not (events.exists() and '"event": "train"' in events.read_text()):
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()
        time.sleep(0.05)
    return job, worker


def test_cancelling_a_running_job_stops_it_gracefully(world, capsys):
    job, worker = start_worker_on_one_job(world, steps=100_000)  # never finishes first, however fast the machine
    assert queue_command.main(["cancel", str(job)]) == 0
    assert "cancelling" in capsys.readouterr().out
    out = "".join(worker.communicate(timeout=120))
    assert worker.returncode == 0 and "queue: empty" in out, out  # the worker goes on to the next job: none
    assert jobs(world)[job]["status"] == "cancelled"
    assert 0 < read_meta(world / "jobs" / str(job) / "checkpoints/pretrain/latest")["step"] < 100_000


def test_a_stopped_worker_leaves_its_job_resumable(world):
    job, worker = start_worker_on_one_job(world)
    worker.send_signal(signal.SIGTERM)
    out = "".join(worker.communicate(timeout=120))
    assert worker.returncode == 3, out
    row = jobs(world)[job]
    assert (row["status"], row["exit_code"]) == ("interrupted", 3), out
    stopped = read_meta(world / "jobs" / str(job) / "checkpoints/pretrain/latest")["step"]
    assert 0 < stopped < STEPS

    again = run_cli("queue", "run", cwd=world)
    assert again.returncode == 0, again.stdout + again.stderr
    row = jobs(world)[job]
    assert (row["status"], row["attempts"]) == ("completed", 2)
    manifest = json.loads((world / "runs" / json.loads(row["run_ids"])[0] / "run.json").read_text())
    assert [s["start_step"] for s in manifest["sessions"]] == [0, stopped] and manifest["final_step"] == STEPS
