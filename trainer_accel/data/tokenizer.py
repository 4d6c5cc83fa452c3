"""Tokenizers and the chat template.

The built-in byte-level tokenizer needs no download: ids 0-255 are bytes, the special tokens follow. A local
Hugging Face `tokenizer.json` can be used instead (needs the `tokenizers` package); missing special tokens are
added to it. Text is always encoded as plain text: a literal "<|user|>" typed in a document stays text and can
never forge a special token.

The SFT template lives here, next to the special tokens it uses:
    <|user|> prompt <|assistant|> answer <|eot|>   (repeated per turn for conversations)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from trainer_accel.errors import UserError

DOC = "<|endoftext|>"  # separates documents in pretrain streams; pads SFT rows
USER = "<|user|>"
ASST = "<|assistant|>"
EOT = "<|eot|>"
SPECIAL_TOKENS = (DOC, USER, ASST, EOT)


class Tokenizer(Protocol):
    identity: str  # names the tokenizer exactly; caches made with different identities never mix
    vocab_size: int
    special: dict[str, int]  # each of SPECIAL_TOKENS -> id

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts in one call: the library's own batch API, which spreads them over the cores."""
        ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class ByteTokenizer:
    identity: str = "byte-v1"
    special: dict[str, int] = field(default_factory=lambda: {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)})

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: list[int]) -> str:
        names = {v: k for k, v in self.special.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(names.get(i, f"<|{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a local tokenizer.json."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise UserError(f"{path}: reading a tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from None
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for bad files
            raise UserError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from None
        missing = [t for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens(missing)
        self.special = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self._tok.encode_special_tokens = True  # text that spells a special token stays text
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.identity = file_identity(path)
        self.path = str(Path(path).resolve())  # recorded in cache metas, so samples can be decoded later

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast skips offsets (>= 0.20)
        return [np.array(e.ids, dtype=np.uint32) for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def encode_markup(self, text: str) -> list[int]:
        """A chat template's own text (`<|im_start|>assistant\n`): its special tokens read as such, which text
        from a document or a message never is (chat_template.py keeps the two apart)."""
        self._tok.encode_special_tokens = False
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = True

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's character span in `text` (text only: special tokens' text stays text)."""
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    @property
    def special_ids(self) -> frozenset[int]:
        """Every special token's id: the model's own (<|im_end|>, <|eot_id|>, ...) and ours."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def hf_json(self) -> str:
        """This tokenizer as a tokenizer.json, with the special tokens added here (the library does not write the
        setting that keeps typed special tokens as text: that is the reader's choice, see hf/tokenizer.py)."""
        return self._tok.to_str(pretty=True)


def file_identity(path: Path) -> str:
    """A tokenizer.json's identity: its bytes' sha256, so an edited file is another tokenizer."""
    return f"hf-{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found (expected a Hugging Face tokenizer.json)")
    return HFTokenizer(path)


def tokenizer_from_meta(meta: dict) -> Tokenizer | None:
    """The tokenizer a cache was made with, when it can still be had (for decoding samples); else None."""
    if meta.get("tokenizer") == ByteTokenizer.identity:
        return ByteTokenizer()
    path = meta.get("tokenizer_path")
    if path and Path(path).is_file():
        try:
            tok = HFTokenizer(Path(path))
        except UserError:
            return None
        return tok if tok.identity == meta.get("tokenizer") else None
    return None


def encode_chat(tok: Tokenizer, turns: list[tuple[str, str]]) -> list[int]:
    """[(prompt, answer), ...] -> <|user|> prompt <|assistant|> answer <|eot|> ..."""
    s = tok.special
    ids: list[int] = []
    for prompt, answer in turns:
        ids += [s[USER], *tok.encode(prompt), s[ASST], *tok.encode(answer), s[EOT]]
    return ids


def encode_chat_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """The start of a chat turn, left open for the model to answer."""
    return [tok.special[USER], *tok.encode(prompt), tok.special[ASST]]
