"""Kill the trainer with SIGKILL at random moments, restart it, repeat; then compare with an unbroken run.

    python tests/kill_anywhere.py --kills 100            # the long version (its figures are in the README)

After every kill it checks that the newest intact checkpoint is at least as new as the last one the run
reported complete (no completed checkpoint is ever lost), and that the restart resumes from exactly that one.
At the end the final weights must equal, bit for bit, those of a run that was never interrupted, and no
temporary file may remain. tests/test_kill_anywhere.py runs a short version in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = {"V": 260, "T": 32, "C": 32, "L": 2, "H": 2, "d_ff": 64, "dropout": 0.1}


def _train(total_steps: int) -> dict:
    return {
        "seed": 3,
        "total_steps": total_steps,
        "B": 2,
        "accum_steps": 2,
        "base_lr": 3e-3,
        "warmup_steps": 5,
        "min_lr": 3e-4,
        "eval_every": 10,
        "eval_batches": 1,
        "ckpt_every": 3,
        "keep_last_n": 2,
        "log_every": 1,
    }


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """`python -m trainer_accel.run CMD`, started; the suite passes its fork server's version instead."""
    return subprocess.Popen(
        [sys.executable, "-m", "trainer_accel.run", *cmd],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _last_completed_checkpoint(events: Path) -> int:
    """The step of the last resumable checkpoint the run reported complete (the event is written after the rename).

    A save of best/ alone (an eval that improved between two step checkpoints) is complete too, but runs resume
    from latest/ or a step_* directory, so it does not count here."""
    if not events.exists():
        return 0
    records = [
        json.loads(line)
        for line in events.read_text().splitlines()
        if line.strip().endswith("}") and '"event": "checkpoint"' in line
    ]
    return max((r["step"] for r in records if Path(r["path"]).name.startswith("step_")), default=0)


def _await_training(events: Path, proc: subprocess.Popen, seen: int) -> bool:
    """Wait until the run logs a step beyond what it had logged before (or ends); True while it runs."""
    while proc.poll() is None:
        if events.exists() and events.read_text().count('"event": "train"') > seen:
            return True
        time.sleep(0.02)
    return False


def kill_anywhere(
    kills: int,
    workdir: Path,
    seed: int = 0,
    max_delay: float = 0.6,
    log=print,
    total_steps: int | None = None,
    start=_run,
) -> dict:
    from safetensors.torch import load_file

    from trainer_accel.checkpoints.discovery import find_resume_checkpoint
    from trainer_accel.checkpoints.layout import read_meta

    rng = random.Random(seed)
    total = total_steps or max(60, kills * 40)
    workdir.mkdir(parents=True, exist_ok=True)
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINER_DATA_DIR": str(workdir / "data")}
    if not (workdir / "data").exists():
        subprocess.run(
            [sys.executable, "-m", "trainer_accel.prepare", "--demo"],
            cwd=workdir,
            env=base_env,
            check=True,
            capture_output=True,
        )
    cfg = workdir / "kill.json"
    cfg.write_text(json.dumps({"model_cfg": MODEL, "train_cfg": _train(total)}))
    cmd = ["--phase", "pretrain", "--config", str(cfg), "--device", "cpu"]

    ref_env = {**base_env, "TRAINER_ARTIFACTS_DIR": str(workdir / "reference")}
    ref = start(cmd, workdir, ref_env)
    _, ref_err = ref.communicate()
    if ref.returncode != 0:
        raise RuntimeError(f"reference run failed: {ref_err[-2000:]}")

    art = workdir / "killed"
    env = {**base_env, "TRAINER_ARTIFACTS_DIR": str(art)}
    events, phase_dir = art / "metrics" / "events.jsonl", art / "checkpoints" / "pretrain"
    done_kills, restarts, started = 0, 0, time.monotonic()
    while True:
        expected_resume = None
        found = find_resume_checkpoint(phase_dir) if phase_dir.exists() else None
        if found is not None:
            expected_resume = read_meta(found)["step"]
        seen = events.read_text().count('"event": "train"') if events.exists() else 0
        proc = start(cmd, workdir, env)
        restarts += 1
        if done_kills < kills and _await_training(events, proc, seen):
            time.sleep(rng.uniform(0.0, max_delay))
            proc.kill()
        _, err = proc.communicate()
        if expected_resume is not None and not re.search(rf"resumed from \S+ at step {expected_resume}\b", err):
            raise AssertionError(f"restart {restarts} did not resume from step {expected_resume}: {err[-1500:]}")
        if proc.returncode == 0:
            break
        if proc.returncode != -9:
            raise AssertionError(f"run failed with exit code {proc.returncode}: {err[-2000:]}")
        done_kills += 1
        completed = _last_completed_checkpoint(events)
        newest = find_resume_checkpoint(phase_dir)
        newest_step = read_meta(newest)["step"] if newest else 0
        if newest_step < completed:
            raise AssertionError(
                f"kill {done_kills}: checkpoint of step {completed} was complete, newest intact is {newest_step}"
            )
        if done_kills % 10 == 0:
            log(f"{done_kills} kills, newest intact checkpoint at step {newest_step} of {total}")

    a = load_file(str(phase_dir / "latest" / "model.safetensors"))
    b = load_file(str(workdir / "reference" / "checkpoints" / "pretrain" / "latest" / "model.safetensors"))
    if a.keys() != b.keys() or not all((a[k] == b[k]).all() for k in a):
        raise AssertionError("final weights differ from the uninterrupted run")
    leftovers = [p for p in art.rglob("*") if p.name.startswith((".tmp-", ".trash-")) or ".pt.tmp-" in p.name]
    if leftovers:
        raise AssertionError(f"temporary files left behind: {leftovers}")
    return {
        "kills": done_kills,
        "restarts": restarts,
        "total_steps": total,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary folder")
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_anywhere-"))
    result = kill_anywhere(args.kills, workdir, seed=args.seed)
    print(
        f"OK: {result['kills']} SIGKILLs at random moments, {result['restarts']} starts, {result['total_steps']} "
        "steps, "
        f"{result['seconds']} s; every restart resumed from the newest complete checkpoint, no completed checkpoint "
        f"lost, final weights bit-identical to an uninterrupted run, no temporary files left ({workdir})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
