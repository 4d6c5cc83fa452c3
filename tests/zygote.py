"""A fork server for the suite's CLI calls: `python -m trainer_accel.X ARGS` without paying for `import torch`.

Nearly every test starts the trainer's commands as a user does, and on a 2-core machine each start spends about
3.5 s importing torch and Accelerate: most of the suite's time. This process imports them once; for each command
it forks a child that takes the command's working directory, environment, argv and output files and runs the
module as `__main__` exactly as `python -m` does, then leaves through the interpreter's normal exit (atexit
handlers, threads joined, streams flushed), so exit codes and signals read as a fresh process's would.

What a fork cannot give is what a process reads from its environment while importing: thread counts (OpenMP reads
OMP_NUM_THREADS when torch loads) and TORCH_* settings. conftest.run_cli starts a real process for those.

    python tests/zygote.py SOCKET_PATH     # serves until its parent exits
"""

from __future__ import annotations

import json
import os
import runpy
import select
import socket
import sys


def read_line(conn: socket.socket, chunk_size: int = 65536) -> bytes:
    """One line; `chunk_size` 1 where a second line may follow it on the same connection."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(chunk_size)
        if not chunk:
            raise ConnectionError("the other end closed the connection")
        data += chunk
    return data


def become(request: dict) -> None:
    """In the forked child: turn into `python -m trainer_accel.<module> <args>`; ends with SystemExit."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = [request["module"], *request["args"]]
    sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
    sys.modules.pop(request["module"], None)  # `python -m` runs a module that nothing has imported yet
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    raise SystemExit(0)


def serve(path: str) -> None:
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    while os.getppid() == parent:
        ready, _, _ = select.select([listener], [], [], 0.02)
        if ready:
            conn, _ = listener.accept()
            try:
                request = json.loads(read_line(conn))
            except (ConnectionError, ValueError):
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                for c in (conn, *waiting.values()):
                    c.close()
                become(request)
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass  # the client gave up on it
                conn.close()


def import_the_trainer() -> None:
    """Every trainer_accel module and what they import at the top (torch, Accelerate, safetensors, numpy), and
    torch._dynamo, which torch imports on first use (an optimizer step, a tensor made under a device context):
    1.5 s of every command on 2 cores otherwise."""
    import importlib
    import pkgutil

    import torch._dynamo  # noqa: F401

    import trainer_accel

    for info in pkgutil.walk_packages(trainer_accel.__path__, "trainer_accel."):  # every folder's modules too
        importlib.import_module(info.name)


if __name__ == "__main__":
    import_the_trainer()
    serve(sys.argv[1])
