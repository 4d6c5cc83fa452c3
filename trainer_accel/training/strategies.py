"""What makes pretrain and SFT different: where batches come from and which targets the loss counts.

A strategy supplies batches by address and the loss; it never touches devices, processes or files (the caches
arrive already open). The loop calls only `train_batch`, `val_batch`, `count_tokens` and `loss`, so a new phase
is a new strategy here and no change to the loop.
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
    kinds: list[str]  # "stream" or "sft", per cache
    names: list[str]  # "streams/wiki", "sft/dolly": per cache, for the per-source counts
    pack: bool = False

    @property
    def answers(self) -> AnswerRule:
        """Where the SFT rows' answers are (every SFT cache of a phase shares it: inputs.py checks)."""
        return answer_rule(next(c.meta for c, k in zip(self.caches, self.kinds) if k == "sft"))

    def batch(self, rng: np.random.Generator, n: int, keep: slice) -> Batch:
        s = self.caches[0].meta["special_tokens"]
        rows = draw_rows(self.caches, self.kinds, self.probs, rng, n, self.T, s[DOC], keep, self.pack)
        tokens = torch.from_numpy(rows.tokens)
        y = tokens[:, 1:]
        if "sft" in self.kinds:  # answers only; a stream row's targets all count
            y_masked = masked_targets(rows.tokens, self.answers)
            streams = np.array([self.kinds[i] == "stream" for i in rows.row_source], dtype=bool)
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


class Strategy:
    """Batches by address (seed, step, micro-step, rank); subclasses choose the targets the loss counts."""

    name = "base"
    stage_id = -1

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

    def targets(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def count_tokens(self, batch: Batch) -> torch.Tensor:
        """Counted targets, as a tensor on the batch's device (reading it would be a host sync)."""
        return (self.targets(batch) != IGNORE_INDEX).sum()

    def count_by_source(self, batch: Batch) -> torch.Tensor:
        """(2, sources): counted targets and rows per training source (train.names), on the device, no host sync."""
        n = len(self.train.names)
        counted = (self.targets(batch) != IGNORE_INDEX).flatten().float()
        tokens = torch.zeros(n, device=counted.device).scatter_add_(0, batch.source.flatten(), counted)
        rows = torch.zeros(n, device=counted.device).scatter_add_(
            0, batch.row_source, torch.ones_like(batch.row_source, dtype=torch.float)
        )
        return torch.stack([tokens, rows])

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-token cross-entropy, number of counted tokens); the loop does the weighting."""
        targets = self.targets(batch)
        # the model computes the cross-entropy of the targets chosen here (in chunks: a large vocabulary's fp32
        # logits never exist whole); calling it through forward keeps DDP's and FSDP's hooks around the head
        total = model(batch.x, batch.segments, targets=targets)
        return total, (targets != IGNORE_INDEX).sum()


class PretrainStrategy(Strategy):
    """Token streams; cross-entropy on every next token."""

    name, stage_id = "pretrain", 0

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch.y


class SFTStrategy(Strategy):
    """Instruction examples, packed or one per row, with stream rows mixed in as replay; cross-entropy on the
    answers (see data/cache.answer_mask) and on every target of a replayed stream row."""

    name, stage_id = "sft", 1

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch.y_masked


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (PretrainStrategy, SFTStrategy)}
