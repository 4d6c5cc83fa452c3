"""Decisions that every process must take together, taken once.

With several processes, a save, an evaluation or a phase that one process starts and another skips pairs the
wrong collectives: the run hangs or dies with "Connection closed by peer". So a decision that all processes act
on comes from state they share (the loop's own counters) or from here: the main process answers and every
process receives that answer. Never from each process reading the filesystem: only the main process writes,
in the background, and `latest/` is briefly absent while it is swapped, so two processes can read two
different truths a millisecond apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from accelerate.utils import broadcast_object_list

from trainer_accel.errors import UserError

T = TypeVar("T")


def main_process_decides(acc, decide: Callable[[], T]) -> T:
    """`decide()` run on the main process only; every process returns its answer (any picklable value).

    A UserError raised by `decide` is raised on every process, so they all stop together instead of the others
    waiting in the next collective for a process that has left.
    """
    if acc.num_processes == 1:
        return decide()
    answer: list = [None]
    if acc.is_main_process:
        try:
            answer[0] = ("ok", decide())
        except UserError as e:
            answer[0] = ("user_error", e.problems)
    broadcast_object_list(answer, from_process=0)
    kind, value = answer[0]
    if kind == "user_error":
        raise UserError(value)
    return value


def end_process_group() -> None:
    """Tear the process group down while the interpreter is still whole.

    FSDP2's sharded parameters and their device mesh hold the gloo group, and with it work objects whose tensors
    have Python owners; left to interpreter exit, a gloo thread that frees one needs the GIL while Python shuts
    down, and the process aborts ("terminate called without an active exception", exit -6) after a run that
    completed: seen in CI on rank 1 after FSDP runs (once after DDP), about 1 suite in 6, with destroy_process_group
    called.
    So the cycles that hold the model are collected first, then the group is destroyed, then collected again."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()
    gc.collect()
