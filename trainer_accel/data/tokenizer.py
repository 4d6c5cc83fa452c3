"""Tokenizers and the chat template.

The built-in byte-level tokenizer needs no download: ids 0-255 are bytes, the special tokens follow. A local
Hugging Face `tokenizer.json` can be used instead (needs the `tokenizers` package), with the model's own tokens:
its end-of-text token ends documents and its BOS starts them; a token is added only where the model has none of
its own (HFTokenizer). Text is always encoded as plain text: a literal "<|user|>" typed in a document stays text
and can never forge a special token.

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
    special: dict[str, int]  # role -> id: <|endoftext|> the document end (the model's own end-of-text token), and
    # <|user|>, <|assistant|>, <|eot|> where the built-in chat format is used
    added: tuple[str, ...]  # tokens added to the tokenizer's own (recorded, so the same tokenizer can be rebuilt)
    bos_ids: tuple[int, ...]  # what starts a document or a plain prompt (Llama 3's <|begin_of_text|>), often nothing

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]:
        """A plain prompt as the model's own tokenizer encodes one (its BOS first)."""
        ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts in one call: the library's own batch API, which spreads them over the cores."""
        ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class ByteTokenizer:
    identity: str = "byte-v1"
    added: tuple[str, ...] = ()  # its four special tokens are its own
    bos_ids: tuple[int, ...] = ()
    special: dict[str, int] = field(default_factory=lambda: {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)})

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

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


# A model's own end-of-text token, by the names the families give it (GPT-2, Qwen and SmolLM; Llama 3; Mistral and
# Llama 2; Gemma; DeepSeek): documents end with it, rows are padded with it, and nothing is added for it.
DOC_END_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<\uff5cend\u2581of\u2581sentence\uff5c>")
CHAT_TOKENS = (USER, ASST, EOT)  # what the built-in chat format needs beside a document end


def tokenizer_file(path: Path) -> Path:
    """The tokenizer.json a --tokenizer names: the file itself, or the one in a model directory."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise UserError(
                f"{path}: a directory without a tokenizer.json (a Hugging Face model directory holds one; "
                "a tokenizer.model alone is not read)"
            )
        return path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: tokenizer not found (expected a Hugging Face model directory or its tokenizer.json)")
    return path


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a local tokenizer.json, with the model's own tokens.

    Documents end with the model's own end-of-text token (DOC_END_NAMES); only a tokenizer that has none gets
    <|endoftext|> added. The built-in chat format's <|user|>, <|assistant|> and <|eot|> are added only when it is
    used (`chat_tokens`): a model trained in its own template learns no token it never writes. `added` rebuilds
    the tokenizer a cache recorded (its meta's added_tokens), token for token; added tokens take the next ids, so
    every id the file gives is the same with or without them."""

    def __init__(self, path: Path, chat_tokens: bool = False, added: tuple[str, ...] | list[str] | None = None):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise UserError(
                f"{path}: reading a tokenizer.json needs the 'tokenizers' package (pip install tokenizers)"
            ) from None
        path = tokenizer_file(path)
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for bad files
            raise UserError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from None
        if added is None:
            added = ([] if self._doc_end() else [DOC]) + (list(CHAT_TOKENS) if chat_tokens else [])
        missing = [t for t in added if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens(missing)
        self.added = tuple(missing)
        doc = self._doc_end() or DOC
        self.special = {
            DOC: self._tok.token_to_id(doc),
            **{t: self._tok.token_to_id(t) for t in CHAT_TOKENS if self._tok.token_to_id(t) is not None},
        }
        self.doc_end_token = doc
        self.bos_ids = self._bos_ids()
        self._tok.encode_special_tokens = True  # text that spells a special token stays text
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.identity = file_identity(path)
        self.path = str(Path(path).resolve())  # recorded in cache metas, so samples can be decoded later

    def _doc_end(self) -> str | None:
        return next((t for t in DOC_END_NAMES if self._tok.token_to_id(t) is not None), None)

    def _bos_ids(self) -> tuple[int, ...]:
        """What the tokenizer's post-processor puts before a text (Llama 3: <|begin_of_text|>; Qwen, GPT-2: nothing),
        as transformers' `tokenizer(text)` adds it."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        return tuple(full[:at])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A plain prompt as transformers' `tokenizer(text)` encodes it: the model's BOS first where it has one."""
        return [*self.bos_ids, *self.encode(text)]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast skips offsets (>= 0.20)
        return [np.array(e.ids, dtype=np.uint32) for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        """The id of a token by its text (a special token's included), or None."""
        return self._tok.token_to_id(text)

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


def load_tokenizer(path: str | Path | None, chat_tokens: bool = True) -> Tokenizer:
    """The built-in byte tokenizer (None), or a tokenizer.json (or the model directory holding one); `chat_tokens`:
    the built-in chat format will be used, so its tokens are added where missing."""
    if path is None:
        return ByteTokenizer()
    return HFTokenizer(Path(path), chat_tokens=chat_tokens)


LEGACY_ADDED = SPECIAL_TOKENS  # caches written before added_tokens was recorded had all four added where missing


def tokenizer_from_meta(meta: dict) -> Tokenizer | None:
    """The tokenizer a cache was made with, when it can still be had (for decoding samples); else None."""
    if meta.get("tokenizer") == ByteTokenizer.identity:
        return ByteTokenizer()
    path = meta.get("tokenizer_path")
    if path and Path(path).is_file():
        try:
            tok = HFTokenizer(Path(path), added=meta.get("added_tokens", LEGACY_ADDED))
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
