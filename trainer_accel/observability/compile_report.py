"""What torch.compile did in a run: frames compiled, graphs, graph breaks and recompiles.

Compile pays off only when the forward and the loss stay one graph and compile once per mode; a graph break
(DDP's bucket boundaries, FSDP2's hooks, a Python call dynamo cannot trace) or a recompile every few steps (a
shape or a guard that keeps changing) costs speed silently. So a compiled run counts them from dynamo's own
counters and says so: one line at info level when they change, each graph break's reason at debug level
(`run -v`), and a `compile` event in the event log for tools (gpu_check reads it).

The loop calls its loss in two modes, training and evaluation (grad mode differs, so each compiles once).
Frames compiled in the first call of each mode are the warm-up; frames compiled in any later call are counted
apart (`compiled_later`): a recompile (TORCH_LOGS=recompiles names each and its guard) or a path first taken
later (DDP's forward takes another path from its second step: 4 frames on 2 CPU processes, then none). The
counters are process-wide and only grow, so everything here is a difference from the watch's start (a
pipeline's second phase starts a new watch).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class CompileCounts:
    frames: int = 0  # frames compiled, first compiles and recompiles
    graphs: int = 0  # graphs captured
    breaks: Counter = field(default_factory=Counter)  # graph breaks by their reason in one line (`summary`)

    def __sub__(self, other: CompileCounts) -> CompileCounts:
        return CompileCounts(self.frames - other.frames, self.graphs - other.graphs, self.breaks - other.breaks)


def frames_compiled() -> int:
    """Frames dynamo has compiled so far: all a call of the loss needs to read (it runs every micro-step)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def read_counts() -> CompileCounts:
    """dynamo's counters now (its `counters` dict: stable keys since torch 2.0), graph breaks summarised."""
    from torch._dynamo.utils import counters

    breaks = Counter()
    for reason, n in counters["graph_break"].items():
        breaks[summary(reason)] += n
    return CompileCounts(counters["frames"]["ok"], counters["stats"]["unique_graphs"], breaks)


def summary(reason: str) -> str:
    """A graph break's reason on one line: dynamo's headline and its explanation (the hints and links left out)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    kept = [line for line in lines[1:] if line.startswith(("Explanation:", "Developer debug context:"))]
    return " | ".join(lines[:1] + kept)[:400] if lines else "(no reason given)"


class CompileWatch:
    """Counts what compiling the loss cost, by mode; `report` says what changed since it last spoke."""

    def __init__(self):
        self._start = read_counts()
        self._reported = CompileCounts()
        self.warmed: set[str] = set()
        self.warmup_frames = 0
        self.compiled_later = 0

    @contextlib.contextmanager
    def mode(self, name: str) -> Iterator[None]:
        """Around one call of the compiled loss in mode `name` ("train" or "eval")."""
        before = frames_compiled()
        try:
            yield
        finally:
            compiled = frames_compiled() - before
            if name in self.warmed:
                self.compiled_later += compiled
            else:
                self.warmed.add(name)
                self.warmup_frames += compiled

    def counts(self) -> CompileCounts:
        return read_counts() - self._start

    def report(self, where: str) -> dict | None:
        """The figures for a `compile` event when anything changed since the last report (None otherwise), after
        logging them: the totals at info level, each new graph break's reason at debug level."""
        now = self.counts()
        if now == self._reported:
            return None
        new_breaks = now.breaks - self._reported.breaks
        self._reported = now
        figures = {
            "frames": now.frames,
            "graphs": now.graphs,
            "graph_breaks": sum(now.breaks.values()),
            "compiled_later": self.compiled_later,
            "warmup_frames": self.warmup_frames,
        }
        log.info(
            "%s: torch.compile: %d frame(s) compiled (%d in the first train and eval calls, %d "
            "later), %d graph(s), %d graph break(s)%s",
            where,
            now.frames,
            self.warmup_frames,
            self.compiled_later,
            now.graphs,
            figures["graph_breaks"],
            " (reasons at debug level: run -v)" if new_breaks else "",
        )
        for reason, n in new_breaks.items():
            log.debug("%s: graph break x%d: %s", where, n, reason)
        return figures
