"""What users bring, read as documents (pretraining streams) or examples (SFT), whatever its size.

An input is a file or a folder:
    *.txt, *.md                      text; a document is the whole file unless --documents says otherwise (text.py)
    *.jsonl, *.jsonl.gz              one row per line                                              (rows.py)
    *.parquet                        rows, read a record batch at a time       (needs the `formats` extra)
    a folder holding dataset_info.json, state.json or dataset_dict.json
                                     a Hugging Face dataset saved with save_to_disk, every split   (`formats` extra)
    any other folder                 every file above inside it, in path order
Streams take one document per row from its text field (`text`, or the one --text-field names). SFT takes the row
shapes in chat.py, oasst1 message trees included; preference pairs the shapes in pairs.py. A row that does not
fit is reported with its file and row, and reading goes on, so every bad row of a run is heard about at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trainer_accel.data.formats import text as text_format
from trainer_accel.data.formats.chat import (
    OASST_PATHS,
    MessageTrees,
    Turns,
    is_oasst_message,
    is_oasst_tree,
    turns_of,
)
from trainer_accel.data.formats.pairs import Dropped, pair_of
from trainer_accel.data.formats.rows import BadRow, is_saved_dataset, rows
from trainer_accel.data.formats.text import (
    KEY_CHARS,
    DocumentRule,
    Piece,
    parse_document_rule,
    split_documents,
    text_blocks,
)
from trainer_accel.errors import UserError
from trainer_accel.paths import EXAMPLES, PAIRS, STREAM

__all__ = [
    "KEY_CHARS",
    "OASST_PATHS",
    "DocumentRule",
    "Piece",
    "ReadOptions",
    "document_pieces",
    "examples",
    "input_files",
    "pairs",
    "parse_document_rule",
    "unit_of",
]

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
SUFFIXES = {STREAM: TEXT_SUFFIXES + ROW_SUFFIXES, EXAMPLES: ROW_SUFFIXES, PAIRS: ROW_SUFFIXES}
Tick = Callable[[int], None]


@dataclass(frozen=True)
class ReadOptions:
    documents: DocumentRule = DocumentRule("file")
    text_field: str = "text"
    oasst_paths: str = "leaves"
    langs: frozenset[str] = field(default_factory=frozenset)


def _suffix(path: Path) -> str:
    return ".jsonl.gz" if path.name.endswith(".jsonl.gz") else path.suffix


def input_files(path: Path, kind: str) -> list[Path]:
    """The files (or saved datasets) one input names. A file named directly is read by its suffix, and as the
    kind's plain format (text for streams, JSONL for SFT) when the suffix says nothing."""
    if is_saved_dataset(path):
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in SUFFIXES[kind])
        if not found:
            raise UserError(f"{path}: folder holds no {' / '.join(SUFFIXES[kind])} files and is not a saved dataset")
        return found
    if not path.is_file():
        raise UserError(f"{path}: file or folder not found")
    return [path]


def unit_of(path: Path, options: ReadOptions) -> str:
    """What one document is in this file, as the cache's meta records it."""
    return "row" if is_saved_dataset(path) or _suffix(path) in ROW_SUFFIXES else options.documents.describe()


def _shown(value: object) -> str:
    """A field's value, short, for an error line; Parquet and datasets can hold bytes, which JSON cannot show."""
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return f"{type(value).__name__} {repr(value)[:40]}"


def _rows_or_problem(path: Path, tick: Tick, problems: list[str], columns: list[str] | None = None):
    """The rows of one input; a file that cannot be read at all (no such column, damaged) is one more problem."""
    try:
        yield from rows(path, tick, columns)
    except UserError as e:
        problems += e.problems


def document_pieces(path: Path, options: ReadOptions, problems: list[str], tick: Tick) -> Iterator[Piece]:
    """The pieces of every document in one input file; bad rows are appended to `problems`."""
    if unit_of(path, options) != "row":
        yield from split_documents(text_blocks(path, tick), options.documents)
        return
    one_each = DocumentRule("file")
    for where, row in _rows_or_problem(path, tick, problems, [options.text_field]):
        if isinstance(row, BadRow):
            problems.append(f"{where}: {row.problem}")
        elif not isinstance(row, dict) or options.text_field not in row:
            fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            problems.append(
                f"{where}: no text field {options.text_field!r} (row has: {fields}; choose the field with --text-field)"
            )
        elif not isinstance(row[options.text_field], str):
            problems.append(
                f"{where}: field {options.text_field!r} holds {_shown(row[options.text_field])}, expected a string"
            )
        elif len(text := row[options.text_field]) <= text_format.PIECE_CHARS:
            if text:
                yield Piece(text, start=True, end=True)  # the common case, without the splitter's machinery
        else:
            yield from split_documents(iter([text]), one_each)


def examples(path: Path, options: ReadOptions, problems: list[str], tick: Tick) -> Iterator[tuple[str, Turns]]:
    """(split key, turns) for every example in one input file; bad rows are appended to `problems`. The key of a
    plain row is its content; oasst1 conversations use their tree's root, so a tree stays on one side."""
    trees = MessageTrees(paths=options.oasst_paths, langs=options.langs)
    for where, row in _rows_or_problem(path, tick, problems):
        try:
            if isinstance(row, BadRow):
                raise ValueError(row.problem)
            if is_oasst_message(row):
                trees.add(row, where)
            elif is_oasst_tree(row):
                trees.add_tree(row, where)
            else:
                turns = turns_of(row)
                yield repr(turns.folded()), turns  # the key it had when a system message was always folded
        except ValueError as e:
            problems.append(f"{where}: {e}")
    if trees.messages:
        conversations, bad = trees.conversations()
        problems += bad
        log.info(
            "%s: %d oasst1 messages -> %d conversations (%s%s)%s",
            path,
            len(trees.messages),
            len(conversations),
            "one per leaf" if options.oasst_paths == "leaves" else "best-ranked path",
            f", languages {', '.join(sorted(options.langs))}" if options.langs else "",
            "; left out: " + ", ".join(f"{n} {why}" for why, n in trees.dropped.items()) if trees.dropped else "",
        )
        yield from conversations


def pairs(path: Path, problems: list[str], tick: Tick, dropped: dict[str, int]) -> Iterator[tuple[str, Turns, Turns]]:
    """(split key, chosen, rejected) for every usable pair in one input file; bad rows are appended to `problems`,
    pairs that teach nothing are counted in `dropped` by reason (pairs.py)."""
    for where, row in _rows_or_problem(path, tick, problems):
        try:
            if isinstance(row, BadRow):
                raise ValueError(row.problem)
            yield pair_of(row)
        except Dropped as why:
            dropped[str(why)] = dropped.get(str(why), 0) + 1
        except ValueError as e:
            problems.append(f"{where}: {e}")
