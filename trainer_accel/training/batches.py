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
from trainer_accel.data.chat_template import AnswerRule, answer_positions
from trainer_accel.data.tokenizer import DOC
from trainer_accel.paths import EXAMPLES, STREAM

VAL_SEED = 0  # validation batches are the same for every run, so val losses compare across runs and seeds


@dataclass
class Batch:
    """x: (B, T) inputs; y: (B, T) next tokens; y_masked: y with -100 where the loss must not look; source: (B, T)
    the cache each target came from; row_source: (B,) the cache each row was drawn for; segments: (B, T) the packed
    example of each input token, or None for rows of one example or window (the model's plain causal path).
    Preference pairs are 2B rows, the B chosen then the B rejected (PairSource); y_all: their targets with only the
    padding masked (prompt and answer); ref_logps: (2B,) the reference model's log-probability of each row's
    answer, when it was computed ahead (None: the phase computes it, or needs none)."""

    x: torch.Tensor
    y: torch.Tensor
    y_masked: torch.Tensor
    source: torch.Tensor | None = None
    row_source: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    y_all: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        pin = device.type == "cuda"
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if pin else (lambda t: t.to(device))
        y = move(self.y)
        rest = (
            None if t is None else move(t)
            for t in (self.source, self.row_source, self.segments, self.y_all, self.ref_logps)
        )
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


def last_answer(ids: np.ndarray, rule: AnswerRule) -> tuple[int, int]:
    """(start, stop) of a conversation's last answer: from its first token after the last answer header up to and
    including its end-of-turn token. What a preference loss scores; everything before it is the prompt, and what
    a template writes after it (Qwen's newline after <|im_end|>) is neither."""
    inside = answer_positions(ids, rule)
    opened = np.flatnonzero(inside & ~np.concatenate([[False], inside[:-1]]))
    start = int(opened[-1])
    closed = np.flatnonzero(~inside[start:])
    return start, start + (int(closed[0]) if len(closed) else len(ids) - start)


def fit_pair(prompt: int, answers: tuple[int, int], room: int) -> tuple[int, int]:
    """(prompt tokens kept, answer tokens kept) when a pair's rows must fit in `room` (T+1) tokens. The rule: a pair
    that fits is kept whole; otherwise the prompt is cut from the left, down to half the row at most, and then
    the answers from the right. So an answer always keeps at least half a row, and a prompt keeps its last tokens
    (the question and the generation header just before the answer)."""
    longest = max(answers)
    if prompt + longest <= room:
        return prompt, longest
    keep = max(room - longest, min(prompt, room // 2))
    return keep, room - keep


@dataclass
class PairSource:
    """Preference pairs to draw from: each a prompt with a chosen and a rejected answer (two conversations of a
    `pref` cache), as 2 rows each. `refs`: per cache, the reference log-probabilities of its pairs' answers,
    (num_pairs, 2), once computed (training/reference.py); None before, or when the phase computes them live."""

    caches: list[Cache]
    probs: np.ndarray
    T: int
    names: list[str]
    refs: list[np.ndarray] | None = None

    @property
    def answers(self) -> AnswerRule:
        return answer_rule(self.caches[0].meta)

    def pair_rows(
        self, cache: Cache, tokens: np.ndarray, i: int, rule: AnswerRule
    ) -> tuple[list[np.ndarray], list[int]]:
        """The pair's two rows (truncated by fit_pair) and where each answer starts in its row; `tokens`: the cache's
        map, opened once for the batch."""
        seqs = [
            np.asarray(tokens[cache.starts[2 * i + k] : cache.starts[2 * i + k + 1]], dtype=np.int64) for k in (0, 1)
        ]
        spans = [last_answer(s, rule) for s in seqs]
        prompt = min(a for a, _ in spans)  # the same prompt tokens in both (prepare renders one conversation twice)
        keep, room = fit_pair(prompt, tuple(b - a for a, b in spans), self.T + 1)
        return [s[a - keep : min(b, a + room)] for s, (a, b) in zip(seqs, spans)], [keep, keep]

    def batch(self, rng: np.random.Generator, n: int, keep: slice) -> Batch:
        """n pairs drawn by address (a cache by its share, then a pair in it), this process's `keep` of them."""
        which = rng.choice(len(self.probs), size=n, p=self.probs)
        u = rng.random(n)
        picked = np.arange(n)[keep]
        return self.batch_of(
            [(int(which[g]), int(u[g] * self.caches[int(which[g])].num_examples // 2)) for g in picked]
        )

    def batch_of(self, pairs: list[tuple[int, int]]) -> Batch:
        """The rows of these (cache, pair) pairs: the chosen rows first, then the rejected ones."""
        k = len(pairs)
        pad = self.caches[0].meta["special_tokens"][DOC]
        tokens = np.full((2 * k, self.T + 1), pad, dtype=np.int64)
        answer = np.zeros((2 * k, self.T), dtype=bool)
        real = np.zeros((2 * k, self.T), dtype=bool)
        ref = np.zeros(2 * k, dtype=np.float32) if self.refs is not None else None
        width, rule = 2, self.answers
        maps: dict[int, np.ndarray] = {}  # one map per cache for this batch only (as draw_rows)
        for r, (c, i) in enumerate(pairs):
            if c not in maps:
                maps[c] = self.caches[c].tokens
            rows, prompts = self.pair_rows(self.caches[c], maps[c], i, rule)
            for side, (row, p) in enumerate(zip(rows, prompts)):
                at = r + side * k
                width = max(width, len(row))
                tokens[at, : len(row)] = row
                answer[at, p - 1 : len(row) - 1] = True  # the targets that are answer tokens
                real[at, : len(row) - 1] = True
                if ref is not None:
                    ref[at] = self.refs[c][i, side]
        t = torch.from_numpy(tokens[:, :width])  # as long as its longest row: padding to T is computed for nothing
        y = t[:, 1:]
        which = np.array([c for c, _ in pairs] * 2, dtype=np.int64)
        return Batch(
            t[:, :-1],
            y,
            torch.where(torch.from_numpy(answer[:, : width - 1]), y, IGNORE_INDEX),
            torch.from_numpy(np.repeat(which[:, None], width - 1, axis=1)),
            torch.from_numpy(which),
            None,
            torch.where(torch.from_numpy(real[:, : width - 1]), y, IGNORE_INDEX),
            None if ref is None else torch.from_numpy(ref),
        )


class Batches:
    """Batches by address (seed, step, micro-step, rank) from a phase's training and validation rows."""

    def __init__(self, train: RowSource | PairSource, val: RowSource | PairSource, B: int, seed: int):
        self.train, self.val, self.B, self.seed = train, val, B, seed

    def _slice(
        self, source: RowSource | PairSource, rng: np.random.Generator, micro: int, rank: int, world: int, accum: int
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
