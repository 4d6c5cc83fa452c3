"""CLI: the user's files -> token caches with a train/val split, in bounded memory.

    python -m trainer_accel.prepare --stream my_notes=notes/ --stream web=crawl.parquet --sft qa=dolly.jsonl
    python -m trainer_accel.prepare --sft chat=oasst1_messages.jsonl.gz --oasst-paths best --lang en
    python -m trainer_accel.prepare --demo

A source is NAME=PATH with a name of your own (lowercase letters, digits, _), any number of them; its caches are
$TRAINER_DATA_DIR/cache/{streams,sft}/NAME_{train,val}.bin. What the inputs can be, and what a document is, is in
`trainer_accel/formats`; text keeps every byte (a text file is one document unless --documents says otherwise).

Each document or example goes to val when a keyed hash of its start falls under --val-fraction: the same split on
every run, on any machine, with no shuffle held in memory. A source whose items all land on one side (one file)
gives the last --val-fraction of its tokens (or examples) to val instead, as nanoGPT does.

Memory stays bounded: inputs are read a block or a record batch at a time, encoded in batches through the
tokenizer's batch API, and appended to temporary files; the caches are published together at the end
(cache_writer.py), so a prepare stopped anywhere leaves the old caches intact.
Exit codes: 0 done, 2 bad input (every bad file or row is named; nothing is published).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trainer_accel.data import formats
from trainer_accel.data.cache_writer import (
    CacheWriter,
    prepare_lock,
    publish_caches,
    recover,
)
from trainer_accel.data.chat_template import (
    ChatTemplate,
    TemplateEncoder,
    chat_meta,
    find_chat_template,
)
from trainer_accel.data.tokenizer import (
    ASST,
    DOC,
    EOT,
    USER,
    Tokenizer,
    load_tokenizer,
    tokenizer_file,
)
from trainer_accel.errors import UserError, raise_if_any
from trainer_accel.fsio import loads
from trainer_accel.paths import EXAMPLES, INDEXED, PAIRS, STREAM, Paths, source_name_problem

log = logging.getLogger(__name__)

BATCH_CHARS = 1 << 21  # text per call to the tokenizer: enough pieces for every core, a few tens of MB at most
MAX_LISTED_PROBLEMS = 20
MAX_SEED_DIGITS = 64


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # STREAM or EXAMPLES (paths.py)
    inputs: tuple[Path, ...]


@dataclass(frozen=True)
class Split:
    val_fraction: float = 0.1
    seed: int = 0

    def is_val(self, key: str) -> bool:
        """The keyed hash of an item's start decides its side; stable across runs, machines and Python versions."""
        digest = hashlib.blake2b(
            key[: formats.KEY_CHARS].encode("utf-8", "surrogatepass"), digest_size=8, key=str(self.seed).encode()
        ).digest()
        return int.from_bytes(digest, "little") < self.val_fraction * 2.0**64


class Progress:
    """One bar for the whole run: input MB/s, and tokens/s beside it (silent when stderr is not a terminal)."""

    def __init__(self, total_bytes: int | None):
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None, mininterval=0.5)
        self.tokens, self.bytes, self.started = 0, 0, time.perf_counter()

    def tick(self, n: int) -> None:
        self.bytes += n
        self.bar.update(n)

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        self.bar.set_postfix_str(
            f"{self.tokens / max(time.perf_counter() - self.started, 1e-9) / 1e6:.2f}M tok/s", refresh=False
        )

    def close(self) -> str:
        self.bar.close()
        s = time.perf_counter() - self.started
        return (
            f"{self.bytes / 1e6:,.1f} MB of input, {self.tokens:,} tokens in {s:.1f} s "
            f"({self.bytes / 1e6 / s:.1f} MB/s, {self.tokens / 1e6 / s:.2f}M tokens/s)"
        )


def _encode_stream_batch(tok: Tokenizer, batch: list[tuple[str, CacheWriter, bool, bool]], progress: Progress) -> None:
    """Documents as the model's own tokenizer frames them: its BOS first where it has one (Llama 3), its end-of-text
    token last (DOC's role: <|end_of_text|> for Llama 3, <|endoftext|> for GPT-2 and Qwen)."""
    eot = np.array([tok.special[DOC]], dtype=np.uint32)
    bos = np.array(tok.bos_ids, dtype=np.uint32)
    out: dict[CacheWriter, list[np.ndarray]] = {}
    ends: dict[CacheWriter, int] = {}
    for (_, writer, end, start), ids in zip(batch, tok.encode_batch([text for text, _, _, _ in batch])):
        if start and len(bos):
            out.setdefault(writer, []).append(bos)
        out.setdefault(writer, []).append(ids)
        if end:
            out[writer].append(eot)
            ends[writer] = ends.get(writer, 0) + 1
    for writer, parts in out.items():
        tokens = np.concatenate(parts)
        writer.append(tokens, items=ends.get(writer, 0))
        progress.add_tokens(len(tokens))


def _encode_templated_batch(
    encoder: TemplateEncoder, batch: list[tuple[formats.chat.Turns, CacheWriter]], progress: Progress
) -> None:
    """SFT examples in the model's own chat template (chat_template.py), each example's answers checked."""
    out: dict[CacheWriter, tuple[list[np.ndarray], list[int]]] = {}
    for (_, writer), ids in zip(batch, encoder.encode_many([turns for turns, _ in batch])):
        parts, ends = out.setdefault(writer, ([], []))
        parts.append(ids.astype(np.uint32))
        ends.append((ends[-1] if ends else 0) + len(ids))
    for writer, (parts, ends) in out.items():
        writer.append(np.concatenate(parts), items=len(ends), ends=np.array(ends))
        progress.add_tokens(ends[-1])


def _encode_sft_batch(
    tok: Tokenizer,
    batch: list[tuple[formats.chat.Turns, CacheWriter]],
    progress: Progress,
    encoder: TemplateEncoder | None = None,
) -> None:
    if encoder is not None:
        return _encode_templated_batch(encoder, batch, progress)
    s = tok.special
    ids = iter(tok.encode_batch([text for turns, _ in batch for pair in turns.folded() for text in pair]))
    user, asst, eot = (np.array([s[t]], dtype=np.uint32) for t in (USER, ASST, EOT))
    out: dict[CacheWriter, tuple[list[np.ndarray], list[int]]] = {}
    for turns, writer in batch:
        parts, ends = out.setdefault(writer, ([], []))
        end = ends[-1] if ends else 0
        for _ in turns:
            prompt, answer = next(ids), next(ids)
            parts += [user, prompt, asst, answer, eot]
            end += len(prompt) + len(answer) + 3
        ends.append(end)
    for writer, (parts, ends) in out.items():
        writer.append(np.concatenate(parts), items=len(ends), ends=np.array(ends))
        progress.add_tokens(ends[-1])


def _balance(src: Source, train: CacheWriter, val: CacheWriter, split: Split) -> tuple[CacheWriter, CacheWriter, str]:
    """Both sides non-empty: the hash split stands. Otherwise the tail of the one side becomes val."""
    if train.num_tokens and val.num_tokens:
        return train, val, "hash"
    if not train.num_tokens:
        train.final, val.final = val.final, train.final
        train, val = val, train
    unit = {STREAM: "tokens", EXAMPLES: "examples", PAIRS: "pairs"}[src.kind]
    per = 2 if src.kind == PAIRS else 1  # a pair is two examples of its cache, kept together
    n = train.items // per if src.kind in INDEXED else train.num_tokens
    if n < 2:
        raise UserError(
            f"{src.name}: {n} {unit} in {', '.join(map(str, src.inputs))}; at least 2 are needed for a train/val split"
        )
    n_val = min(n - 1, max(1, round(n * split.val_fraction)))
    train.move_tail_to(val, (n - n_val) * per)
    log.info(
        "%s: every %s fell on one side of the hash split; its last %d %s are val",
        src.name,
        {STREAM: "document", EXAMPLES: "example", PAIRS: "pair"}[src.kind],
        n_val,
        unit,
    )
    return train, val, "tail"


def build(
    src: Source,
    options: formats.ReadOptions,
    split: Split,
    tok: Tokenizer,
    paths: Paths,
    progress: Progress,
    problems: list[str],
    writers: list[CacheWriter],
    encoder: TemplateEncoder | None = None,
) -> list[tuple[Path, Path]]:
    """One source into its two temporary caches; returns the renames that publish them."""
    train, val = (
        CacheWriter(paths.cache(src.kind, src.name, "train"), src.kind, tok),
        CacheWriter(paths.cache(src.kind, src.name, "val"), src.kind, tok),
    )
    writers += [train, val]
    files = [f for p in src.inputs for f in formats.input_files(p, src.kind)]
    batch: list = []
    chars = 0
    dropped: dict[str, int] = {}  # preference rows left out, by why (formats/pairs.py)
    if src.kind == PAIRS:
        for f in files:
            for key, chosen, rejected in formats.pairs(f, problems, progress.tick, dropped):
                writer = val if split.is_val(key) else train
                batch += [(chosen, writer), (rejected, writer)]  # one after the other: the pair's two examples
                chars += sum(len(a) + len(b) for turns in (chosen, rejected) for a, b in turns)
                if chars >= BATCH_CHARS:
                    _encode_sft_batch(tok, batch, progress, encoder)
                    batch, chars = [], 0
        if batch:
            _encode_sft_batch(tok, batch, progress, encoder)
    elif src.kind == STREAM:
        writer = train
        for f in files:
            for piece in formats.document_pieces(f, options, problems, progress.tick):
                if piece.start:
                    writer = val if split.is_val(piece.text) else train
                batch.append((piece.text, writer, piece.end, piece.start))
                chars += len(piece.text)
                if chars >= BATCH_CHARS:
                    _encode_stream_batch(tok, batch, progress)
                    batch, chars = [], 0
        if batch:
            _encode_stream_batch(tok, batch, progress)
    else:
        for f in files:
            for key, turns in formats.examples(f, options, problems, progress.tick):
                batch.append((turns, val if split.is_val(key) else train))
                chars += sum(len(a) + len(b) for a, b in turns)
                if chars >= BATCH_CHARS:
                    _encode_sft_batch(tok, batch, progress, encoder)
                    batch, chars = [], 0
        if batch:
            _encode_sft_batch(tok, batch, progress, encoder)
    if problems:
        return []  # nothing will be published; the caller reports every problem of every source
    train, val, rule = _balance(src, train, val, split)
    meta = {
        "source": src.name,
        "source_files": [str(p) for p in src.inputs],
        "documents": {str(f): formats.unit_of(f, options) if src.kind == STREAM else "row" for f in files},
        "split": {"rule": rule, "val_fraction": split.val_fraction, "seed": split.seed},
        **({"chat": chat_meta(encoder)} if encoder is not None and src.kind in INDEXED else {}),
        **({"dropped": dropped} if src.kind == PAIRS else {}),
    }
    if dropped:
        log.info(
            "%s: left out %d pairs that teach no preference: %s",
            src.name,
            sum(dropped.values()),
            ", ".join(f"{n} with {why}" for why, n in sorted(dropped.items())),
        )
    moves = []
    for name, w in (("train", train), ("val", val)):
        moves += w.finish({**meta, "num_pairs": w.items // 2} if src.kind == PAIRS else meta)
        what = {STREAM: f"{w.items:,} documents", EXAMPLES: f"{w.items:,} examples"}.get(
            src.kind, f"{w.items // 2:,} pairs"
        )
        log.info("%s %s: %s, %s tokens -> %s", src.name, name, what, f"{w.num_tokens:,}", w.final)
    return moves


def _preflight(sources: list[Source], options: formats.ReadOptions) -> tuple[list[str], int | None]:
    """Problems found without reading any data (missing inputs, a format whose package is not installed), and
    the total input size for the progress bar when every input has one."""
    problems, total = [], 0
    for src in sources:
        seen: dict[Path, Path] = {}
        for path in src.inputs:
            try:
                files = formats.input_files(path, src.kind)
            except UserError as e:
                problems += e.problems
                continue
            for f in files:
                if f.resolve() in seen:
                    problems.append(
                        f"{f}: named twice in source {src.name!r} (also as {seen[f.resolve()]}); its "
                        "documents would be read twice"
                    )
                    continue
                seen[f.resolve()] = f
                needs = "datasets" if f.is_dir() else "pyarrow" if f.name.endswith(".parquet") else None
                if needs and importlib.util.find_spec(needs) is None:
                    problems.append(
                        f"{f}: reading it needs the '{needs}' package (pip install 'trainer_accel[formats]')"
                    )
                total = None if total is None or f.is_dir() else total + f.stat().st_size
    if options.oasst_paths not in formats.OASST_PATHS:
        problems.append(f"--oasst-paths {options.oasst_paths}: expected one of {', '.join(formats.OASST_PATHS)}")
    return problems, total


def chosen_template(tokenizer: Path | None, choice: str, args: tuple = ()) -> ChatTemplate | None:
    """The template SFT examples are written in: the model's own beside its tokenizer (choice "model", when it has
    one), a user's file (choice PATH), or None for the built-in one (choice "builtin", or no template)."""
    if tokenizer is None or choice == "builtin":
        if args:
            raise UserError("--template-arg: the built-in chat format takes no template arguments")
        if choice not in ("model", "builtin"):
            raise UserError(f"--chat-template {choice}: a template file needs --tokenizer (the model's tokenizer)")
        return None
    template = find_chat_template(tokenizer_file(tokenizer), choice, args)
    if template is None:
        log.info("%s: no chat template beside it; SFT examples use the built-in one", tokenizer)
    return template


def template_encoder(tok: Tokenizer, template: ChatTemplate | None) -> TemplateEncoder | None:
    if template is None:
        return None
    encoder = TemplateEncoder(tok, template)
    args = f" with {', '.join(f'{k}={v}' for k, v in template.args)}" if template.args else ""
    log.info(
        "SFT examples in the model's chat template (%s%s): answers after %r, up to and including %r",
        template.source,
        args,
        tok.decode(list(encoder.rule.start)),
        tok.decode([encoder.rule.end]),
    )
    return encoder


def say_added(tok: Tokenizer, tokenizer: Path) -> None:
    """What prepare added to the model's tokenizer, and whether the model's embedding has rows for it."""
    if not tok.added:
        return
    first = tok.vocab_size - len(tok.added)
    why = (
        "the built-in chat format"
        if set(tok.added) & {USER, ASST, EOT}
        else "documents (the tokenizer has no end-of-text token)"
    )
    config = tokenizer_file(tokenizer).parent / "config.json"
    rows = None
    try:
        rows = loads(config.read_text()).get("vocab_size") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        pass
    fits = ""
    if isinstance(rows, int):
        fits = (
            f"; the model in {config.parent} has {rows:,} embedding rows, so they take spare rows"
            if rows >= tok.vocab_size
            else f"; the model in {config.parent} has {rows:,} embedding rows: set model_cfg.V to {tok.vocab_size:,} "
            f"(its embedding grows by {tok.vocab_size - rows} rows), or prepare in the model's own template"
        )
    log.info(
        "added %s to the tokenizer (ids %d-%d) for %s%s", ", ".join(tok.added), first, tok.vocab_size - 1, why, fits
    )


def prepare(
    sources: list[Source],
    tokenizer: Path | None,
    split: Split,
    paths: Paths,
    options: formats.ReadOptions = formats.ReadOptions(),
    chat_template: str = "model",
    template_arguments: tuple = (),
) -> None:
    """Build every requested cache. Input problems are all reported, and then nothing is published."""
    template = chosen_template(tokenizer, chat_template, template_arguments)
    tok = load_tokenizer(tokenizer, chat_tokens=template is None)
    if tokenizer is not None:
        say_added(tok, tokenizer)
    encoder = template_encoder(tok, template) if any(s.kind in INDEXED for s in sources) else None
    problems, total = _preflight(sources, options)
    raise_if_any(problems)
    cache_dir = paths.data / "cache"
    with prepare_lock(cache_dir):
        recover(cache_dir)
        writers: list[CacheWriter] = []
        progress = Progress(total)
        try:
            moves = []
            for src in sources:
                moves += build(src, options, split, tok, paths, progress, problems, writers, encoder)
            summary = progress.close()
            if len(problems) > MAX_LISTED_PROBLEMS:
                problems[MAX_LISTED_PROBLEMS:] = [f"... and {len(problems) - MAX_LISTED_PROBLEMS} more bad rows"]
            raise_if_any(problems)
            publish_caches(cache_dir, moves)
            log.info("prepared %s", summary)
        finally:
            progress.bar.close()
            for w in writers:
                w.discard()  # after publishing, only files that were not published are left to remove


def parse_sources(specs: list[str], kind: str, flag: str, problems: list[str]) -> list[Source]:
    """`--stream` / `--sft` SOURCE=PATH flags, repeatable per source; problems are appended, one line each."""
    found: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path or not name:
            problems.append(f"{flag} {spec}: expected SOURCE=PATH, e.g. {flag} my_notes=notes/")
        elif problem := source_name_problem(name):
            problems.append(f"{flag} {spec}: {problem}")
        else:
            found.setdefault(name, []).append(Path(path))
    return [Source(name, kind, tuple(inputs)) for name, inputs in found.items()]
