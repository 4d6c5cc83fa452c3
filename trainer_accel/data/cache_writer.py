"""Writing caches as they are made, and publishing them all at once.

A `CacheWriter` appends tokens to a temporary file beside the cache it will become, hashing as it goes, so no
cache is ever held in memory. Nothing gets a final name until every cache of the run is complete: `publish_caches`
first writes a journal of the renames, then makes them, metas last. A prepare killed before the journal leaves
the old caches as they were and only temporary files, which the next prepare sweeps; one killed during the
renames leaves the journal, and the next prepare finishes them. Meanwhile a cache whose old meta is gone and new
one not yet in place reads as unfinished, never as another cache's data under a valid meta.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trainer_accel.data.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    dtype_for_vocab,
    index_path,
    meta_path,
)
from trainer_accel.data.tokenizer import Tokenizer
from trainer_accel.errors import UserError
from trainer_accel.faults import fault_point
from trainer_accel.fsio import held_alone, loads, write_atomic
from trainer_accel.paths import INDEXED

log = logging.getLogger(__name__)

TMP_MARK = ".prepare-tmp-"
JOURNAL = ".publish.json"
LOCK = ".prepare.lock"
SCAN_TOKENS = 1 << 18


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")


class CacheWriter:
    """One cache (stream or SFT), written as it is made."""

    def __init__(self, final: Path, kind: str, tok: Tokenizer):
        self.final, self.kind, self.tok = final, kind, tok
        self.dtype = dtype_for_vocab(tok.vocab_size)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(final)
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.num_tokens, self.max_id, self.items = 0, -1, 0  # items: documents or examples
        self.idx_tmp = temp_name(index_path(final)) if kind in INDEXED else None
        self.idx = open(self.idx_tmp, "wb") if self.idx_tmp else None
        self.meta_tmp = temp_name(meta_path(final))
        if self.idx:
            self.idx.write(np.zeros(1, np.uint64).tobytes())

    def append(self, tokens: np.ndarray, items: int = 0, ends: np.ndarray | None = None) -> None:
        """Tokens of whole documents or pieces; for SFT, `ends` are the example ends within `tokens`."""
        if len(tokens):
            data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
            self.file.write(data)
            self.sha.update(data)
            self.max_id = max(self.max_id, int(tokens.max()))
            fault_point("prepare_batch")
        if self.idx and ends is not None and len(ends):
            self.idx.write((np.asarray(ends, dtype=np.uint64) + np.uint64(self.num_tokens)).tobytes())
        self.num_tokens += len(tokens)
        self.items += items

    def move_tail_to(self, other: CacheWriter, keep: int) -> None:
        """Move all but the first `keep` tokens (streams) or examples (SFT) into `other`, empty so far: the split
        of a source whose items all fell on one side. The kept part is hashed again (one pass over the file)."""
        self.file.flush()
        keep_tokens, moved_ends = keep, None
        if self.idx:
            self.idx.flush()
            starts = np.fromfile(self.idx_tmp, dtype=np.uint64).astype(np.int64)
            keep_tokens = int(starts[keep])
            moved_ends = starts[keep + 1 :] - keep_tokens
            other.items, self.items = self.items - keep, keep
            self.idx.truncate((keep + 1) * 8)
            self.idx.seek(0, os.SEEK_END)
        else:
            other.items, self.items = 1, max(self.items, 1)  # a document cut in two: a piece on each side
        for i in range(keep_tokens, self.num_tokens, SCAN_TOKENS):
            other.append(self._read(i, min(SCAN_TOKENS, self.num_tokens - i)))
        if moved_ends is not None:
            other.idx.write(moved_ends.astype(np.uint64).tobytes())
        self.file.truncate(keep_tokens * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)
        self.num_tokens, self.sha, self.max_id = keep_tokens, hashlib.sha256(), -1
        for i in range(0, keep_tokens, SCAN_TOKENS):
            chunk = self._read(i, min(SCAN_TOKENS, keep_tokens - i))
            self.sha.update(chunk.tobytes())
            self.max_id = max(self.max_id, int(chunk.max()))

    def _read(self, start: int, count: int) -> np.ndarray:
        """Tokens read into memory, not mapped: a map's pages would stay in this process's resident set."""
        return np.fromfile(self.tmp, dtype=self.dtype, count=count, offset=start * self.dtype.itemsize)

    def finish(self, meta_extra: dict) -> list[tuple[Path, Path]]:
        """Close, fsync and write the meta beside; returns the (temporary, final) renames that publish it."""
        moves = []
        for handle in filter(None, (self.file, self.idx)):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        meta = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "kind": self.kind,
            "dtype": self.dtype.name,
            "num_tokens": self.num_tokens,
            "vocab_size": int(self.tok.vocab_size),
            "max_token_id": self.max_id,
            "tokenizer": self.tok.identity,
            "tokenizer_path": getattr(self.tok, "path", None),
            "special_tokens": dict(self.tok.special),
            "added_tokens": list(self.tok.added),
            **({"bos_ids": list(self.tok.bos_ids)} if self.tok.bos_ids else {}),
            "sha256": self.sha.hexdigest(),
            **meta_extra,
        }
        if self.idx_tmp:
            meta["num_examples"] = self.items
            meta["index"] = {"file": index_path(self.final).name, "dtype": "uint64", "sha256": _sha_file(self.idx_tmp)}
            moves.append((self.idx_tmp, index_path(self.final)))
        moves.append((self.tmp, self.final))
        write_atomic(self.meta_tmp, (json.dumps(meta, indent=2) + "\n").encode())
        moves.append((self.meta_tmp, meta_path(self.final)))
        self.meta = meta
        return moves

    def discard(self) -> None:
        for handle, path in ((self.file, self.tmp), (self.idx, self.idx_tmp), (None, self.meta_tmp)):
            if handle:
                handle.close()
            if path:
                path.unlink(missing_ok=True)


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def publish_caches(cache_dir: Path, moves: list[tuple[Path, Path]]) -> None:
    """Give every finished cache its final name (see the module note)."""
    journal = cache_dir / JOURNAL
    write_atomic(journal, json.dumps([[str(a), str(b)] for a, b in moves]).encode())
    _finish_publish(journal)


def _finish_publish(journal: Path) -> None:
    moves = [(Path(a), Path(b)) for a, b in loads(journal.read_text())]
    metas = [(a, b) for a, b in moves if b.name.endswith(".meta.json")]
    for tmp, final in metas:
        if tmp.exists():
            final.unlink(missing_ok=True)  # the cache reads as unfinished until its new meta is in
    for tmp, final in [m for m in moves if m not in metas] + metas:
        if tmp.exists():
            fault_point("publish_rename")
            os.replace(tmp, final)
    for directory in {b.parent for _, b in moves}:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    journal.unlink()


def recover(cache_dir: Path) -> None:
    """Finish the renames of a prepare killed while publishing; sweep the temporary files of one killed before."""
    journal = cache_dir / JOURNAL
    if journal.is_file():
        try:
            _finish_publish(journal)
            log.warning("%s: a prepare was stopped while publishing its caches; finished publishing them", cache_dir)
        except (OSError, ValueError) as e:
            raise UserError(
                f"{journal}: cannot finish the publishing a stopped prepare began ({e}); delete it and prepare again"
            ) from None
    swept = [p for p in cache_dir.rglob(f".*{TMP_MARK}*") if p.is_file()]
    for p in swept:
        p.unlink()
    if swept:
        log.info("%s: removed %d temporary files a stopped prepare left", cache_dir, len(swept))


@contextlib.contextmanager
def prepare_lock(cache_dir: Path) -> Iterator[None]:
    """One prepare at a time per cache folder: a second would sweep the first one's temporary files."""
    with held_alone(
        cache_dir / LOCK,
        f"{cache_dir}: another prepare is writing caches here; wait for it or use another TRAINER_DATA_DIR",
    ):
        yield
