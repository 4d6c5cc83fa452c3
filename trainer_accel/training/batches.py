"""Batches by address: where a phase's rows come from, which of their targets count, and which source each came from.

`Batches` supplies training and validation batches as pure functions of their address (seed, step, micro-step,
rank); it never touches devices, processes or files (the caches arrive already open). Which targets count is
decided by the caches: every next token of a stream row, the answers of an example row (data/cache.answer_mask).
What a phase does with them is its loss (training/losses.py and the phase's module, phases/).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer_accel.data.cache import (
    IGNORE_INDEX,
    TRAIN_TAG,
    VAL_TAG,
    Cache,
    address_rng,
    answer_rule,
    draw_rows,
    masked_targets,
)
from trainer_accel.data.chat_template import AnswerRule
from trainer_accel.data.tokenizer import DOC
from trainer_accel.paths import EXAMPLES, STREAM

VAL_SEED = 0  # validation batches are the same for every run, so val losses compare across runs and seeds


@dataclass
class Batch:
    """x: (B, T) inputs; y: (B, T) next tokens; y_masked: y with -100 where the loss must not look; source: (B, T)
    the cache each target came from; row_source: (B,) the cache each row was drawn for; segments: (B, T) the packed
    example of each input token, or None for rows of one example or window (the model's plain causal path)."""

    x: torch.Tensor
    y: torch.Tensor
    y_masked: torch.Tensor
    source: torch.Tensor | None = None
    row_source: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        pin = device.type == "cuda"
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if pin else (lambda t: t.to(device))
        y = move(self.y)
        rest = (None if t is None else move(t) for t in (self.source, self.row_source, self.segments))
        return Batch(move(self.x), y, y if self.y_masked is self.y else move(self.y_masked), *rest)


@dataclass
class RowSource:
    """A mixture of caches to draw rows from: stream windows and SFT examples (one per row, or packed)."""

    caches: list[Cache]
    probs: np.ndarray
    T: int
    kinds: list[str]  # each cache's kind (data/cache.py: STREAM or EXAMPLES)
    names: list[str]  # "streams/wiki", "sft/dolly": per cache, for the per-source counts
    pack: bool = False

    @property
    def answers(self) -> AnswerRule:
        """Where the SFT rows' answers are (every SFT cache of a phase shares it: inputs.py checks)."""
        return answer_rule(next(c.meta for c, k in zip(self.caches, self.kinds) if k == EXAMPLES))

    def batch(self, rng: np.random.Generator, n: int, keep: slice) -> Batch:
        s = self.caches[0].meta["special_tokens"]
        rows = draw_rows(self.caches, self.kinds, self.probs, rng, n, self.T, s[DOC], keep, self.pack)
        tokens = torch.from_numpy(rows.tokens)
        y = tokens[:, 1:]
        if EXAMPLES in self.kinds:  # answers only; a stream row's targets all count
            y_masked = masked_targets(rows.tokens, self.answers)
            streams = np.array([self.kinds[i] == STREAM for i in rows.row_source], dtype=bool)
            y_masked[streams] = rows.tokens[streams, 1:]
            y_masked = torch.from_numpy(y_masked)
        else:
            y_masked = y
        segments = None if rows.segment is None else torch.from_numpy(rows.segment[:, :-1])
        return Batch(
            tokens[:, :-1],
            y,
            y_masked,
            torch.from_numpy(rows.source[:, 1:]),
            torch.from_numpy(rows.row_source),
            segments,
        )


class Batches:
    """Batches by address (seed, step, micro-step, rank) from a phase's training and validation rows."""

    def __init__(self, train: RowSource, val: RowSource, B: int, seed: int):
        self.train, self.val, self.B, self.seed = train, val, B, seed

    def _slice(
        self, source: RowSource, rng: np.random.Generator, micro: int, rank: int, world: int, accum: int
    ) -> Batch:
        """Rows of one global batch are drawn together; this process keeps its own slice of B rows.

        The global batch is the same for any split into processes and micro-steps with the same product.
        """
        first = (micro * world + rank) * self.B
        return source.batch(rng, self.B * accum * world, slice(first, first + self.B))

    def train_batch(self, step: int, micro: int, rank: int, world: int, accum: int) -> Batch:
        return self._slice(self.train, address_rng(self.seed, TRAIN_TAG, step), micro, rank, world, accum)

    def val_batch(self, index: int) -> Batch:
        """Validation batch `index` (B rows): fixed for all runs with the same B, whatever the process count."""
        return self.val.batch(address_rng(VAL_SEED, VAL_TAG, index), self.B, slice(0, self.B))

    def count_by_source(self, batch: Batch) -> torch.Tensor:
        """(2, sources): counted targets and rows per training source (train.names), on the device, no host sync."""
        n = len(self.train.names)
        counted = (batch.y_masked != IGNORE_INDEX).flatten().float()
        tokens = torch.zeros(n, device=counted.device).scatter_add_(0, batch.source.flatten(), counted)
        rows = torch.zeros(n, device=counted.device).scatter_add_(
            0, batch.row_source, torch.ones_like(batch.row_source, dtype=torch.float)
        )
        return torch.stack([tokens, rows])
