"""A model's own chat template, and where the answers are in the tokens it renders.

A Hugging Face model directory carries its chat template in tokenizer_config.json (`chat_template`) or, as
newer transformers saves it, in chat_template.jinja beside it: ChatML for Qwen, Llama 3's header tokens, and so
on. SFT trains a model in the template it will be spoken to with (transformers' `apply_chat_template`, vLLM,
llama.cpp), so prepare renders every example with it, as transformers does (a sandboxed jinja2 with the same
settings), and the loss counts exactly each assistant turn's tokens and the end-of-turn token that closes it.

The masking rule, beside the built-in one (`<|assistant|>` answer `<|eot|>`, tokenizer.py): an answer starts
after the tokens the template adds for `add_generation_prompt` (ChatML: `<|im_start|>assistant\\n`) and ends
with the first special token the template writes after the assistant's content (ChatML: `<|im_end|>`; Llama 3:
`<|eot_id|>`), that token included. The cache records the two (`answer_start`, `answer_end`), so the rule is
applied to rows of any length without re-rendering, and prepare checks it on every example: every answer token
inside, no prompt token inside, one answer per turn; a template the rule cannot describe is refused.

Message contents never pass through the template as text a tokenizer could read as markup: they are rendered as
placeholders, and the text between placeholders (the template's own markup) is tokenized with special tokens
recognised, the contents as plain text, so a user who types `<|im_end|>` writes text, not the end of a turn.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from trainer_accel.data.formats.chat import Turns
from trainer_accel.data.tokenizer import EOT, encode_chat, encode_chat_prompt
from trainer_accel.errors import UserError
from trainer_accel.fsio import loads

PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no template writes them, trim and strip keep them
PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class ChatTemplate:
    text: str  # the jinja source
    source: str  # the file it came from
    bos_token: str | None  # the values the template may use, as tokenizer_config.json names them
    eos_token: str | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json names a token as a string or as an AddedToken object ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_chat_template(tokenizer_json: Path) -> ChatTemplate | None:
    """The chat template beside a tokenizer.json: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates of which "default" is taken); None when it has none."""
    folder = Path(tokenizer_json).parent
    config_file, jinja_file = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    config: dict = {}
    if config_file.is_file():
        try:
            config = loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{config_file}: not readable JSON ({e})") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_file}: expected a JSON object")
    text, source = config.get("chat_template"), str(config_file)
    if jinja_file.is_file():
        text, source = jinja_file.read_text(), str(jinja_file)
    if isinstance(text, list):
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default")
    if text is None:
        return None
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{source}: chat_template is not a template string")
    return ChatTemplate(text, source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))


@functools.lru_cache(maxsize=8)
def _compiled(template: ChatTemplate):
    """The template in transformers' own environment: sandboxed, trim_blocks and lstrip_blocks, loop controls,
    its tojson, raise_exception and strftime_now. Compiled once: prepare renders every example with it."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(template.text)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"{template.source}: the chat template does not compile ({e})") from None


def render(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool) -> str:
    import jinja2
    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=template.bos_token or "", eos_token=template.eos_token or "")
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"{template.source}: the chat template refused the conversation ({e})") from None


def roles_and_contents(turns: Turns | list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """A conversation as messages: its system message (if it has one), then user and assistant in turn."""
    system = getattr(turns, "system", "")
    roles = ["system"] * bool(system) + ["user", "assistant"] * len(turns)
    return roles, [system] * bool(system) + [text for pair in turns for text in pair]


def placeholder_messages(roles: list[str]) -> list[dict]:
    """Messages of these roles whose contents are the placeholders 0, 1, 2, ... in order."""
    return [{"role": role, "content": PLACEHOLDER.format(i)} for i, role in enumerate(roles)]


def generation_suffix(template: ChatTemplate) -> str:
    """What the template adds to open the assistant's turn (add_generation_prompt)."""
    messages = placeholder_messages(["user"])
    bare, opened = render(template, messages, False), render(template, messages, True)
    if not opened.startswith(bare) or opened == bare:
        raise UserError(f"{template.source}: add_generation_prompt does not append an assistant header to the "
                        "conversation, so the answers cannot be found in its tokens")
    return opened[len(bare):]


def split_rendered(text: str, count: int, where: str) -> list[str | int]:
    """The rendered text as markup strings and placeholder indices; each placeholder exactly once, in order."""
    pieces: list[str | int] = []
    for j, piece in enumerate(PLACEHOLDER_RE.split(text)):
        pieces.append(int(piece) if j % 2 else piece)
    found = [p for p in pieces if isinstance(p, int)]
    if found != list(range(count)):
        raise UserError(f"{where}: the chat template does not write each message's content once and in order "
                        f"(it wrote {found[:8]} of {count}), so the answers cannot be found in its tokens")
    return pieces


@dataclass(frozen=True)
class AnswerRule:
    """Where answers are in tokens: after each run of `start`, up to and including `end`."""

    start: tuple[int, ...]
    end: int

    def to_meta(self) -> dict[str, Any]:
        return {"answer_start": list(self.start), "answer_end": self.end}


def answer_positions(ids: np.ndarray, rule: AnswerRule) -> np.ndarray:
    """(..., n) token ids -> which tokens lie inside an answer by the rule: after the last token of a run of
    `rule.start`, up to and including `rule.end`. The one implementation of the rule (cache.answer_mask applies
    it to rows of targets)."""
    ids = np.asarray(ids)
    n, m = ids.shape[-1], len(rule.start)
    opened = np.zeros(ids.shape, dtype=bool)
    if n >= m:
        match = np.ones(ids.shape[:-1] + (n - m + 1,), dtype=bool)
        for k, t in enumerate(rule.start):
            match &= ids[..., k:n - m + 1 + k] == t
        opened[..., m - 1:] = match
    at = np.arange(n)

    def last_before(events: np.ndarray) -> np.ndarray:  # the latest event strictly before each token (-1: none)
        latest = np.maximum.accumulate(np.where(events, at, -1), axis=-1)
        return np.concatenate([np.full(latest.shape[:-1] + (1,), -1), latest[..., :-1]], axis=-1)

    return last_before(opened) > last_before(ids == rule.end)


class TemplateEncoder:
    """SFT examples and generation prompts in a model's own template, with its tokenizer.

    The rendered text is tokenized as `tokenizers` tokenizes it for transformers: split at the template's special
    tokens, each stretch between two of them tokenized whole (so whitespace the template writes before an answer
    merges with it as it does there), with one difference on purpose: a special token's text inside a message is
    text, never the token."""

    def __init__(self, tok, template: ChatTemplate):
        self.tok, self.template = tok, template
        specials = sorted((tok.decode([i]) for i in tok.special_ids), key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in specials if t) + ")") if specials else None
        self._special_id = {tok.decode([i]): i for i in tok.special_ids}
        # the rule, read off one rendered turn: the answer opens after the tokens of the generation prompt as they
        # stand before an answer, and closes with the first special token after it
        texts = ["Question", "Answer"]
        one_turn = render(template, placeholder_messages(["user", "assistant"]), False)
        pieces = split_rendered(one_turn, 2, template.source)
        ids, owner, spans = self._tokens(pieces, texts)
        suffix = generation_suffix(template)
        answer_at = sum(len(texts[x]) if isinstance(x, int) else len(x) for x in pieces[:pieces.index(1)])
        rendered = "".join(texts[x] if isinstance(x, int) else x for x in pieces)
        first = owner.index(1)
        header = [i for i in range(first) if spans[i][0] >= answer_at - len(suffix) and spans[i][1] <= answer_at]
        end = next((i for i in ids[first:] if i in tok.special_ids), None)
        if rendered[answer_at - len(suffix):answer_at] != suffix or not header or header[-1] != first - 1:
            raise UserError(f"{template.source}: an assistant turn in the conversation does not open with what "
                            f"add_generation_prompt writes ({suffix!r}), so the answers cannot be found in its tokens")
        if end is None:
            raise UserError(f"{template.source}: the chat template closes an assistant turn with no special token, so "
                            "where an answer ends cannot be told")
        self.rule = AnswerRule(tuple(ids[header[0]:first]), end)

    def _tokens(self, pieces: list[str | int],
                texts: list[str]) -> tuple[list[int], list[int | None], list[tuple[int, int]]]:
        """Token ids of a rendered conversation (markup strings and content indices into `texts`) and, per token,
        the content it holds (its index; None: the template's own), and each token's character span."""
        items: list[tuple[str, int | None]] = []  # (text, owner), with special tokens as ("", -id - 1)
        for piece in pieces:
            if isinstance(piece, int):
                items.append((texts[piece], piece))
                continue
            for j, part in enumerate(self._special_re.split(piece) if self._special_re else [piece]):
                if j % 2:
                    items.append(("", -self._special_id[part] - 1))
                elif part:
                    items.append((part, None))
        ids: list[int] = []
        owner: list[int | None] = []
        spans: list[tuple[int, int]] = []
        at = 0  # characters of the rendered text so far
        stretch: list[tuple[str, int | None]] = []

        def flush():
            nonlocal at
            if not stretch:
                return
            text = "".join(t for t, _ in stretch)
            who = np.full(len(text), -1)
            pos = 0
            for t, o in stretch:
                who[pos:pos + len(t)] = -1 if o is None else o
                pos += len(t)
            for tid, (a, b) in zip(*self.tok.encode_with_offsets(text)):
                inside = who[a:max(b, a + 1)]
                content = inside[inside >= 0]
                ids.append(tid)
                owner.append(int(content.max()) if len(content) else None)
                spans.append((at + a, at + b))
            at += len(text)
            stretch.clear()

        for text, o in items:
            if o is not None and o < 0:
                flush()
                ids.append(-o - 1)
                owner.append(None)
                width = len(self.tok.decode([-o - 1]))
                spans.append((at, at + width))
                at += width
            else:
                stretch.append((text, o))
        flush()
        return ids, owner, spans

    def encode_many(self, examples: list[Turns], where: str = "") -> list[np.ndarray]:
        """Each example's token ids; its answers checked against the rule (refused, naming the template, if the
        rule would count a prompt token or miss an answer token)."""
        out = []
        for turns in examples:
            roles, texts = roles_and_contents(turns)
            pieces = split_rendered(render(self.template, placeholder_messages(roles), False), len(roles),
                                    where or self.template.source)
            texts = self._as_rendered(roles, texts, pieces, False, where)
            ids, owner, _ = self._tokens(pieces, texts)
            arr = np.array(ids, dtype=np.int64)
            self._check(arr, owner, roles, where)
            out.append(arr)
        return out

    def _as_rendered(self, roles: list[str], texts: list[str], pieces: list[str | int], opened: bool,
                     where: str) -> list[str]:
        """The contents as the template writes them: as given, or stripped for a template that trims them (Llama
        3's `| trim`), so the tokens are what transformers' apply_chat_template gives; any other change to a
        content cannot be reproduced and is refused."""
        actual = render(self.template, [{"role": r, "content": t} for r, t in zip(roles, texts)], opened)
        for candidate in (texts, [t.strip() for t in texts]):
            if actual == "".join(candidate[p] if isinstance(p, int) else p for p in pieces):
                return candidate
        raise UserError(f"{self.template.source}: in {where or 'an example'} the chat template changes a message's "
                        "content in a way this trainer cannot reproduce token for token; use --chat-template builtin")

    def _check(self, ids: np.ndarray, owner: list[int | None], roles: list[str], where: str) -> None:
        inside = answer_positions(ids, self.rule)
        turns = roles.count("assistant")
        for i, o in enumerate(owner):
            if o is not None and inside[i] != (roles[o] == "assistant"):
                raise UserError(f"{self.template.source}: in {where or 'an example'} the answer rule (after "
                                f"{list(self.rule.start)}, up to {self.rule.end}) does not find exactly the assistant's "
                                "tokens; this template cannot be trained on (use --chat-template builtin)")
        closes = int((ids[inside] == self.rule.end).sum())
        if closes != turns:
            raise UserError(f"{self.template.source}: in {where or 'an example'} {closes} answer(s) end with token "
                            f"{self.rule.end}, {turns} were written")

    def prompt(self, history: list[tuple[str, str]], question: str, system: str = "") -> list[int]:
        """The conversation so far and a new question, the assistant's turn opened for the model to write."""
        roles, texts = roles_and_contents(Turns([*history, (question, "")], system))
        roles, texts = roles[:-1], texts[:-1]
        pieces = split_rendered(render(self.template, placeholder_messages(roles), True), len(roles),
                                self.template.source)
        try:
            texts = self._as_rendered(roles, texts, pieces, True, "the prompt")
        except UserError:
            pass  # a prompt is never checked against answers: the contents as given
        return self._tokens(pieces, texts)[0]


def chat_meta(encoder: TemplateEncoder) -> dict[str, Any]:
    """What an SFT cache (and every checkpoint trained on it) records of the template: enough to mask its rows,
    to prompt the model in it, and to export it with the model."""
    t = encoder.template
    return {"template": t.text, "template_source": t.source, "template_sha256": t.sha256, "bos_token": t.bos_token,
            "eos_token": t.eos_token, **encoder.rule.to_meta()}


def template_of(chat: dict[str, Any]) -> ChatTemplate:
    return ChatTemplate(chat["template"], chat["template_source"], chat.get("bos_token"), chat.get("eos_token"))


@dataclass
class ChatFormat:
    """How a model's conversations are written: the built-in template (encoder None) or the model's own. What
    samples, the chat command and an export need: the tokens of a question the model is to answer, and the
    token that ends its answer."""

    tok: Any
    encoder: TemplateEncoder | None = None

    def prompt(self, question: str, history: list[tuple[str, str]] = (), system: str = "") -> list[int]:
        """`system`: the conversation's system message; the built-in format has no system role and writes it at
        the start of the first user message, as SFT wrote it."""
        if self.encoder is not None:
            return self.encoder.prompt(list(history), question, system)
        folded = Turns([*history, (question, "")], system).folded()
        return encode_chat(self.tok, folded[:-1]) + encode_chat_prompt(self.tok, folded[-1][0])

    @property
    def stop_id(self) -> int:
        if self.encoder is not None:
            return self.encoder.rule.end
        return self.tok.special[EOT]


def chat_format(tok: Any, chat: dict[str, Any] | None) -> ChatFormat:
    """The chat format recorded with a cache or checkpoint (`chat`: chat_meta's record, or None for built-in)."""
    return ChatFormat(tok, TemplateEncoder(tok, template_of(chat)) if chat else None)
