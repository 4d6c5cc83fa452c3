"""Rows of the files datasets come in: JSONL (optionally gzipped), Parquet, and a Hugging Face dataset saved with
`save_to_disk`. Each row comes with where it is (`file:line`, `file row N`, `dir[split] row N`), so a row that
does not fit is named exactly.

Parquet and saved datasets need the optional extra (`pip install 'trainer_accel[formats]'`): pyarrow reads Parquet
a record batch at a time, and `datasets` opens a saved dataset memory-mapped, so neither holds a whole file.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer_accel.errors import UserError, first_line
from trainer_accel.fsio import loads

BATCH_ROWS = 1024
EXTRA_HINT = "pip install 'trainer_accel[formats]'"
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON may spell half of a UTF-16 pair, which is not text


@dataclass(frozen=True)
class BadRow:
    """A row that could not even be parsed; the reader goes on, the caller reports it."""

    problem: str


Tick = Callable[[int], None]


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def jsonl_rows(path: Path, tick: Tick) -> Iterator[tuple[str, Any]]:
    if not path.name.endswith(".gz"):
        with open(path, "rb") as fh:
            yield from _parsed_lines(path, fh, tick)
        return
    try:  # gzip reports damage only while reading: not gzip at all, cut short, or a bad CRC
        with gzip.open(path, "rb") as fh:
            yield from _parsed_lines(path, fh, tick)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a readable gzip file ({first_line(e)})") from None


def _parsed_lines(path: Path, fh, tick: Tick) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(fh, 1):
        tick(len(line))
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a byte-order mark, as some editors write, is not content
        if not line.strip():
            continue
        try:
            row = loads(line, unique_keys=False)
            if SURROGATE_ESCAPE.search(line):
                json.dumps(row, ensure_ascii=False).encode("utf-8")  # a lone half of a pair cannot be encoded
            yield f"{path}:{n}", row
        except UnicodeEncodeError:
            yield f"{path}:{n}", BadRow("holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text")
        except json.JSONDecodeError as e:
            yield f"{path}:{n}", BadRow(f"not valid JSON ({e.msg})")
        except UnicodeDecodeError as e:
            yield f"{path}:{n}", BadRow(f"not UTF-8 text (byte {e.start} of the line)")


def _need(module: str, path: Path, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise UserError(f"{path}: reading {what} needs the '{module.split('.')[0]}' package ({EXTRA_HINT})") from None


def parquet_rows(path: Path, tick: Tick, columns: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    pq = _need("pyarrow.parquet", path, "Parquet")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses for damaged files
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    if columns:
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise UserError(
                f"{path}: no column {', '.join(repr(c) for c in missing)} "
                f"(columns: {', '.join(pf.schema_arrow.names)}; choose one with --text-field)"
            )
    size, rows_total, done = path.stat().st_size, max(1, pf.metadata.num_rows), 0
    n = 0
    batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    while True:
        try:  # only the footer was checked on opening; a damaged data page shows up here
            batch = next(batches, None)
        except Exception as e:
            raise UserError(f"{path}: damaged Parquet data after row {n} ({first_line(e)})") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            yield f"{path} row {n}", row
            n += 1
        new = size * n // rows_total
        tick(new - done)
        done = new


def saved_dataset_rows(path: Path, tick: Tick, columns: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    datasets = _need("datasets", path, "a saved Hugging Face dataset")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError or its own errors for what it cannot read
        raise UserError(f"{path}: not a readable Hugging Face dataset saved with save_to_disk ({e})") from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, ds in splits:
        where = f"{path}[{split}]" if split else str(path)
        if columns:
            missing = [c for c in columns if c not in ds.column_names]
            if missing:
                raise UserError(
                    f"{where}: no column {', '.join(repr(c) for c in missing)} "
                    f"(columns: {', '.join(ds.column_names)}; choose one with --text-field)"
                )
            ds = ds.select_columns(columns)
        n = 0
        for batch in ds.iter(batch_size=BATCH_ROWS):
            keys = list(batch)
            for values in zip(*batch.values()):
                row = dict(zip(keys, values))
                yield f"{where} row {n}", row
                n += 1
                tick(sum(len(v) for v in values if isinstance(v, str)))


def rows(path: Path, tick: Tick, columns: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of one row-format input; `columns` narrows what Parquet and datasets read."""
    if is_saved_dataset(path):
        return saved_dataset_rows(path, tick, columns)
    if path.name.endswith(".parquet"):
        return parquet_rows(path, tick, columns)
    return jsonl_rows(path, tick)
