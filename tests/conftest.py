"""A tiny world per test: demo caches in a temp dir, a 2-layer model, and helpers to run the CLIs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The suite means the CPU, also on a machine with a GPU: commands without --device would otherwise train on CUDA
# there (TF32, non-deterministic kernels) and the exact-equality checks could fail. Set before torch sees a GPU;
# every command a test starts inherits it.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Two test workers share the cores with the commands they start: one thread per process keeps them from
# oversubscribing the cores, where OpenMP threads spin as they wait (2 threads per process on 2 cores made the
# suite 22% slower, 9:58 against 7:45, and one queue test 3.5x). Set before torch loads; a value given is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from zygote import read_line

TINY_MODEL = {"V": 260, "T": 32, "C": 32, "L": 2, "H": 2, "d_ff": 64}
TINY_TRAIN = {
    "seed": 7,
    "total_steps": 8,
    "B": 4,
    "base_lr": 3e-3,
    "warmup_steps": 2,
    "min_lr": 3e-4,
    "eval_every": 4,
    "eval_batches": 2,
    "ckpt_every": 4,
    "log_every": 2,
}


TRAINER_ENV = (
    "TRAINER_DATA_DIR",
    "TRAINER_ARTIFACTS_DIR",
    "TRAINER_CHECKPOINTS_DIR",
    "TRAINER_SAMPLES_DIR",
    "TRAINER_METRICS_DIR",
    "TRAINER_EVENTS_PATH",
    "TRAINER_RUNS_DIR",
)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """`prepare --demo` once per test process; each world gets its own copy (its files record relative paths)."""
    from trainer_accel import prepare

    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for var in TRAINER_ENV:
            mp.delenv(var, raising=False)
        assert prepare.main(["--demo"]) == 0
    return root / "data"


@pytest.fixture
def world(tmp_path, monkeypatch, demo_data):
    """A working directory with demo caches; the trainer's env points inside it."""
    monkeypatch.chdir(tmp_path)
    for var in TRAINER_ENV:
        monkeypatch.delenv(var, raising=False)
    shutil.copytree(demo_data, tmp_path / "data")
    return tmp_path


def write_config(path: Path, phase: str, train: dict | None = None, **top) -> Path:
    cfg = {
        "model_cfg": dict(TINY_MODEL),
        "train_cfg": {**TINY_TRAIN, **(train or {})},
        "tracking": {"log_with": []},
    }  # trackers cost seconds per run; test_trackers.py turns them on
    if phase == "sft":
        cfg["sft_sources"] = {"dolly": 0.5, "oasst1": 0.4, "primer": 0.1}
        cfg["init_from"] = None
    cfg.update(top)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_LOGS", "PYTHONPATH", "CUDA_VISIBLE_DEVICES")


def run_cli(
    module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300, fresh: bool = False
) -> subprocess.CompletedProcess:
    """Run `python -m trainer_accel.<module> ...` as a user would, in `cwd`.

    It runs in a child forked from a process that has imported torch once (tests/zygote.py), which saves about
    3.5 s per command on 2 cores; `fresh=True`, or an environment that matters at import time, starts a new
    interpreter instead."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    zygote = None if fresh else Zygote.get()
    if zygote is None or any(full_env.get(k) != zygote.env.get(k) for k in IMPORT_TIME_ENV):
        return subprocess.run(
            [sys.executable, "-m", f"trainer_accel.{module}", *args],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return zygote.run(f"trainer_accel.{module}", list(args), cwd, full_env, timeout)


def start_cli(module: str, *args: str, cwd: Path, env: dict | None = None):
    """Start `python -m trainer_accel.<module> ...` and return at once, like subprocess.Popen with stdout and stderr
    captured: a child of the fork server (a `Forked`) where run_cli would use one, else a real Popen."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    zygote = Zygote.get()
    if any(full_env.get(k) != zygote.env.get(k) for k in IMPORT_TIME_ENV):
        return subprocess.Popen(
            [sys.executable, "-m", f"trainer_accel.{module}", *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return zygote.start(f"trainer_accel.{module}", list(args), cwd, full_env)


class Forked:
    """A command running in a child of the fork server, with the part of subprocess.Popen the tests use: pid,
    poll, wait, send_signal, kill, communicate, returncode, and stderr.read() once it has ended."""

    def __init__(self, conn: socket.socket, pid: int, out: Path, err: Path):
        self.conn, self.pid, self.out, self.err = conn, pid, out, err
        self.returncode: int | None = None
        self._buf = b""
        self.stderr = self  # proc.stderr.read(), as with stderr=PIPE

    def _finish(self, block: bool, timeout: float | None = None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self.conn.settimeout(timeout if block else 0.0)
        try:
            while not self._buf.endswith(b"\n"):
                chunk = self.conn.recv(64)
                if not chunk:
                    raise ConnectionError("the fork server closed the connection")
                self._buf += chunk
        except (BlockingIOError, TimeoutError):
            if block:
                raise subprocess.TimeoutExpired(str(self.pid), timeout) from None
            return None
        self.returncode = int(self._buf)
        self.conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._finish(block=False)

    def wait(self, timeout: float | None = None) -> int:
        return self._finish(block=True, timeout=timeout)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def read(self) -> str:
        return read_text(self.err)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return read_text(self.out), read_text(self.err)


class Zygote:
    """The client of this test process's fork server (tests/zygote.py), started on first use."""

    _instance: Zygote | None = None

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="zygote-"))  # short: a socket path has at most ~100 characters
        self.socket = str(self.dir / "s")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("zygote.py")), self.socket],
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        self.calls = 0

    @classmethod
    def get(cls) -> Zygote:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 120
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(self.socket)
                return conn
            except (FileNotFoundError, ConnectionRefusedError):
                conn.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the fork server (tests/zygote.py) did not start: exit {self.proc.poll()}")
                time.sleep(0.05)

    def run(self, module: str, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        proc = self.start(module, args, cwd, env)
        try:
            out, err = proc.communicate(timeout)
        except subprocess.TimeoutExpired:  # as subprocess.run: kill it, wait for it, raise
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired([module, *args], timeout) from None
        proc.out.unlink(missing_ok=True)
        proc.err.unlink(missing_ok=True)
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], proc.returncode, out, err)

    def start(self, module: str, args: list[str], cwd: Path, env: dict) -> Forked:
        self.calls += 1
        out, err = self.dir / f"{self.calls}.out", self.dir / f"{self.calls}.err"
        request = {"module": module, "args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        conn = self._connect()
        conn.sendall((json.dumps(request) + "\n").encode())
        return Forked(conn, int(read_line(conn, 1)), out, err)

    @classmethod
    def stop(cls) -> None:
        if cls._instance is not None:
            cls._instance.proc.kill()
            cls._instance.proc.wait()
            shutil.rmtree(cls._instance.dir, ignore_errors=True)
            cls._instance = None


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace") if path.exists() else ""


def pytest_sessionfinish(session, exitstatus):
    Zygote.stop()


def events(world: Path, kind: str | None = None) -> list[dict]:
    from trainer_accel.observability.metrics import read_events

    recs = read_events(world / "metrics" / "events.jsonl")
    return [r for r in recs if kind is None or r["event"] == kind]


def free_port() -> int:
    """A port for a multi-process launch: launches in parallel test workers must not share the config's port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edit_sidecar(ckpt: Path, edit) -> dict:
    """Change a checkpoint's meta.json as a later trainer or a tool would, resealing it (store.sidecar_sha256), so
    that only the change itself is on trial; returns the new sidecar."""
    from trainer_accel.checkpoints.layout import SEAL, sidecar_sha256

    meta_file = ckpt / "meta.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta[SEAL] = sidecar_sha256(meta)
    meta_file.unlink()  # break the hard links shared with latest/ and best/
    meta_file.write_text(json.dumps(meta))
    return meta
