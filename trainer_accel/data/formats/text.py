"""Text files as documents, kept byte for byte, read a block at a time.

What a document is, is the user's choice (`DocumentRule`): the whole file (the default: nothing in the text is
guessed to be a boundary), the paragraphs between blank lines, or the pieces between a separator the user names.
Only the boundaries are dropped; every other character, newlines and blank lines included, reaches the cache.

A document longer than `PIECE_CHARS` is handed on in pieces, so memory never holds a whole large file. A piece
is cut after a lone newline that a letter or digit follows where one is near: byte-level BPE pre-tokenizers
(GPT-2's, tiktoken's) split there anyway, so the tokens come out as if the document had been encoded in one go.
A piece with no such place in its last quarter (a megabyte with no spaces) is cut where it is.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer_accel.errors import UserError

PIECE_CHARS = 1 << 16  # pieces at most this long (a cut point is looked for in the last quarter)
KEY_CHARS = 1 << 14  # a document's train/val side is a hash of this much of its start; pieces never start shorter
BLOCK_BYTES = 1 << 20
BLANK_LINES = re.compile(r"\r?\n\s*\n")  # a Windows line end's \r belongs to the break, not to the paragraph
NON_SPACE = re.compile(r"\S")
AFTER_NEWLINE = re.compile(r"(?<=\S)\n(?=[^\W_])")  # "x\nword": pre-tokenizers split after the newline
BEFORE_SPACE = re.compile(r"(?<=\S) (?=[^\W_])")  # "x word": and before " word"
ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


@dataclass(frozen=True)
class Piece:
    """Part of a document: `start` on its first piece, `end` on its last (one piece may be both)."""

    text: str
    start: bool
    end: bool


@dataclass(frozen=True)
class DocumentRule:
    kind: str  # "file" | "blank-lines" | "separator"
    separator: str = ""

    def describe(self) -> str:
        return f"separator {self.separator!r}" if self.kind == "separator" else self.kind


def parse_document_rule(value: str) -> DocumentRule:
    """--documents: `file`, `blank-lines` or `separator=TEXT` (TEXT may spell \\n, \\t, \\r and \\\\)."""
    if value in ("file", "blank-lines"):
        return DocumentRule(value)
    if value.startswith("separator="):
        sep = re.sub(r"\\[ntr\\]", lambda m: ESCAPES[m.group()], value[len("separator=") :])
        if sep:
            return DocumentRule("separator", sep)
    raise UserError(f"--documents {value}: expected file, blank-lines or separator=TEXT (e.g. separator='\\n\\n\\n')")


def _separator_finder(rule: DocumentRule) -> Callable[[str, int, bool], tuple[int, int] | None]:
    """(buffer, from, final) -> the first separator in buffer[from:] known to be complete, or None."""
    if rule.kind == "file":
        return lambda buf, pos, final: None
    if rule.kind == "separator":
        sep = rule.separator

        def literal(buf: str, pos: int, final: bool) -> tuple[int, int] | None:
            i = buf.find(sep, pos)
            return None if i < 0 else (i, i + len(sep))

        return literal

    def blank(buf: str, pos: int, final: bool) -> tuple[int, int] | None:
        m = BLANK_LINES.search(buf, pos)
        if m is None or not (final or NON_SPACE.search(buf, m.end())):
            return None  # more blank lines may follow in the next block
        return m.start(), m.end()

    return blank


def safe_cut(buf: str, limit: int) -> int:
    """Where to end a piece of at most `limit` characters: after a lone newline between a non-space and a word
    character, else before a lone space there, else at `limit` (see the module note)."""
    lo = limit - limit // 4
    for pattern, after in ((AFTER_NEWLINE, True), (BEFORE_SPACE, False)):
        last = None
        for last in pattern.finditer(buf, lo, limit + 1):
            pass
        if last is not None:
            return last.end() if after else last.start()
    return limit


def split_documents(blocks: Iterator[str], rule: DocumentRule) -> Iterator[Piece]:
    """Blocks of one text, in order -> the pieces of its documents. Empty documents are skipped, and under
    blank-lines so are whitespace-only ones (blank lines at the top of a file)."""
    piece_chars = PIECE_CHARS
    find = _separator_finder(rule)
    skip_blank = rule.kind == "blank-lines"
    buf, started = "", False

    def keep(text: str) -> bool:
        return bool(text.strip()) if skip_blank else bool(text)

    for block in _with_end(blocks):
        final = block is None
        if not final:
            buf += block
        pos = 0
        while (sep := find(buf, pos, final)) is not None:
            text = buf[pos : sep[0]]
            if started or keep(text):
                yield Piece(text, start=not started, end=True)
            started, pos = False, sep[1]
        if pos:
            buf = buf[pos:]
        if final:
            if started or keep(buf):
                yield Piece(buf, start=not started, end=True)
            return
        # A long document: hand on its head, keeping enough back for a separator that may be starting.
        while len(buf) > piece_chars + len(rule.separator) + KEY_CHARS:
            cut = safe_cut(buf, piece_chars)
            yield Piece(buf[:cut], start=not started, end=False)
            started, buf = True, buf[cut:]


def _with_end(blocks: Iterator[str]) -> Iterator[str | None]:
    yield from blocks
    yield None


def text_blocks(path: Path, tick: Callable[[int], None] = lambda n: None) -> Iterator[str]:
    """A UTF-8 file as text blocks (a byte-order mark is not content); not UTF-8 is an error naming the byte."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(BLOCK_BYTES)
            held = len(decoder.getstate()[0])  # the start of a character cut by the last block, counted in offset
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text (byte {offset - held + e.start})") from None
            offset += len(raw)
            tick(len(raw))
            if text:
                yield text
            if not raw:
                return
