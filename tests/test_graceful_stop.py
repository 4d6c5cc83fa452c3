"""SIGTERM / SIGINT: finish the step, write a checkpoint, exit 3; started again, the run continues exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import events, free_port, run_cli, start_cli, write_config
from safetensors.torch import load_file

from trainer_accel.checkpoints.layout import read_meta

STEPS = 120  # long enough that a signal sent once training has begun always lands inside the loop
TRAIN = {"total_steps": STEPS, "ckpt_every": 1000, "eval_every": 1000, "log_every": 1, "warmup_steps": 10}


def wait_for_training(world, proc, timeout=120):
    """Await the first logged step (the run is inside its loop), polling the event log the run writes."""
    path = world / "metrics" / "events.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read() if proc.stderr else ''}")
        if path.exists() and '"event": "train"' in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError("run never started training")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of the run never interrupted."""
    root = tmp_path_factory.mktemp("ref")
    env = {"TRAINER_DATA_DIR": str(root / "data"), "TRAINER_ARTIFACTS_DIR": str(root)}
    assert run_cli("prepare", "--demo", cwd=root, env=env).returncode == 0
    cfg = write_config(root / "pre.json", "pretrain", TRAIN)
    ref = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=root, env=env)
    assert ref.returncode == 0, ref.stderr
    return load_file(str(root / "checkpoints/pretrain/latest/model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_and_resume_is_exact(world, reference, sig):
    cfg = write_config(world / "pre.json", "pretrain", TRAIN)

    proc = start_cli("run", "--phase", "pretrain", "--config", str(cfg), "--result-json", "result.json", cwd=world)
    wait_for_training(world, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "stopped: pretrain stopped by a signal after step" in err and "Traceback" not in err
    stopped = events(world, "stopped")
    assert len(stopped) == 1 and stopped[0]["signal"] == int(sig)
    step = stopped[0]["step"]
    assert 0 < step < STEPS
    assert read_meta(world / "checkpoints/pretrain/latest")["step"] == step
    result = json.loads((world / "result.json").read_text())  # the result protocol: what an orchestrator reads
    assert (result["status"], result["exit_code"], result["final_step"]) == ("interrupted", 3, step)
    assert result["latest"] == str((world / "checkpoints/pretrain/latest").resolve())
    manifest = json.loads((world / "runs" / result["run_ids"][0] / "run.json").read_text())
    assert (manifest["status"], manifest["final_step"]) == ("interrupted", step)

    again = run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--result-json", "result.json", cwd=world)
    assert again.returncode == 0, again.stderr
    assert f"at step {step}" in again.stderr
    result = json.loads((world / "result.json").read_text())
    assert (result["status"], result["exit_code"], result["final_step"]) == ("completed", 0, STEPS)
    manifest = json.loads((world / "runs" / result["run_ids"][0] / "run.json").read_text())
    assert manifest["status"] == "completed" and [s["start_step"] for s in manifest["sessions"]] == [0, step]
    a = load_file(str(world / "checkpoints/pretrain/latest/model.safetensors"))
    assert all(torch.equal(a[k], reference[k]) for k in a)
    assert [e["step"] for e in events(world, "train")] == list(range(1, STEPS + 1))


def test_second_signal_exits_at_once(monkeypatch):
    from trainer_accel.devices import stopping

    exits = []
    monkeypatch.setattr(stopping.os, "_exit", lambda code: exits.append(code))
    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    with stopping.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and exits == []
        clock[0] += stopping.SAME_STOP_S
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [128 + signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_one_stop_sent_twice_at_once_is_one_request(monkeypatch):
    """A terminal or a queue signals the whole group and `accelerate launch` (from 1.16) passes its own signal on:
    the trainer gets two a moment apart. That is one stop with a checkpoint, not "stop at once" (it was, and a
    cancelled queue job lost its checkpoint)."""
    from trainer_accel.devices import stopping

    exits = []
    monkeypatch.setattr(stopping.os, "_exit", lambda code: exits.append(code))
    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    with stopping.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        clock[0] += stopping.SAME_STOP_S / 2
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGINT and exits == []


def test_a_signal_after_the_launchers_death_is_the_first_signal(monkeypatch):
    """A queue stopping a job signals its whole process group: the launcher dies of it and the trainer sees that
    before its own SIGTERM arrives. That SIGTERM is the first signal, not a second one (it used to exit at once
    with -15, no checkpoint)."""
    from trainer_accel.devices import stopping

    exits = []
    monkeypatch.setattr(stopping.os, "_exit", lambda code: exits.append(code))
    monkeypatch.setattr(stopping, "WATCH_EVERY_S", 0.01)
    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    with stopping.StopRequest() as stop:
        stop._watch_launcher(launcher=-1)  # the parent is not that pid any more: the launcher is gone
        assert stop.requested and exits == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == []
        clock[0] += stopping.SAME_STOP_S
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [128 + signal.SIGTERM]


def test_two_processes_stop_after_the_same_step_when_one_is_signalled(world):
    """The request is all-reduced and read a step later: whichever process gets the signal, both stop together."""
    import psutil
    from test_numerics import LAUNCH

    cfg = write_config(world / "pre.json", "pretrain", {**TRAIN, "B": 2})
    args = [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(LAUNCH / "cpu_2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "trainer_accel.run",
        "--phase",
        "pretrain",
        "--config",
        str(cfg),
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen([sys.executable, *args], cwd=world, stderr=subprocess.PIPE, text=True)
    wait_for_training(world, proc)
    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "trainer_accel.run" in p.cmdline() and "accelerate.commands.launch" not in p.cmdline()
    ]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGTERM)  # one process only
    _, err = proc.communicate(timeout=120)
    # the launcher reports a stopped worker as a failure (torchrun's agent exits 1); the line is printed once
    assert proc.returncode != 0 and err.count("stopped: pretrain stopped by a signal after step") == 1, err[-3000:]
    stopped = events(world, "stopped")
    assert len(stopped) == 1 and 0 < stopped[0]["step"] < STEPS
    assert read_meta(world / "checkpoints/pretrain/latest", verify=True)["step"] == stopped[0]["step"]

    again = subprocess.run([sys.executable, *args], cwd=world, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"at step {stopped[0]['step']}" in again.stderr, again.stderr[-3000:]
    assert [e["step"] for e in events(world, "train")] == list(range(1, STEPS + 1))


def trainer_processes(launcher: subprocess.Popen) -> list:
    import psutil

    return [
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if "trainer_accel.run" in p.cmdline() and "accelerate.commands.launch" not in p.cmdline()
    ]


@pytest.mark.parametrize("launch_file, trackers", [("cpu.yaml", ["wandb"]), ("cpu_2proc.yaml", [])])
def test_a_signalled_launcher_stops_its_trainers_gracefully(world, launch_file, trackers):
    """`docker stop` signals the launcher only. With one process `accelerate launch` dies and used to leave the
    trainer training as an orphan, with no checkpoint and no result; with several, torchrun passes the signal on.
    With wandb on (the default trackers), its service process goes with the launcher: the tracker's failure is a
    warning, and the stop is as graceful as without it."""
    import psutil
    from test_numerics import LAUNCH
    from test_trackers import env_without_wandb_credentials

    cfg = write_config(
        world / "pre.json", "pretrain", {**TRAIN, "total_steps": 100000, "B": 2}, tracking={"log_with": trackers}
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(LAUNCH / launch_file),
            "--main_process_port",
            str(free_port()),
            "-m",
            "trainer_accel.run",
            "--phase",
            "pretrain",
            "--config",
            str(cfg),
            "--result-json",
            "result.json",
        ],
        cwd=world,
        stderr=(world / "launch.log").open("w"),  # a pipe would outlive the launcher
        env=env_without_wandb_credentials(world),
    )
    wait_for_training(world, proc)
    trainers = trainer_processes(proc)
    assert len(trainers) == (2 if "2proc" in launch_file else 1)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        _, alive = psutil.wait_procs(trainers, timeout=120)
        assert alive == [], "a trainer is still running after its launcher was stopped"
    finally:
        for p in trainers:
            if p.is_running():
                p.kill()
    result = json.loads((world / "result.json").read_text())
    assert (result["status"], result["exit_code"]) == ("interrupted", 3)
    stopped = events(world, "stopped")
    assert len(stopped) == 1 and stopped[0]["step"] == result["final_step"] > 0
    assert read_meta(world / "checkpoints/pretrain/latest", verify=True)["step"] == result["final_step"]


def test_a_second_run_in_the_same_artifacts_dir_is_refused_while_the_first_trains(world):
    """Two runs used to train into one checkpoints/{phase}/ and interleave their events; a killed owner's lock is
    taken over with a warning; the commands that only read keep working beside a run."""
    import socket

    cfg = write_config(world / "pre.json", "pretrain", {**TRAIN, "total_steps": 100000, "ckpt_every": 5})
    cmd = ("run", "--phase", "pretrain", "--config", str(cfg))
    first = start_cli(*cmd, cwd=world)
    try:
        wait_for_training(world, first)
        second = run_cli(*cmd, cwd=world)
        assert second.returncode == 2, second.stderr
        line = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and "another run is training this phase here" in line[0]
        assert f"pid {first.pid} on {socket.gethostname()}" in line[0] and "trainer_accel" in line[0]
        assert "Traceback" not in second.stderr
        assert {e["run_id"] for e in events(world) if "run_id" in e} == {events(world, "train")[0]["run_id"]}
        plan = run_cli(*cmd, "--plan", cwd=world)  # it works beside the run, and says the run would be refused
        assert plan.returncode == 2 and f"another run is training this phase here (pid {first.pid}" in plan.stdout
        while not (world / "checkpoints/pretrain/latest").exists():
            time.sleep(0.1)
        exported = run_cli("export", "--checkpoint", "checkpoints/pretrain/latest", "--out", "copy.pt", cwd=world)
        assert exported.returncode == 0, exported.stderr
        assert run_cli("runs", "list", cwd=world).returncode == 0
    finally:
        first.kill()
        first.wait()
    again = run_cli(*cmd, "--no-resume", "--set", "train_cfg.total_steps=12", cwd=world)
    assert again.returncode == 0, again.stderr
    assert f"taking over the lock left by pid {first.pid}" in again.stderr and "no longer running" in again.stderr
    assert (world / "checkpoints/pretrain.lock").read_text() == ""  # a clean end leaves nothing to take over
    clean = run_cli(*cmd, "--no-resume", "--set", "train_cfg.total_steps=12", cwd=world)
    assert clean.returncode == 0 and "taking over" not in clean.stderr, clean.stderr
