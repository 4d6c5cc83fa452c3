"""Durable files: written whole or not at all, fsynced, swapped into place, hashed, and their JSON read back.

Every writer of the package (checkpoints, caches, exports, records, manifests) shares these few helpers, so
"atomic" means one thing: a temporary name, fsync, rename, fsync of the directory. Every reader of a JSON file a
user or a past run wrote parses it with `loads`, so a hostile file fails the same way everywhere.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from trainer_accel.errors import UserError
from trainer_accel.faults import fault_point


class UnreadableJSON(json.JSONDecodeError):
    """Valid JSON syntax that no reader should take: it has no one position, so its message has none either."""

    def __init__(self, msg: str):
        super().__init__(msg, "", 0)

    def __str__(self) -> str:
        return self.msg


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise UnreadableJSON(f"key {json.dumps(twice)} appears twice in one object (which one was meant?)")
    return out


def loads(text: str | bytes, unique_keys: bool = True) -> object:
    """json.loads for files a user or a past run wrote: a key given twice in one object (json would keep the last
    silently) and nesting too deep for the parser (a RecursionError) are JSONDecodeErrors like any other bad JSON,
    so every reader's existing "not valid JSON" handling covers them."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys if unique_keys else None)
    except RecursionError:
        raise UnreadableJSON("nested too deeply to be read") from None


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_of(f)


def sha256_of(f: BinaryIO, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or all of the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


TMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"


def fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename a finished temporary directory onto `target`, setting any old one aside first."""
    if target.exists():
        trash = target.with_name(f"{TRASH_PREFIX}{target.name}-{os.getpid()}-{time.time_ns()}")
        os.rename(target, trash)
        fault_point("mid_swap")
        os.rename(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fsync_dir(target.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file; read at import, before any writer thread exists


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def held_alone(lock_file: Path, busy: str, remove: bool = False) -> Iterator[None]:
    """One holder at a time of `lock_file` (flock: released however the holder ends, a SIGKILL included). A second
    is refused at once with `busy` and the first one's pid, never made to wait or to sweep the first one's files.
    `remove`: the file goes when the holder is done (a killed holder's file stays, free, and is taken over); a
    process that locked a file just removed sees that it is no longer the one at the path and is refused."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if remove and os.fstat(handle.fileno()).st_ino != os.stat(lock_file).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            handle.seek(0)
            raise UserError(f"{busy} ({handle.read().strip() or 'pid unknown'})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            if remove:
                lock_file.unlink(missing_ok=True)  # while still locked: no one else holds a lock on this file
