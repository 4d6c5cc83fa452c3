"""Test-only fault injection: kill the process at a named point of a save, to prove saves are crash-safe.

Set TRAINER_FAULT=POINT (the first time POINT is reached) or POINT:N (the N-th time) and the process SIGKILLs
itself there, as a power cut or the OOM killer would; POINT:N:SIGNAL sends another signal instead (SIGINT: a
Ctrl-C that lands exactly there). `while_*` points first cut the file being written to half
its length, so a torn write is simulated too; POINT:N:raise raises ConnectionResetError there instead, as a
tracker's dead service does. POINTS are a checkpoint save's; PREPARE_POINTS are prepare's; HF_EXPORT_POINTS those
of `export --format hf`; "tracker" is every call into a tracker. Unset (always, outside tests) this costs one dict
lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

ENV = "TRAINER_FAULT"
FILE_POINTS = tuple(
    f"{when}_{what}" for what in ("model", "optimizer", "meta") for when in ("before", "while", "after")
)
POINTS = FILE_POINTS + ("before_rename", "before_latest", "before_best", "mid_swap", "pruning", "export")
PREPARE_POINTS = ("prepare_batch", "publish_rename")  # prepare: a batch of tokens written; a cache being renamed
HF_EXPORT_POINTS = ("hf_export", "mid_swap")  # export --format hf: its files written, not yet in place; between renames
_reached: Counter = Counter()


def fault_point(name: str, partial: Path | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, sig = rest.partition(":")
    _reached[name] += 1
    if _reached[name] != int(nth or 1) and not (sig == "raise" and _reached[name] > int(nth or 1)):
        return
    if sig == "raise":
        raise ConnectionResetError(104, "Connection reset by peer (TRAINER_FAULT)")
    if sig == "SIGINT" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        raise KeyboardInterrupt  # what Python's own handler does there, at once (a self-sent signal waits its turn)
    if partial is not None and partial.exists():
        with open(partial, "r+b") as f:
            f.truncate(partial.stat().st_size // 2)
    os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))
