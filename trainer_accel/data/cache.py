"""Token caches on disk, and rows drawn from them by address.

Format (version 2). `X.bin` is a flat array of token ids, uint16 when the vocabulary fits, else uint32, native
little-endian, no header. `X.bin.meta.json` describes it:
    format "trainer_accel.cache", version, kind ("stream" | "sft"), dtype, num_tokens, vocab_size,
    max_token_id, tokenizer (identity string), special_tokens (name -> id), sha256 (of X.bin), source,
    source_files, documents (input file -> what one document of it is: file, blank-lines, separator '...', row),
    split {rule: hash | tail, val_fraction, seed}, and for SFT caches num_examples and index {file, dtype, sha256}.
    Written by prepare.py through cache_writer.py.
Streams are documents joined by <|endoftext|>. Preference caches ("pref") are written as SFT caches are, two
examples per pair: the conversation ending in the chosen answer, then the one ending in the rejected answer
(meta num_pairs, dropped: rows left out by reason). SFT caches are examples `<|user|> prompt <|assistant|> answer
<|eot|>` (one turn pair after another for conversations), or in a model's own chat template when the meta has
"chat" (its template, and the answer rule: chat_template.py), back to back; `X.bin.idx` (uint64, num_examples + 1
offsets) says where each example starts, so examples never need to be found by scanning.

Rows are pure functions of an address: a `numpy.random.Generator` seeded from (seed, purpose, step or batch
index) chooses every row of a global batch, and a process reads only its own slice. Nothing here depends on
what was drawn before, so resuming at any step needs no replay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer_accel.data.chat_template import AnswerRule, answer_positions
from trainer_accel.data.tokenizer import ASST, EOT
from trainer_accel.errors import UserError
from trainer_accel.fsio import loads, sha256_file
from trainer_accel.paths import EXAMPLES, INDEXED, PAIRS, STREAM
from trainer_accel.versions import upgrade

CACHE_FORMAT = "trainer_accel.cache"
CACHE_VERSION = 2
IGNORE_INDEX = -100

# Tags that keep the random streams for different purposes apart.
TRAIN_TAG, VAL_TAG = 0, 1


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def meta_path(bin_path: Path) -> Path:
    return bin_path.with_name(bin_path.name + ".meta.json")


def index_path(bin_path: Path) -> Path:
    return bin_path.with_name(bin_path.name + ".idx")


@dataclass
class Cache:
    """An open cache. Its tokens are memory-mapped afresh for each batch and unmapped after it: a long-lived
    map of a random-access file keeps every page it ever touched in the process's resident memory, so training
    on a cache of many GB would grow to its size (nanoGPT re-creates its memmap per batch for the same reason)."""

    path: Path
    meta: dict
    starts: np.ndarray | None  # SFT: example start offsets (num_examples + 1), else None

    @property
    def num_examples(self) -> int:
        return 0 if self.starts is None else len(self.starts) - 1

    @property
    def tokens(self) -> np.ndarray:
        """A read-only memmap of all token ids; drop it when done (see the class note)."""
        return np.memmap(self.path, dtype=np.dtype(self.meta["dtype"]), mode="r")


def _v1_to_v2(meta: dict) -> dict:
    """Version 2 SFT caches may be written in a model's own chat template, with its answer rule under "chat"; a
    version 1 cache is in the built-in template, which no "chat" means. (A trainer before version 2 would mask a
    templated cache by the built-in rule and count nothing, so it must refuse one.)"""
    return meta


CACHE_UPGRADES = {1: _v1_to_v2}  # version -> the step to the next (versions.py); version 1 is the first there was
REQUIRED_META = (
    "format",
    "version",
    "kind",
    "dtype",
    "num_tokens",
    "vocab_size",
    "tokenizer",
    "special_tokens",
    "sha256",
)


def open_cache(bin_path: Path, kind: str, verify_hash: bool = False) -> Cache:
    """Open and check one cache against its meta; raises UserError naming the file and what is wrong."""
    mp = meta_path(bin_path)
    if not bin_path.is_file():
        raise UserError(f"{bin_path}: cache missing")
    if not mp.is_file():
        raise UserError(f"{mp}: meta file missing (the cache was not finished; prepare it again)")
    try:
        meta = loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mp}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_META if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{mp}: meta lacks {', '.join(missing)}")
    if meta["format"] != CACHE_FORMAT:
        raise UserError(f"{mp}: format {meta['format']!r}, expected {CACHE_FORMAT}")
    try:
        meta = upgrade(meta, "version", CACHE_VERSION, CACHE_UPGRADES, str(mp), "cache", mp)
    except ValueError as e:
        raise UserError(f"{mp}: {e}") from None
    if meta["kind"] != kind:
        raise UserError(f"{mp}: a {meta['kind']} cache where a {kind} cache belongs")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise UserError(f"{mp}: dtype {meta['dtype']!r}, expected uint16 or uint32")
    dtype = np.dtype(meta["dtype"])
    size = bin_path.stat().st_size
    if size != meta["num_tokens"] * dtype.itemsize:
        raise UserError(
            f"{bin_path}: {size} bytes, but its meta says {meta['num_tokens']} {meta['dtype']} tokens "
            f"({meta['num_tokens'] * dtype.itemsize} bytes)"
        )
    if verify_hash and sha256_file(bin_path) != meta["sha256"]:
        raise UserError(f"{bin_path}: content does not match the sha256 in its meta (corrupt or changed)")
    if meta["num_tokens"] == 0:
        raise UserError(f"{bin_path}: cache is empty")
    starts = None
    if kind in INDEXED:
        ip = index_path(bin_path)
        if not ip.is_file():
            raise UserError(f"{ip}: example index missing (prepare the SFT cache again)")
        starts = np.fromfile(ip, dtype=np.uint64).astype(np.int64)
        n = meta.get("num_examples")
        if (
            len(starts) != (n or 0) + 1
            or starts[0] != 0
            or starts[-1] != meta["num_tokens"]
            or np.any(np.diff(starts) <= 0)
        ):
            raise UserError(f"{ip}: example index does not match its cache ({n} examples, {meta['num_tokens']} tokens)")
        if kind == PAIRS and n % 2:
            raise UserError(f"{ip}: a preference cache holds two conversations per pair, its index has {n}")
    return Cache(path=bin_path, meta=meta, starts=starts)


# ---------------------------------------------------------------------------------------------------------------
# Rows by address


def address_rng(seed: int, tag: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, tag, index])


def _choose_sources(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(len(probs), size=n, p=probs)


def stream_rows(
    caches: list[Cache], probs: np.ndarray, rng: np.random.Generator, n: int, T: int, keep: slice = slice(None)
) -> np.ndarray:
    """n random windows of T+1 tokens over the mixed streams; returns the rows selected by `keep`."""
    which = _choose_sources(rng, probs, n)
    u = rng.random(n)
    maps = {src: caches[src].tokens for src in set(which[keep])}  # one map per cache for this batch only
    rows = []
    for src, frac in zip(which[keep], u[keep]):
        arr = maps[src]
        start = int(frac * (len(arr) - T))  # len(arr) >= T + 1 is checked when the caches are opened
        rows.append(arr[start : start + T + 1])
    return np.stack(rows).astype(np.int64)


@dataclass
class Rows:
    """Rows of T+1 tokens, and where each token came from (an index into the caches the rows were drawn from)."""

    tokens: np.ndarray  # (k, T+1) int64
    source: np.ndarray  # (k, T+1) int64; padding counts as its row's source (it is never a counted target)
    row_source: np.ndarray  # (k,) the cache each row was drawn for (a packed row: its first example's)
    segment: np.ndarray | None  # (k, T+1) int64: the packed example each token belongs to; None when not packed


def draw_rows(
    caches: list[Cache],
    kinds: list[str],
    probs: np.ndarray,
    rng: np.random.Generator,
    n: int,
    T: int,
    pad_id: int,
    keep: slice = slice(None),
    pack: bool = False,
) -> Rows:
    """n rows of a mixture of stream and SFT caches, by address; returns the rows selected by `keep`.

    A stream row is a window of T+1 tokens at a random place. An SFT row is one example, cut to T+1 tokens or
    padded with `pad_id`; packed, it is examples back to back until the row is full, the last one cut. Each row's
    source and first example come from two draws per row made for all n rows; a packed row's further examples
    come from its own generator, seeded by the batch and the row's index in the global batch, so any process
    split draws the same rows. Without packing the draws are exactly those of an unpacked batch."""
    which = _choose_sources(rng, probs, n)
    u = rng.random(n)
    base = int(rng.integers(2**62)) if pack else 0
    picked = np.arange(n)[keep]
    tokens = np.full((len(picked), T + 1), pad_id, dtype=np.int64)
    source = np.repeat(which[picked][:, None], T + 1, axis=1).astype(np.int64)
    segment = np.zeros_like(tokens) if pack else None
    sft = np.array([i for i, k in enumerate(kinds) if k == EXAMPLES])
    sft_probs = probs[sft] / probs[sft].sum() if len(sft) else None
    maps: dict[int, np.ndarray] = {}  # one map per cache for this batch only

    def mapped(src: int) -> np.ndarray:
        if src not in maps:
            maps[src] = caches[src].tokens
        return maps[src]

    for r, g in enumerate(picked):
        src, frac = int(which[g]), u[g]
        if kinds[src] == STREAM:
            arr = mapped(src)
            start = int(frac * (len(arr) - T))  # len(arr) >= T + 1 is checked when the caches are opened
            tokens[r] = arr[start : start + T + 1]
            continue
        row_rng = np.random.default_rng([base, int(g)]) if pack else None
        filled, seg = 0, 0
        while filled < T + 1:
            c = caches[src]
            i = int(frac * c.num_examples)
            a = c.starts[i]
            b = min(c.starts[i + 1], a + T + 1 - filled)
            tokens[r, filled : filled + b - a] = mapped(src)[a:b]
            source[r, filled : filled + b - a] = src
            if not pack:
                break
            segment[r, filled : filled + b - a] = seg
            filled, seg = filled + b - a, seg + 1
            src, frac = int(sft[row_rng.choice(len(sft), p=sft_probs)]), row_rng.random()
    return Rows(tokens, source, which[picked].astype(np.int64), segment)


def answer_rule(meta: dict) -> AnswerRule:
    """Where an SFT cache's answers are: the built-in template's (after <|assistant|>, up to and including
    <|eot|>), or the rule of the model's own template that prepare recorded (chat_template.py)."""
    chat = meta.get("chat")
    if chat:
        return AnswerRule(tuple(chat["answer_start"]), chat["answer_end"])
    s = meta["special_tokens"]
    return AnswerRule((s[ASST],), s[EOT])


def answer_mask(rows: np.ndarray, rule: AnswerRule) -> np.ndarray:
    """Which targets of rows[:, 1:] count in the loss: those inside an answer by the rule, its closing token
    included. Prompts, template tokens before the answer, and padding after it do not count."""
    return answer_positions(rows, rule)[:, 1:]


def masked_targets(rows: np.ndarray, rule: AnswerRule) -> np.ndarray:
    y = rows[:, 1:].copy()
    y[~answer_mask(rows, rule)] = IGNORE_INDEX
    return y
