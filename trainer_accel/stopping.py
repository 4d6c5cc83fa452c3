"""Graceful stop on SIGTERM / SIGINT (preemption, Ctrl-C).

The first signal asks the loop to finish its current optimizer step, write a checkpoint and exit with
INTERRUPTED_EXIT; a second one exits at once. Handlers are installed only while a phase trains, and only in
the main thread (where Python delivers signals).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

INTERRUPTED_EXIT = 3
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Raised after the checkpoint of a graceful stop is written."""


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            log.warning("second %s: stopping now, without a checkpoint", signal.Signals(signum).name)
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s received: finishing this step and writing a checkpoint (send again to stop at once)",
                    signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
