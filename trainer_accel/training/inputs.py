"""Check every input of a phase before any training, and report all problems together.

Caches (present, complete, matching their meta, one tokenizer, token ids below the model's V, long enough for
T) and the checkpoint a phase starts from (readable, same model shape) are checked here, so a run that starts
is a run that can finish, and a user with three problems hears about all three at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer_accel.config import PhaseConfig
from trainer_accel.data.cache import Cache, answer_mask, answer_rule, open_cache
from trainer_accel.data.chat_template import (
    ChatFormat,
    chat_format,
    find_chat_template,
    template_key,
)
from trainer_accel.data.tokenizer import (
    ASST,
    DOC,
    EOT,
    USER,
    Tokenizer,
    tokenizer_from_meta,
)
from trainer_accel.errors import UserError, raise_if_any
from trainer_accel.paths import CACHE_NAMING, EXAMPLES, FOLDER_KINDS, INDEXED, KIND_FOLDERS, PAIRS, STREAM, Paths
from trainer_accel.training.batches import Batches, PairSource, RowSource, fit_pair, last_answer

log = logging.getLogger(__name__)


@dataclass
class PhaseInputs:
    batches: Batches
    caches: list[Cache]  # every cache the phase reads
    tokenizer: str  # the tokenizer identity all caches share

    @property
    def tokenizer_meta(self) -> dict:
        """The meta of the cache whose tokenizer has every token any of the caches was made with: tokens are only
        ever appended, so its ids are the ids of all of them (a stream cache made for the model's own template and
        an SFT cache in the built-in one, which added <|user|> ...)."""
        return max((c.meta for c in self.caches), key=lambda m: len(m["special_tokens"]))

    def decoder(self) -> Tokenizer | None:
        """The caches' tokenizer, to turn samples back into text (None if it cannot be found any more)."""
        return tokenizer_from_meta(self.tokenizer_meta)

    @property
    def chat(self) -> dict | None:
        """The model's own chat template the SFT caches were written in (chat_template.chat_meta), or None: the
        built-in template (and for pretraining, which has no conversations)."""
        return next((c.meta.get("chat") for c in self.caches if c.meta["kind"] in INDEXED), None)

    def chat_format(self) -> ChatFormat | None:
        """How to prompt the model for samples: in the template its SFT caches used (None without a tokenizer)."""
        tok = self.decoder()
        return None if tok is None else chat_format(tok, self.chat)

    def data_info(self) -> dict:
        """What a checkpoint records of its data: the tokenizer (its identity, and for a tokenizer.json its path),
        the chat template when the model's own, each cache's sha256 by name, and one fingerprint of them all."""
        caches = {f"{c.path.parent.name}/{c.path.name}": c.meta["sha256"] for c in self.caches}
        fingerprint = hashlib.sha256(json.dumps(caches, sort_keys=True).encode()).hexdigest()
        meta = self.tokenizer_meta
        added = {"added_tokens": meta["added_tokens"]} if "added_tokens" in meta else {}
        return {
            "tokenizer": self.tokenizer,
            "tokenizer_path": meta.get("tokenizer_path"),
            **added,
            "caches": caches,
            "data_fingerprint": fingerprint,
            **({"chat": self.chat} if self.chat else {}),
        }


@dataclass(frozen=True)
class CacheRef:
    """A cache a phase reads: its source as configs name it, its kind, its path."""

    source: str
    kind: str  # paths.STREAM or paths.EXAMPLES
    path: Path
    key: str = ""  # the config key that names it: sources.wiki, replay.wiki, sft_sources.dolly, val_source

    @property
    def name(self) -> str:
        """As the mixture, the per-source counts and the gate name it: streams/wiki, sft/dolly."""
        return f"{KIND_FOLDERS[self.kind]}/{self.source}"


def phase_cache_paths(cfg: PhaseConfig, paths: Paths) -> tuple[list[CacheRef], list[CacheRef]]:
    """(train caches in the order of cfg.mixture(), val caches) of a phase: its sources' caches and the replayed
    streams; validated on its sources' val caches when they are examples and all there, else on the val_source
    stream."""
    keys = cfg.keys
    train = []
    for name in cfg.mixture():
        folder, source = name.split("/", 1)
        kind = FOLDER_KINDS[folder]
        key = f"{keys.sources_key if kind == keys.sources_kind else 'replay'}.{source}"
        train.append(CacheRef(source, kind, paths.cache(kind, source, "train"), key))
    stream_val = [
        CacheRef(cfg.val_source, STREAM, paths.stream_cache(cfg.val_source, "val"), f'val_source "{cfg.val_source}"')
    ]
    if keys.sources_kind == STREAM:
        return train, stream_val
    if keys.sources_kind == PAIRS:  # pairs are validated on pairs: a stream has no preference to measure
        return train, [CacheRef(r.source, r.kind, paths.cache(r.kind, r.source, "val"), r.key) for r in train]
    own_val = [
        CacheRef(r.source, r.kind, paths.cache(r.kind, r.source, "val"), r.key)
        for r in train
        if r.kind == keys.sources_kind
    ]
    if all(r.path.is_file() for r in own_val):
        return train, own_val
    log.info("%s val caches not all present; evaluating on the %s stream val cache", cfg.phase.upper(), cfg.val_source)
    return train, stream_val


def max_token_id(cache: Cache) -> int:
    """The largest token id, from the meta; a meta without it (written by another tool) costs one pass over the
    cache, said in the log: an id at or above V would otherwise end the run with an IndexError mid-training."""
    if "max_token_id" not in cache.meta:
        tokens, chunk = cache.tokens, 1 << 24
        cache.meta["max_token_id"] = max(
            (int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)), default=-1
        )
        del tokens
        log.warning(
            "%s: its meta has no max_token_id; read the whole cache to find it (%d)",
            cache.path,
            cache.meta["max_token_id"],
        )
    return int(cache.meta["max_token_id"])


def _vocab_problem(caches: list[Cache], V: int) -> str | None:
    """One line for every cache whose tokenizer has more tokens than the model has rows, saying which tokens
    prepare added and what to set."""
    over = [c for c in caches if c.meta["vocab_size"] > V]
    if not over:
        return None
    meta = max((c.meta for c in over), key=lambda m: m["vocab_size"])
    n, added = meta["vocab_size"], meta.get("added_tokens") or []
    names = ", ".join(c.path.name for c in over[:3]) + (f" and {len(over) - 3} more" if len(over) > 3 else "")
    what = f"; prepare added {', '.join(added)} to the model's own {n - len(added):,}" if added else ""
    way = (
        " (or prepare the SFT data in the model's own chat template, which adds none)"
        if {USER, ASST, EOT} & set(added)
        else ""
    )
    return (
        f"{over[0].path.parent}: {names}: the tokenizer has {n:,} tokens{what}, model_cfg.V={V:,} has rows for "
        f"{V:,}: set model_cfg.V to {n:,} (a Hugging Face start grows its embedding; new rows start at the mean "
        f"embedding){way}"
    )


def _check_caches(cfg: PhaseConfig, caches: list[Cache]) -> list[str]:
    problems = []
    T, V = cfg.seq_len, cfg.model.V
    vocab = _vocab_problem(caches, V)
    if vocab:
        problems.append(vocab)
    for c in caches:
        if c.meta["vocab_size"] <= V and max_token_id(c) >= V:
            problems.append(f"{c.path}: holds token id {max_token_id(c)}, not below model_cfg.V={V}")
        if c.meta["kind"] == STREAM and c.meta["num_tokens"] < T + 1:
            problems.append(f"{c.path}: {c.meta['num_tokens']} tokens, fewer than one window of T+1={T + 1}")
    identities = sorted({c.meta["tokenizer"] for c in caches})
    if len(identities) > 1:
        per = "; ".join(f"{c.path.name}: {c.meta['tokenizer']}" for c in caches)
        problems.append(f"caches were made with different tokenizers ({per}); prepare them with one tokenizer")
    else:  # one tokenizer, tokens added or not: each role must have one id in all of them
        roles: dict[str, set[int]] = {}
        for c in caches:
            for role, i in c.meta["special_tokens"].items():
                roles.setdefault(role, set()).add(i)
        clash = {role: sorted(ids) for role, ids in roles.items() if len(ids) > 1}
        if clash:
            problems.append(
                f"caches made with one tokenizer disagree on special token ids ({json.dumps(clash)}: "
                "some were prepared by an older trainer that added tokens the model has its own of); "
                "prepare them again together"
            )
    sft = [c for c in caches if c.meta["kind"] in INDEXED]
    templates = {template_key(c.meta.get("chat")) for c in sft}
    if len(templates) > 1:
        per = "; ".join(f"{c.path.name}: {(c.meta.get('chat') or {}).get('template_source', 'built-in')}" for c in sft)
        problems.append(
            f"SFT and preference caches were written in different chat templates ({per}); prepare them with one"
        )
    return problems


ANSWER_SAMPLE = 4096  # SFT examples looked at per cache for cut answers: all of a small cache, a sample of a big one


def _check_answers(cfg: PhaseConfig, cache: Cache) -> str | None:
    """Whether the SFT rows of T+1 tokens keep their answers. An example cut before its answer trains nothing (its
    row counts no target); a cache where every answer is cut trains on loss 0 and validates to nan. Looks at the
    first T+1 tokens of at most ANSWER_SAMPLE examples, so the check costs the same for any cache size."""
    T, n = cfg.seq_len, cache.num_examples
    lengths = np.diff(cache.starts)
    picked = (
        np.arange(n)
        if n <= ANSWER_SAMPLE
        else np.sort(np.random.default_rng(0).choice(n, ANSWER_SAMPLE, replace=False))
    )
    s = cache.meta["special_tokens"]
    rows = np.full((len(picked), T + 1), s[DOC], dtype=np.int64)
    tokens = cache.tokens
    for r, i in enumerate(picked):
        a = cache.starts[i]
        b = min(cache.starts[i + 1], a + T + 1)
        rows[r, : b - a] = tokens[a:b]
    del tokens
    answered = answer_mask(rows, answer_rule(cache.meta)).any(axis=1)
    of = f"{len(picked):,} of {n:,}" if n > len(picked) else f"all {n:,}"
    if not answered.any():
        return (
            f"{cache.path}: no example keeps any of its answer within T={T} tokens ({of} examples looked at); "
            "raise model_cfg.T or shorten the prompts"
        )
    lost, cut = 1 - answered.mean(), (lengths > T + 1).mean()
    if lost > 0.1 or cut > 0.5:
        log.warning(
            "%s: %.0f%% of examples are longer than T+1=%d tokens and cut; %.0f%% lose their whole answer and "
            "train nothing (%s examples looked at)",
            cache.path,
            100 * cut,
            T + 1,
            100 * lost,
            of,
        )
    return None


def say_cut_pairs(cfg: PhaseConfig, cache: Cache) -> None:
    """How many pairs of a preference cache do not fit in a row of T+1 tokens, and are cut by the stated rule
    (batches.fit_pair: the prompt from the left first, to half the row at most, then the answers from the right)."""
    n = cache.num_examples // 2
    picked = range(n) if n <= ANSWER_SAMPLE else np.random.default_rng(0).choice(n, ANSWER_SAMPLE, replace=False)
    tokens, rule = cache.tokens, answer_rule(cache.meta)
    prompts_cut = answers_cut = 0
    for i in picked:
        seqs = [np.asarray(tokens[cache.starts[2 * i + k] : cache.starts[2 * i + k + 1]]) for k in (0, 1)]
        spans = [last_answer(q, rule) for q in seqs]
        answers = tuple(b - a for a, b in spans)
        keep, room = fit_pair(min(a for a, _ in spans), answers, cfg.seq_len + 1)
        prompts_cut += keep < min(a for a, _ in spans)
        answers_cut += room < max(answers)
    del tokens
    if prompts_cut:
        log.warning(
            "%s: %d of %d pairs looked at are longer than T+1=%d tokens: their prompts are cut from the left%s",
            cache.path,
            prompts_cut,
            len(picked),
            cfg.seq_len + 1,
            f", and {answers_cut} also lose the end of an answer" if answers_cut else "",
        )


def say_template(caches: list[Cache]) -> None:
    """A run in another template than the one the model came with (the one beside its tokenizer) says so at
    start: the model learns the template it is trained in, and its exports carry that one."""
    sft = [c for c in caches if c.meta["kind"] in INDEXED]
    path = sft[0].meta.get("tokenizer_path") if sft else None
    if not path or not Path(path).is_file():
        return
    try:
        own = find_chat_template(Path(path))
    except UserError:
        return
    chat = sft[0].meta.get("chat")
    if own is None or (chat and chat["template_sha256"] == own.sha256):
        return
    trained = f"the template of {chat['template_source']}" if chat else "the built-in <|user|> ... <|eot|> format"
    log.warning(
        "SFT examples are in %s, not the template the model came with (%s); the model learns that one and "
        "its exports carry it",
        trained,
        own.source,
    )


def check_phase_inputs(cfg: PhaseConfig, paths: Paths) -> PhaseInputs:
    train_refs, val_refs = phase_cache_paths(cfg, paths)
    wanted = train_refs + val_refs
    missing = [r for r in wanted if not r.path.is_file()]
    if missing:
        naming = CACHE_NAMING.replace("{data}", str(paths.data)).replace("{file}", "X.bin")
        raise UserError(
            [f"{r.path}: cache missing (named by {r.key})" for r in missing] + [f"naming convention: {naming}"]
        )
    problems, opened = [], {}
    for r in wanted:
        try:
            opened[r.path] = open_cache(r.path, r.kind, verify_hash=cfg.train.verify_cache_hash)
        except UserError as e:
            problems += e.problems
    raise_if_any(problems)
    caches = list(opened.values())
    raise_if_any(_check_caches(cfg, caches))
    raise_if_any([p for c in caches if c.meta["kind"] == EXAMPLES and (p := _check_answers(cfg, c))])
    say_template(caches)
    if cfg.keys.sources_kind == PAIRS:
        for c in caches:
            say_cut_pairs(cfg, c)
        train = PairSource(
            [opened[r.path] for r in train_refs],
            np.array([cfg.sources[r.source] for r in train_refs]) / sum(cfg.sources[r.source] for r in train_refs),
            cfg.seq_len,
            [r.name for r in train_refs],
        )
        weights = np.array([cfg.sources[r.source] for r in val_refs])
        val = PairSource(
            [opened[r.path] for r in val_refs], weights / weights.sum(), cfg.seq_len, [r.name for r in val_refs]
        )
        return PhaseInputs(Batches(train, val, cfg.train.B, cfg.train.seed), caches, caches[0].meta["tokenizer"])

    probs = np.array(list(cfg.mixture().values()), dtype=np.float64)
    probs /= probs.sum()
    train = RowSource(
        [opened[r.path] for r in train_refs],
        probs,
        cfg.seq_len,
        [r.kind for r in train_refs],
        [r.name for r in train_refs],
        pack=cfg.train.pack,
    )
    val_probs = np.array([cfg.sources[r.source] for r in val_refs]) if val_refs[0].kind == EXAMPLES else np.ones(1)
    val = RowSource(
        [opened[r.path] for r in val_refs],
        val_probs / val_probs.sum(),
        cfg.seq_len,
        [r.kind for r in val_refs],
        [r.name for r in val_refs],
        pack=cfg.train.pack_val,
    )
    inputs = PhaseInputs(
        batches=Batches(train, val, cfg.train.B, cfg.train.seed), caches=caches, tokenizer=caches[0].meta["tokenizer"]
    )
    raise_if_any(sample_prompt_problems(cfg, inputs))
    return inputs


def sample_prompt_problems(cfg: PhaseConfig, inputs: PhaseInputs) -> list[str]:
    """Each chat sample rendered once now, in the template the run trains in: a template that refuses one (a system
    message it has no role for) is said by --plan and before training, not at the first checkpoint."""
    chats = [(i, p) for i, p in enumerate(cfg.sample_prompts) if p.task == "chat"]
    form = inputs.chat_format() if chats else None
    problems = []
    for i, p in chats if form is not None else []:
        try:
            form.prompt(p.prompt, (), p.system)
        except UserError as e:
            problems += [f"sample_prompts[{i}]: {line}" for line in e.problems]
    return problems


def collect(*checks) -> list:
    """Run each check (a no-argument callable), gathering every UserError's problems before raising."""
    results, problems = [], []
    for check in checks:
        try:
            results.append(check())
        except UserError as e:
            results.append(None)
            problems += e.problems
    raise_if_any(problems)
    return results
