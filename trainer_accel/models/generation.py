"""Text from a model: a KV cache, the choice of each next token, and batches of prompts of any lengths.

A prompt is read once (prefill) and each new token costs one position, not the whole prefix again: every layer's
keys and values are kept in a cache preallocated once (the longest prompt and the new tokens, at most T past
the most padded row); attention reads its filled part. Prompts of different lengths share a batch left-padded:
each row's positions start at 0 at its first real token, no query sees a pad, and each row has its own context
T, so a row's tokens are those it gets alone. Each prompt draws
from its own generator, seeded by (seed, its index), so a sample does not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer_accel.models.gpt import GPT


@dataclass
class KVCache:
    """Keys and values of every layer for B rows and up to `size` positions; `length` of them are filled."""

    k: list[torch.Tensor]  # per layer (B, key/value heads, size, hd)
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, model: GPT, rows: int, size: int) -> KVCache:
        p = model.lm_head.weight
        shape = (rows, model.cfg.kv_heads, size, model.cfg.hd)
        k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(model.cfg.L)]
        return cls(k, [torch.zeros_like(t) for t in k])

    @property
    def size(self) -> int:
        return self.k[0].shape[2]


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen. temperature 0 is greedy; top_k / top_p keep the most likely tokens before
    drawing; repetition_penalty > 1 divides (multiplies, when negative) the logits of tokens already in the row,
    as transformers does; 1 is off."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0


def choose(
    logits: torch.Tensor, s: Sampling, generators: list[torch.Generator], seen: torch.Tensor | None
) -> torch.Tensor:
    """(B, V) float logits -> (B,) next tokens; `seen` (B, n) the rows' tokens so far (for the penalty)."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen is not None and seen.numel():
        picked = logits.gather(1, seen)
        logits = logits.scatter(
            1, seen, torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
        )
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        mass = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = mass - ordered.softmax(dim=-1) >= s.top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
    probs = F.softmax(logits, dim=-1).cpu()
    if len(generators) == 1:  # one generator for the batch (the samples written during training)
        return torch.multinomial(probs, 1, generator=generators[0]).squeeze(1).to(logits.device)
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators)]).to(
        logits.device
    )


def _mask(pad: torch.Tensor, queries: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, t, size): query at position q sees keys at positions <= q that are not its row's left padding. A pad
    query sees itself, so that no row of the attention is empty (which would give NaN)."""
    keys = torch.arange(size, device=pad.device)
    ok = (keys[None, None, :] <= queries[:, :, None]) & (keys[None, None, :] >= pad[:, None, None])
    return (ok | (keys[None, None, :] == queries[:, :, None]))[:, None]


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    generators: list[torch.Generator] | None = None,
    stop_ids: frozenset[int] = frozenset(),
    on_token: Callable[[int, int], bool | None] | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (a stop token included, and nothing after it), at most max_new_tokens and no
    further than the context T. `generators`: one per prompt, or one for all; `on_token(row, token)` is called
    as each token is chosen (streaming) and may return True to stop that row. Prompts must fit in T.

    Each row's context is its own: the cache holds the longest prompt and the new tokens (up to T past the row
    with the most padding), so a short prompt beside a long one gets as many tokens as alone, not only the room
    the long one leaves."""
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    B, T = len(prompts), model.cfg.T
    longest = max(len(p) for p in prompts)
    if longest > T:
        raise ValueError(f"a prompt of {longest} tokens is longer than the model's context T={T}")
    gens = generators or [torch.Generator().manual_seed(0)]
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
    room = [T - len(p) for p in prompts]  # the new tokens each row can be fed: its positions end at T - 1
    cache = KVCache.empty(model, B, longest + max(0, min(max_new_tokens, max(room))))
    padded = bool(pad.any())  # without padding the attention is plainly causal: no mask to build or apply
    at = torch.arange(longest, device=device)[None].expand(B, -1)
    logits = model.decode(idx, (at - pad[:, None]).clamp(min=0), _mask(pad, at, cache.size) if padded else None, cache)[
        :, -1
    ]
    cache.length = longest
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    seen = idx
    for _ in range(max_new_tokens):
        nxt = choose(logits, sampling, gens, seen if sampling.repetition_penalty != 1.0 else None)
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            out[b].append(t)
            stop = on_token(b, t) if on_token is not None else None
            done[b] = t in stop_ids or bool(stop) or len(out[b]) > room[b]  # the last one its context can hold
        if all(done) or cache.length >= cache.size:
            break
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        at = torch.full((B, 1), cache.length, device=device)
        pos = (at - pad[:, None]).clamp(max=T - 1)  # a row out of room is fed on, into its own row, unread
        logits = model.decode(nxt[:, None], pos, _mask(pad, at, cache.size) if padded else None, cache)[:, -1]
        cache.length += 1
    model.train(was_training)
    return out


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> torch.Tensor:
    """Extend (B, T0) ids by up to max_new_tokens; deterministic for a given generator seed and weights. temperature
    0 is greedy. Stops early when every row has produced `stop_id`. Through the KV cache while the context lasts;
    past T, each further token is read from the last T tokens again (the window slides)."""
    sampling = Sampling(temperature=temperature, top_k=top_k)
    gens = [generator or torch.Generator().manual_seed(0)]
    budget = min(max_new_tokens, model.cfg.T - idx.shape[1]) if idx.shape[1] < model.cfg.T else 0
    stops = frozenset() if stop_id is None else frozenset({stop_id})
    new = generate_ids(model, idx.tolist(), budget, sampling, gens, stops) if budget > 0 else [[] for _ in idx]
    width = max(len(n) for n in new)
    fill = stop_id if stop_id is not None else 0
    idx = torch.cat(
        [
            idx,
            torch.tensor([n + [fill] * (width - len(n)) for n in new], dtype=idx.dtype, device=idx.device).reshape(
                len(new), width
            ),
        ],
        dim=1,
    )
    was_training = model.training
    model.eval()
    done = torch.tensor([stop_id in n for n in new], device=idx.device) if stop_id is not None else None
    for _ in range(max_new_tokens - width if (done is None or not bool(done.all())) else 0):
        nxt = choose(model(idx[:, -model.cfg.T :])[:, -1, :], sampling, gens, None)[:, None]
        idx = torch.cat([idx, nxt], dim=1)
        if done is not None:
            done |= nxt.squeeze(1) == stop_id
            if bool(done.all()):
                break
    model.train(was_training)
    return idx
