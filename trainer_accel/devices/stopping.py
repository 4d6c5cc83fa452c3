"""Graceful stop on SIGTERM / SIGINT (preemption, Ctrl-C).

The first signal asks the loop to finish its current optimizer step, write a checkpoint and exit with
INTERRUPTED_EXIT; a second one exits at once. A signal within SAME_STOP_S of the first is the same request, not a
second one: a queue or a terminal signals the whole process group, and `accelerate launch` (from 1.16) passes
the signal it got on to the trainer as well, so one stop arrives as two signals a moment apart. Handlers are installed
only while a phase trains, and only in
the main thread (where Python delivers signals).

A launcher's death is a stop request too. `accelerate launch` with one process does not pass on a SIGTERM or
SIGINT it gets: it dies and leaves the trainer training as an orphan, and `docker stop`, Kubernetes and most
schedulers signal only the first process. So a trainer started by a launcher (`accelerate launch`, torchrun)
watches its parent and stops as on SIGTERM when the parent is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

INTERRUPTED_EXIT = 3
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Raised after the checkpoint of a graceful stop is written."""


LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")  # set by accelerate launch / torchrun
WATCH_EVERY_S = 0.5
SAME_STOP_S = 1.0  # signals this close to the first are the same stop (a group signal, and the launcher's copy)


def started_by_a_launcher() -> bool:
    return any(var in os.environ for var in LAUNCHER_ENV)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None  # what asked for the stop: a signal, or SIGTERM for the launcher's death
        self._first_signal_at: float | None = None  # monotonic time of the first signal
        self._previous: dict[int, object] = {}
        self._done = threading.Event()

    def _watch_launcher(self, launcher: int) -> None:
        while not self._done.wait(WATCH_EVERY_S):
            if os.getppid() != launcher:
                if self.signum is None:  # a signal already asked: this is not a second one
                    self.signum = signal.SIGTERM
                    log.warning("the launcher (pid %d) is gone: finishing this step and writing a checkpoint", launcher)
                return

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._first_signal_at is not None and now - self._first_signal_at < SAME_STOP_S:
            log.info("%s received; already stopping", signal.Signals(signum).name)  # the same stop, sent twice
            return
        if self._first_signal_at is not None:
            log.warning("second %s: stopping now, without a checkpoint", signal.Signals(signum).name)
            os._exit(128 + signum)
        self._first_signal_at = now
        if self.signum is not None:  # the launcher's death asked first: a queue or scheduler signalling the whole
            log.info("%s received; already stopping", signal.Signals(signum).name)  # group sends both at once
            return
        self.signum = signum
        log.warning(
            "%s received: finishing this step and writing a checkpoint (send again to stop at once)",
            signal.Signals(signum).name,
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        if started_by_a_launcher():
            threading.Thread(
                target=self._watch_launcher, args=(os.getppid(),), name="launcher-watch", daemon=True
            ).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
