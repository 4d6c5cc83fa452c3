"""Rows -> preference pairs: one conversation, answered once well (chosen) and once worse (rejected).

Row shapes, as preference data is published:
    {"prompt": "...", "chosen": "...", "rejected": "..."}                        plain strings
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}      TRL's conversational form
    {"prompt": "...", "chosen": [user, assistant], "rejected": [...]}         UltraFeedback-binarized (the answers
                                                                             repeat the prompt: it is taken once)
    {"chosen": [messages], "rejected": [messages]}                            full conversations, the prompt being
                                                                             what they share (HH as TRL ships it)
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}        Anthropic HH's raw text
Messages are {"role": "system"|"user"|"assistant", "content": "..."}. Whatever the shape, a pair is two whole
conversations that agree up to their last message, an assistant answer each: that answer is what the loss scores,
everything before it is the prompt (earlier assistant turns included).

A row that is not a pair of any shape is a bad row (named, nothing published, as for SFT). A row that is a pair
but cannot teach a preference is left out and counted by why (`Dropped`): an answer that is empty, two answers
that are the same text, or conversations that differ before their last answer (a few HH rows do).
"""

from __future__ import annotations

import re
from typing import Any

from trainer_accel.data.formats.chat import Turns, turns_of

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
EMPTY, SAME, DIVERGE, HH_ORDER = (
    "an empty answer",
    "chosen and rejected the same text",
    "conversations that differ before their last answer",
    "Human/Assistant turns out of order",
)


class Dropped(Exception):
    """A well-formed row that teaches no preference; its message is the reason it is counted under."""


def _is_hh(text: str) -> bool:
    return text.startswith("\n\nHuman: ") and "\n\nAssistant: " in text


def hh_messages(text: str) -> list[dict[str, str]]:
    """Anthropic HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." text as messages."""
    parts = HH_TURN.split(text)  # ["", "Human", text, "Assistant", text, ...]
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts) - 1, 2)]


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'"{key}" must be a string or a non-empty list of messages')
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ("system", "user", "assistant")
        ):
            raise ValueError(f'{key}[{i}] must be {{"role": "system"|"user"|"assistant", "content": "..."}}')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value: Any, key: str, has_prompt: bool) -> tuple[list[dict[str, str]], bool]:
    """An answer as messages, and whether it came as HH text."""
    if isinstance(value, str):
        if not has_prompt and _is_hh(value):
            return hh_messages(value), True
        return [{"role": "assistant", "content": value}], False
    return _messages(value, key), False


def is_pair_row(obj: Any) -> bool:
    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj


def pair_of(obj: Any) -> tuple[str, Turns, Turns]:
    """(split key, chosen conversation, rejected conversation) of one row. Raises ValueError for a row that is not
    a pair, Dropped for a pair that teaches nothing. The key is the prompt, so every pair of one prompt lands on
    the same side of the train/val split."""
    if not is_pair_row(obj):
        raise ValueError(
            'expected a preference pair {"prompt": ..., "chosen": ..., "rejected": ...} (strings or message lists; '
            "the prompt may be left to what chosen and rejected share)"
        )
    prompt = obj.get("prompt")
    if prompt is None:
        prompt_msgs = []
    elif isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        prompt_msgs = _messages(prompt, "prompt")
    chosen, hh = _answer(obj["chosen"], "chosen", bool(prompt_msgs))
    rejected, _ = _answer(obj["rejected"], "rejected", bool(prompt_msgs))
    full = []
    for answer in (chosen, rejected):
        repeats = prompt_msgs and answer[: len(prompt_msgs)] == prompt_msgs and len(answer) > len(prompt_msgs)
        full.append(answer if repeats or not prompt_msgs else prompt_msgs + answer)
    for conversation, key in zip(full, ("chosen", "rejected")):
        if conversation[-1]["role"] != "assistant":
            if hh:
                raise Dropped(HH_ORDER)
            raise ValueError(f'"{key}" must end with an assistant answer')
    if full[0][:-1] != full[1][:-1]:
        raise Dropped(DIVERGE)
    a, b = full[0][-1]["content"], full[1][-1]["content"]
    if not a.strip() or not b.strip():
        raise Dropped(EMPTY)
    if a == b:
        raise Dropped(SAME)
    try:
        turns = [turns_of({"messages": conversation}) for conversation in full]
    except ValueError:
        if hh:
            raise Dropped(HH_ORDER) from None
        raise
    return repr([(m["role"], m["content"]) for m in full[0][:-1]]), turns[0], turns[1]
