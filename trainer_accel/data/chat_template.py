"""A model's own chat template, and where the answers are in the tokens it renders.

A Hugging Face model directory carries its chat template in tokenizer_config.json (`chat_template`) or, as
newer transformers saves it, in chat_template.jinja beside it: ChatML for Qwen, Llama 3's header tokens, and so
on. SFT trains a model in the template it will be spoken to with (transformers' `apply_chat_template`, vLLM,
llama.cpp), so prepare renders every example with it, as transformers does (a sandboxed jinja2 with the same
settings, the template arguments the user gives such as `enable_thinking`), and the loss counts exactly what the
model must write after the generation header: each assistant turn's tokens and the end-of-turn token that closes
it, with whatever the template writes between the header and the content (Qwen3's empty think block after the
last question) included.

The masking rule, beside the built-in one (`<|assistant|>` answer `<|eot|>`, tokenizer.py): an answer starts
after the header every assistant turn opens with, the longest start of what `add_generation_prompt` writes that
each turn has (ChatML: `<|im_start|>assistant\n`; Qwen3.5's generation prompt adds `<think>\n`, which only the
last turn has), and ends with the first special token the template writes after the assistant's content
(ChatML: `<|im_end|>`; Llama 3: `<|eot_id|>`), that token included. The cache records the two (`answer_start`,
`answer_end`), so the rule is applied to rows of any length without re-rendering, and prepare checks it on every
example: every answer token inside, no prompt token inside, one answer per turn, and for a template with
`{% generation %}` blocks exactly the tokens those blocks mark (transformers' assistant mask); a template the
rule cannot describe is refused, naming the way out. The rule is found only when answers are looked for: a plain
completion or a chat prompt never needs it.

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
GEN_OPEN, GEN_CLOSE = "\ue002", "\ue003"  # where a {% generation %} block opens and closes in a rendering
RENDER_NAMES = ("messages", "add_generation_prompt", "bos_token", "eos_token")  # what render() itself passes
WAY_OUT = "train in the built-in format (--chat-template builtin) or give a template of your own (--chat-template PATH)"


@dataclass(frozen=True)
class ChatTemplate:
    text: str  # the jinja source
    source: str  # the file it came from
    bos_token: str | None  # the values the template may use, as tokenizer_config.json names them
    eos_token: str | None
    args: tuple[tuple[str, str], ...] = ()  # template arguments (enable_thinking=false): (name, JSON value), sorted

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def kwargs(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.args}

    @property
    def has_generation_blocks(self) -> bool:
        return bool(re.search(r"{%-?\s*generation\s*-?%}", self.text))


def template_args(pairs: list[str] | dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """--template-arg NAME=VALUE (VALUE as JSON where it parses: false, 3, "x"; else the text) -> ChatTemplate.args."""
    if isinstance(pairs, dict):
        return tuple(sorted((k, json.dumps(v)) for k, v in pairs.items()))
    out = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier() or name in RENDER_NAMES:
            raise UserError(
                f"--template-arg {pair}: expected NAME=VALUE with NAME a template variable, e.g. "
                "--template-arg enable_thinking=false"
            )
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out[name] = parsed
    return tuple(sorted((k, json.dumps(v)) for k, v in out.items()))


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json names a token as a string or as an AddedToken object ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_config(config_file: Path) -> dict:
    """A tokenizer_config.json (or any JSON object file) beside a tokenizer; {} when there is none."""
    if not config_file.is_file():
        return {}
    try:
        config = loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{config_file}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: expected a JSON object")
    return config


def _template_text(config: dict, config_file: Path, jinja_file: Path) -> tuple[Any, str]:
    text, source = config.get("chat_template"), str(config_file)
    if jinja_file.is_file():
        try:
            text, source = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{jinja_file}: cannot be read as UTF-8 text ({e})") from None
    if isinstance(text, list):
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default")
    return text, source


def find_chat_template(
    tokenizer_json: Path, choice: str | Path = "model", args: tuple[tuple[str, str], ...] = ()
) -> ChatTemplate | None:
    """The chat template beside a tokenizer.json (choice "model"): chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates of which "default" is taken); None when it has none.
    Any other choice is a user's template file: a .jinja file, or a tokenizer_config.json or model directory that
    holds one. Its bos and eos tokens are the tokenizer's (its tokenizer_config.json)."""
    folder = Path(tokenizer_json).parent
    config = read_config(folder / "tokenizer_config.json")
    if str(choice) == "model":
        text, source = _template_text(config, folder / "tokenizer_config.json", folder / "chat_template.jinja")
    else:
        given = Path(choice)
        if given.is_dir():
            text, source = _template_text(
                read_config(given / "tokenizer_config.json"),
                given / "tokenizer_config.json",
                given / "chat_template.jinja",
            )
        elif given.suffix == ".json":
            text, source = _template_text(read_config(given), given, given.with_name("-none-"))
        else:
            try:
                text, source = given.read_text(encoding="utf-8"), str(given)
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"--chat-template {given}: cannot be read as a template file ({e})") from None
        if text is None:
            raise UserError(
                f"--chat-template {given}: holds no chat template (a .jinja file, or a "
                "tokenizer_config.json or model directory with one)"
            )
    if text is None:
        return None
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{source}: chat_template is not a template string")
    return ChatTemplate(text, source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")), args)


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

    from jinja2.ext import Extension

    class GenerationBlocks(Extension):
        """transformers' `{% generation %}` ... `{% endgeneration %}`: what the model generates, marked."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return GEN_OPEN + caller() + GEN_CLOSE

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", GenerationBlocks]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(template.text)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"{template.source}: the chat template does not compile ({e})") from None


MAX_RENDERED = 1 << 22  # characters: a template that writes more than this for one conversation is broken


def render(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool, marks: bool = False) -> str:
    """The conversation as the template writes it (with its arguments); `marks`: keep the generation-block marks.
    Any failure of the template (raise_exception, a division by zero, a range over the sandbox's limit, deep
    recursion) is the template's, said in one line."""
    import jinja2

    try:
        text = _compiled(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=template.bos_token or "",
            eos_token=template.eos_token or "",
            **template.kwargs,
        )
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"{template.source}: the chat template refused the conversation ({e})") from None
    except RecursionError:
        raise UserError(f"{template.source}: the chat template recursed without end") from None
    except Exception as e:  # a template is the user's code: ZeroDivisionError, OverflowError (range), TypeError...
        raise UserError(f"{template.source}: the chat template failed ({type(e).__name__}: {e})") from None
    if len(text) > MAX_RENDERED:
        raise UserError(
            f"{template.source}: the chat template wrote {len(text):,} characters for one conversation "
            f"(more than {MAX_RENDERED:,})"
        )
    return text if marks else text.replace(GEN_OPEN, "").replace(GEN_CLOSE, "")


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
        raise UserError(
            f"{template.source}: add_generation_prompt does not append an assistant header to the "
            f"conversation, so the answers cannot be found in its tokens; {WAY_OUT}"
        )
    return opened[len(bare) :]


def generation_spans(pieces: list[str | int], texts: list[str]) -> tuple[list[str | int], list[tuple[int, int]]]:
    """The pieces without the generation-block marks, and each block's character span in the rendered text (the
    contents as `texts`)."""
    out: list[str | int] = []
    spans: list[tuple[int, int]] = []
    at, opened = 0, None
    for piece in pieces:
        if isinstance(piece, int):
            out.append(piece)
            at += len(texts[piece])
            continue
        kept = []
        for ch in piece:
            if ch == GEN_OPEN:
                opened = at
            elif ch == GEN_CLOSE and opened is not None:
                spans.append((opened, at))
                opened = None
            else:
                kept.append(ch)
                at += 1
        out.append("".join(kept))
    return out, spans


def split_rendered(text: str, count: int, where: str) -> list[str | int]:
    """The rendered text as markup strings and placeholder indices; each placeholder exactly once, in order."""
    pieces: list[str | int] = []
    for j, piece in enumerate(PLACEHOLDER_RE.split(text)):
        pieces.append(int(piece) if j % 2 else piece)
    found = [p for p in pieces if isinstance(p, int)]
    if found != list(range(count)):
        raise UserError(
            f"{where}: the chat template does not write each message's content once and in order "
            f"(it wrote {found[:8]} of {count}), so the answers cannot be found in its tokens"
        )
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
            match &= ids[..., k : n - m + 1 + k] == t
        opened[..., m - 1 :] = match
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
        _compiled(template)  # a template that does not compile is said at once

    @functools.cached_property
    def rule(self) -> AnswerRule:
        """Where answers are: after the header every assistant turn opens with (the longest start of the text the
        generation prompt writes that each turn has before its content, as the tokens that lie wholly inside it
        there), up to the first special token written after the content. Read off a two-exchange conversation, so
        a template that writes the last answer otherwise (Qwen3's think block) is seen as it writes both."""
        src, texts = self.template.source, ["Question", "Answer", "Question two", "Answer two"]
        suffix = generation_suffix(self.template)
        roles = ["user", "assistant", "user", "assistant"]
        pieces = split_rendered(render(self.template, placeholder_messages(roles), False), 4, src)
        ids, owner, spans = self._tokens(pieces, texts)
        rendered = "".join(texts[x] if isinstance(x, int) else x for x in pieces)
        at, where = 0, {}  # content index -> its character span in the rendered text
        for piece in pieces:
            width = len(texts[piece]) if isinstance(piece, int) else len(piece)
            if isinstance(piece, int):
                where[piece] = (at, at + width)
            at += width
        markup = {k: (where[k - 1][1], where[k][0]) for k in (1, 3)}  # between the question and its answer
        n = max(
            (m for m in range(1, len(suffix) + 1) if all(suffix[:m] in rendered[a:b] for a, b in markup.values())),
            default=0,
        )
        headers = []
        for a, b in markup.values():
            first = rendered.rfind(suffix[:n], a, b) if n else -1
            headers.append([t for t, (x, y) in zip(ids, spans) if first >= 0 and first <= x and y <= first + n])
        if not headers[0] or headers[0] != headers[1]:
            raise UserError(
                f"{src}: an assistant turn in the conversation does not open with what "
                f"add_generation_prompt writes ({suffix!r}), so the answers cannot be found in its "
                f"tokens; {WAY_OUT}"
            )
        end = next((i for i in ids[owner.index(1) :] if i in self.tok.special_ids), None) if 1 in owner else None
        if end is None:
            raise UserError(
                f"{src}: the chat template closes an assistant turn with no special token, so where an "
                f"answer ends cannot be told; {WAY_OUT}"
            )
        return AnswerRule(tuple(headers[0]), end)

    def _tokens(
        self, pieces: list[str | int], texts: list[str]
    ) -> tuple[list[int], list[int | None], list[tuple[int, int]]]:
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
                who[pos : pos + len(t)] = -1 if o is None else o
                pos += len(t)
            for tid, (a, b) in zip(*self.tok.encode_with_offsets(text)):
                inside = who[a : max(b, a + 1)]
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
        rule would count a prompt token or miss an answer token, or differ from the template's generation blocks)."""
        out = []
        for turns in examples:
            roles, texts = roles_and_contents(turns)
            marked = split_rendered(
                render(self.template, placeholder_messages(roles), False, marks=True),
                len(roles),
                where or self.template.source,
            )
            pieces, _ = generation_spans(marked, texts)
            texts = self._as_rendered(roles, texts, pieces, False, where)
            _, blocks = generation_spans(marked, texts)
            ids, owner, spans = self._tokens(pieces, texts)
            arr = np.array(ids, dtype=np.int64)
            self._check(arr, owner, roles, where)
            if self.template.has_generation_blocks:
                self._check_blocks(arr, spans, blocks, where)
            out.append(arr)
        return out

    def _as_rendered(
        self, roles: list[str], texts: list[str], pieces: list[str | int], opened: bool, where: str
    ) -> list[str]:
        """The contents as the template writes them: as given, or trimmed as templates trim them (Llama 3's `| trim`,
        Qwen3's `lstrip('\\n')`), so the tokens are what transformers' apply_chat_template gives; any other change
        to a content cannot be reproduced and is refused."""
        actual = render(self.template, [{"role": r, "content": t} for r, t in zip(roles, texts)], opened)
        out, at = [], 0
        for j, piece in enumerate(pieces):
            if isinstance(piece, str):
                if not actual.startswith(piece, at):
                    break
                at += len(piece)
                continue
            after = next((p for p in pieces[j + 1 :] if isinstance(p, str) and p), "")
            text = texts[piece]
            options = dict.fromkeys([text, text.strip(), text.lstrip("\n"), text.strip("\n"), text.rstrip()])
            found = next((c for c in options if actual.startswith(c + after, at)), None)
            if found is None:
                break
            out.append(found)
            at += len(found)
        else:
            if at == len(actual):
                return out
        raise UserError(
            f"{self.template.source}: in {where or 'an example'} the chat template changes a message's "
            f"content in a way this trainer cannot reproduce token for token; {WAY_OUT}"
        )

    def _check(self, ids: np.ndarray, owner: list[int | None], roles: list[str], where: str) -> None:
        inside = answer_positions(ids, self.rule)
        turns = roles.count("assistant")
        for i, o in enumerate(owner):
            if o is not None and inside[i] != (roles[o] == "assistant"):
                raise UserError(
                    f"{self.template.source}: in {where or 'an example'} the answer rule (after "
                    f"{list(self.rule.start)}, up to {self.rule.end}) does not find exactly the assistant's "
                    f"tokens; this template cannot be trained on: {WAY_OUT}"
                )
        closes = int((ids[inside] == self.rule.end).sum())
        if closes != turns:
            raise UserError(
                f"{self.template.source}: in {where or 'an example'} {closes} answer(s) end with token "
                f"{self.rule.end}, {turns} were written; {WAY_OUT}"
            )

    def _check_blocks(
        self, ids: np.ndarray, spans: list[tuple[int, int]], blocks: list[tuple[int, int]], where: str
    ) -> None:
        """The template's {% generation %} blocks mark what transformers' assistant mask counts: every token that
        overlaps a block. The rule must count exactly those."""
        marked = np.zeros(len(ids), dtype=bool)
        for a, b in blocks:
            marked |= np.array([s < b and e > a for s, e in spans], dtype=bool)
        if not np.array_equal(marked, answer_positions(ids, self.rule)):
            raise UserError(
                f"{self.template.source}: in {where or 'an example'} the {{% generation %}} blocks mark "
                f"{int(marked.sum())} tokens, the answer rule (after {list(self.rule.start)}, up to "
                f"{self.rule.end}) counts {int(answer_positions(ids, self.rule).sum())}; this trainer "
                f"cannot train on those blocks: {WAY_OUT}"
            )

    def prompt(self, history: list[tuple[str, str]], question: str, system: str = "") -> list[int]:
        """The conversation so far and a new question, the assistant's turn opened for the model to write."""
        roles, texts = roles_and_contents(Turns([*history, (question, "")], system))
        roles, texts = roles[:-1], texts[:-1]
        pieces = split_rendered(
            render(self.template, placeholder_messages(roles), True), len(roles), self.template.source
        )
        try:
            texts = self._as_rendered(roles, texts, pieces, True, "the prompt")
        except UserError:
            pass  # a prompt is never checked against answers: the contents as given
        return self._tokens(pieces, texts)[0]


def chat_meta(encoder: TemplateEncoder) -> dict[str, Any]:
    """What an SFT cache (and every checkpoint trained on it) records of the template: enough to mask its rows,
    to prompt the model in it, and to export it with the model. Template arguments only when given, so a record
    without them reads as it did."""
    t = encoder.template
    return {
        "template": t.text,
        "template_source": t.source,
        "template_sha256": t.sha256,
        "bos_token": t.bos_token,
        "eos_token": t.eos_token,
        **({"template_args": t.kwargs} if t.args else {}),
        **encoder.rule.to_meta(),
    }


def template_key(chat: dict[str, Any] | None) -> str:
    """One template with its arguments, as caches are compared: the built-in one, or the sha256 and the args."""
    if not chat:
        return "built-in"
    return chat["template_sha256"] + (
        json.dumps(chat["template_args"], sort_keys=True) if chat.get("template_args") else ""
    )


def template_of(chat: dict[str, Any]) -> ChatTemplate:
    return ChatTemplate(
        chat["template"],
        chat["template_source"],
        chat.get("bos_token"),
        chat.get("eos_token"),
        template_args(chat.get("template_args") or {}),
    )


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
    def stop_id(self) -> int | None:
        """The token that ends an answer: the template's end of turn, or <|eot|>; None where the template's answer
        rule cannot be found (the model's generation_config.json stop ids still end it, inference/load.py)."""
        if self.encoder is not None:
            try:
                return self.encoder.rule.end
            except UserError:
                return None
        return self.tok.special[EOT]


def chat_format(tok: Any, chat: dict[str, Any] | None) -> ChatFormat:
    """The chat format recorded with a cache or checkpoint (`chat`: chat_meta's record, or None for built-in)."""
    return ChatFormat(tok, TemplateEncoder(tok, template_of(chat)) if chat else None)
