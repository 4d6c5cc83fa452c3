"""CLI: the user's text and JSONL files -> token caches with a train/val split.

    python -m trainer_accel.prepare --stream wiki=corpus/ --stream roam=notes.md --sft dolly=dolly.jsonl
    python -m trainer_accel.prepare --demo

Pretrain sources (wiki, roam, primer) are plain text: a file or a folder of *.txt / *.md files; documents are
paragraphs separated by blank lines. SFT sources (dolly, oasst1, primer) are JSONL, one example per line, as
{"prompt": ..., "response": ...} (Dolly's {"instruction", "context", "response"} also works) or
{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}. Documents and examples are split
into train and val by a seeded shuffle. Caches land under $TRAINER_DATA_DIR/cache (default ./data/cache).
Exit codes: 0 done, 2 bad input (every bad file or line is named).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np

from .data import write_cache
from .errors import UserError, exit_with, raise_if_any, report
from .paths import SFT_SOURCES, STREAM_SOURCES, Paths, resolve_paths, unwritable
from .tokenizer import DOC, Tokenizer, encode_chat, load_tokenizer

log = logging.getLogger("trainer_accel")

TEXT_SUFFIXES = (".txt", ".md")
MAX_LISTED_PROBLEMS = 20


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not found:
            raise UserError(f"{path}: folder holds no {' / '.join(suffixes)} files")
        return found
    if not path.is_file():
        raise UserError(f"{path}: file or folder not found")
    return [path]


def read_documents(path: Path) -> list[str]:
    docs = []
    for f in _files(path, TEXT_SUFFIXES):
        try:
            text = f.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"{f}: not UTF-8 text (byte {e.start})") from None
        docs += [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not docs:
        raise UserError(f"{path}: no text found")
    return docs


def _turns_of(obj: object) -> list[tuple[str, str]]:
    """One JSONL object -> [(prompt, answer), ...]; raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list')
        system, turns, pending = "", [], None
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f'messages[{i}] must be {{"role": "system"|"user"|"assistant", "content": "..."}}')
            if m["role"] == "system":
                system += m["content"] + "\n\n"
            elif m["role"] == "user":
                if pending is not None:
                    raise ValueError(f"messages[{i}]: two user messages in a row")
                pending = system + m["content"]
                system = ""
            else:
                if pending is None:
                    raise ValueError(f"messages[{i}]: an assistant message with no user message before it")
                turns.append((pending, m["content"]))
                pending = None
        if not turns:
            raise ValueError("no user/assistant pair in messages")
        return turns
    prompt = obj.get("prompt", obj.get("instruction"))
    response = obj.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError('expected {"prompt": "...", "response": "..."} or {"messages": [...]}')
    context = obj.get("context")
    if isinstance(context, str) and context.strip():
        prompt = f"{prompt}\n\n{context}"
    return [(prompt, response)]


def read_examples(path: Path) -> list[list[tuple[str, str]]]:
    examples, problems = [], []
    for f in _files(path, (".jsonl",)):
        with open(f, encoding="utf-8-sig") as fh:  # a byte-order mark, as some editors write, is not content
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    examples.append(_turns_of(json.loads(line)))
                except json.JSONDecodeError as e:
                    problems.append(f"{f}:{n}: not valid JSON ({e.msg})")
                except ValueError as e:
                    problems.append(f"{f}:{n}: {e}")
    if len(problems) > MAX_LISTED_PROBLEMS:
        problems = problems[:MAX_LISTED_PROBLEMS] + [f"{path}: ... and {len(problems) - MAX_LISTED_PROBLEMS} more bad lines"]
    raise_if_any(problems)
    if not examples:
        raise UserError(f"{path}: no examples found")
    return examples


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle; at least one item on each side when there are two or more."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def build_stream(name: str, docs: list[str], sources: list[str], tok: Tokenizer, paths: Paths, val_fraction: float,
                 seed: int) -> None:
    encoded = [np.array(tok.encode(d) + [tok.special[DOC]], dtype=np.int64) for d in docs]
    train_idx, val_idx = split_indices(len(docs), val_fraction, seed)
    if len(val_idx):
        splits = {"train": np.concatenate([encoded[i] for i in train_idx]), "val": np.concatenate([encoded[i] for i in val_idx])}
    else:  # a single document: its tail becomes val
        whole = encoded[0]
        cut = max(1, int(len(whole) * (1 - val_fraction)))
        splits = {"train": whole[:cut], "val": whole[cut:]}
    for split, tokens in splits.items():
        out = paths.stream_cache(name, split)
        write_cache(out, tokens, "stream", tok, sources)
        log.info("wrote %s: %s tokens", out, f"{len(tokens):,}")


def build_sft(name: str, examples: list, sources: list[str], tok: Tokenizer, paths: Paths, val_fraction: float,
              seed: int) -> None:
    train_idx, val_idx = split_indices(len(examples), val_fraction, seed)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        encoded = [np.array(encode_chat(tok, examples[i]), dtype=np.int64) for i in idx]
        starts = np.concatenate([[0], np.cumsum([len(e) for e in encoded])])
        out = paths.sft_cache(name, split)
        write_cache(out, np.concatenate(encoded), "sft", tok, sources, example_starts=starts)
        log.info("wrote %s: %d examples, %s tokens", out, len(idx), f"{int(starts[-1]):,}")


def _parse_sources(specs: list[str], allowed: tuple[str, ...], flag: str) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    problems = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            problems.append(f"{flag} {spec}: expected SOURCE=PATH, e.g. {flag} {allowed[0]}=corpus/")
        elif name not in allowed:
            problems.append(f"{flag} {spec}: unknown source '{name}' (expected one of {', '.join(allowed)})")
        else:
            out.setdefault(name, []).append(Path(path))
    raise_if_any(problems)
    return out


def _read_all(sources: dict[str, list[Path]], reader, problems: list[str]) -> dict[str, list]:
    out = {}
    for name, inputs in sorted(sources.items()):
        items = []
        for p in inputs:
            try:
                items += reader(p)
            except UserError as e:
                problems += e.problems
        out[name] = items
    return out


def prepare(streams: dict[str, list[Path]], sfts: dict[str, list[Path]], tokenizer: Path | None,
            val_fraction: float, seed: int, paths: Paths) -> None:
    """Build every requested cache; all input problems are reported before anything is written."""
    tok = load_tokenizer(tokenizer)
    problems: list[str] = []
    docs = _read_all(streams, read_documents, problems)
    examples = _read_all(sfts, read_examples, problems)
    problems += [f"{name}: {len(ex)} example, at least 2 are needed for a train/val split"
                 for name, ex in examples.items() if len(ex) == 1]
    raise_if_any(problems)
    for i, (name, items) in enumerate(docs.items()):
        build_stream(name, items, [str(p) for p in streams[name]], tok, paths, val_fraction, seed + i)
    for i, (name, items) in enumerate(examples.items()):
        build_sft(name, items, [str(p) for p in sfts[name]], tok, paths, val_fraction, seed + 100 + i)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--stream", action="append", default=[], metavar="SOURCE=PATH",
                   help=f"pretrain text, SOURCE in {', '.join(STREAM_SOURCES)} (repeatable)")
    p.add_argument("--sft", action="append", default=[], metavar="SOURCE=PATH",
                   help=f"SFT JSONL, SOURCE in {', '.join(SFT_SOURCES)} (repeatable)")
    p.add_argument("--demo", action="store_true", help="write the built-in synthetic corpus and cache all six sources")
    p.add_argument("--tokenizer", type=Path, help="a local Hugging Face tokenizer.json (default: built-in bytes)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents / examples held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = resolve_paths()
    try:
        if not 0 < args.val_fraction < 1:
            raise UserError(f"--val-fraction: must be between 0 and 1, got {args.val_fraction}")
        streams = _parse_sources(args.stream, STREAM_SOURCES, "--stream")
        sfts = _parse_sources(args.sft, SFT_SOURCES, "--sft")
        if not streams and not sfts and not args.demo:
            raise UserError("nothing to prepare: give --stream SOURCE=PATH, --sft SOURCE=PATH or --demo")
        raise_if_any(unwritable([("caches", paths.data / "cache")]
                                + ([("the demo corpus", paths.data / "raw" / "demo")] if args.demo else [])))
        if args.demo:
            from .demo import write_demo_corpus

            raw = write_demo_corpus(paths.data / "raw" / "demo")
            streams = {**{s: [raw / f"{s}.txt"] for s in STREAM_SOURCES}, **streams}
            sfts = {**{s: [raw / f"{s}.jsonl"] for s in SFT_SOURCES}, **sfts}
        prepare(streams, sfts, args.tokenizer, args.val_fraction, args.seed, paths)
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    exit_with(main)
