"""Rows -> SFT examples: a list of (prompt, answer) turns.

Row shapes, one example each:
    {"prompt": ..., "response": ...}                       (Dolly's {"instruction", "context", "response"} too)
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
A system message before the first user message is the conversation's system message: a model's own chat template
writes it in its system role; the built-in format, which has none, folds it into the first user message. A system
message later in a conversation is folded into the user message after it, in either.
OpenAssistant's oasst1 comes as message trees instead, and is rebuilt into conversations (`MessageTrees`):
    flat, one row per message: {"message_id", "parent_id", "role": "prompter"|"assistant", "text", "lang", "rank"}
    nested (the *.trees.jsonl export): {"message_tree_id", "prompt": {message..., "replies": [message, ...]}}
A tree gives one conversation per leaf (`leaves`: every branch the volunteers wrote) or only the best-ranked path
(`best`: at each turn the reply with the lowest rank, 0 being best). A conversation ends on an assistant message;
a prompter message left unanswered at a leaf is dropped. Deleted messages and their replies are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Turns(list):
    """A conversation's (prompt, answer) pairs, in order, and the system message before them ("": none)."""

    def __init__(self, pairs=(), system: str = ""):
        super().__init__(pairs)
        self.system = system

    def folded(self) -> list[tuple[str, str]]:
        """The pairs with the system message written at the start of the first prompt: the built-in format's
        way, which has no system role (and what every example was before templates had one)."""
        pairs = list(self)
        if self.system and pairs:
            pairs[0] = (self.system + "\n\n" + pairs[0][0], pairs[0][1])
        return pairs


OASST_PATHS = ("leaves", "best")
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def turns_of(obj: Any) -> Turns:
    """One prompt/response or messages row -> its turns; raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list')
        system, turns, pending, leading = "", Turns(), None, None
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("content"), str)
                or m.get("role") not in ("system", "user", "assistant")
            ):
                raise ValueError(f'messages[{i}] must be {{"role": "system"|"user"|"assistant", "content": "..."}}')
            if m["role"] == "system":
                system += m["content"] + "\n\n"
            elif m["role"] == "user":
                if pending is not None:
                    raise ValueError(f"messages[{i}]: two user messages in a row")
                if leading is None:  # the first user message: what came before it is the system message
                    leading, system = system[:-2], ""
                pending = system + m["content"]
                system = ""
            else:
                if pending is None:
                    raise ValueError(f"messages[{i}]: an assistant message with no user message before it")
                turns.append((pending, m["content"]))
                pending = None
        if not turns:
            raise ValueError("no user/assistant pair in messages")
        turns.system = leading or ""
        return turns
    prompt = obj.get("prompt", obj.get("instruction"))
    response = obj.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(
            'expected {"prompt": "...", "response": "..."}, {"messages": [...]} or an oasst1 message '
            '{"message_id", "parent_id", "role", "text"}'
        )
    context = obj.get("context")
    if isinstance(context, str) and context.strip():
        prompt = f"{prompt}\n\n{context}"
    return Turns([(prompt, response)])


def is_oasst_message(obj: Any) -> bool:
    return isinstance(obj, dict) and "message_id" in obj and "parent_id" in obj and "role" in obj


def is_oasst_tree(obj: Any) -> bool:
    return isinstance(obj, dict) and "message_tree_id" in obj and isinstance(obj.get("prompt"), dict)


@dataclass
class Message:
    id: str
    parent: str | None
    role: str
    text: str
    lang: str | None
    rank: float
    order: int
    where: str
    replies: list[str] = field(default_factory=list)


@dataclass
class MessageTrees:
    """oasst1 messages of one input, gathered (a tree's messages may lie anywhere in the file), then rebuilt.

    Holds the messages' text in memory: oasst1 (88k messages) takes about 150 MB. Streaming inputs do not."""

    paths: str = "leaves"
    langs: frozenset[str] = frozenset()  # keep trees whose first prompt is in one of these; empty keeps all
    messages: dict[str, Message] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)  # ids of messages marked deleted, which are left out
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> messages left out for it (conversations())

    def add(self, obj: dict, where: str) -> None:
        """One flat message row; raises ValueError saying what is wrong."""
        mid, parent, role, text = obj.get("message_id"), obj.get("parent_id"), obj.get("role"), obj.get("text")
        if not isinstance(mid, str) or not mid:
            raise ValueError("oasst1 message: message_id must be a non-empty string")
        if parent is not None and not isinstance(parent, str):
            raise ValueError(f"oasst1 message {mid}: parent_id must be a string or null")
        if role not in OASST_ROLES:
            raise ValueError(f"oasst1 message {mid}: role must be prompter or assistant, got {role!r}")
        if not isinstance(text, str):
            raise ValueError(f"oasst1 message {mid}: text must be a string")
        if mid in self.messages:
            raise ValueError(f"oasst1 message {mid}: message_id seen before, at {self.messages[mid].where}")
        if obj.get("deleted") is True:
            self.deleted.add(mid)
            return
        rank = obj.get("rank")
        self.messages[mid] = Message(
            mid,
            parent or None,
            role,
            text,
            obj.get("lang"),
            float(rank) if isinstance(rank, (int, float)) else float("inf"),
            len(self.messages),
            where,
        )

    def add_tree(self, obj: dict, where: str) -> None:
        """One nested tree row: its messages, each with its parent's id filled in."""
        stack = [(obj["prompt"], None)]
        while stack:
            msg, parent = stack.pop()
            if not isinstance(msg, dict):
                raise ValueError("oasst1 tree: each message must be an object")
            self.add({**msg, "parent_id": parent}, where)
            replies = msg.get("replies") or []
            if not isinstance(replies, list):
                raise ValueError(f"oasst1 message {msg.get('message_id')}: replies must be a list")
            stack += [(r, msg.get("message_id")) for r in reversed(replies)]

    def conversations(self) -> tuple[list[tuple[str, Turns]], list[str]]:
        """([(tree root id, turns)], problems); the root id keeps all of a tree's conversations on one side of the
        train/val split, so no branch of a validation tree is trained on."""
        roots, problems = [], []
        for m in self.messages.values():
            if m.parent is None:
                roots.append(m)
            elif m.parent in self.messages and m.parent != m.id:
                self.messages[m.parent].replies.append(m.id)
        self._count_dropped(roots)
        out = []
        for root in roots:
            if self.langs and root.lang not in self.langs:
                continue
            for path in self._leaf_paths(root) if self.paths == "leaves" else [self._best_path(root)]:
                if len(path) < 2:
                    continue  # a prompt nobody answered
                try:
                    out.append((root.id, self._turns(path)))
                except ValueError as e:
                    problems.append(f"{path[-1].where}: {e}")
        return out, problems

    def _count_dropped(self, roots: list[Message]) -> None:
        """Every message that no conversation can reach, by why: its parent was deleted, its parent is not in the
        file, it lies under such a message, or its parent ids go round in a circle (its own parent included)."""

        def under(tops: list[Message]) -> set[str]:
            found, stack = set(), [m.id for m in tops]
            while stack:
                mid = stack.pop()
                if mid not in found:
                    found.add(mid)
                    stack += self.messages[mid].replies
            return found

        reached = under(roots)
        lost = [m for m in self.messages.values() if m.parent is not None and m.parent not in self.messages]
        to_deleted = [m for m in lost if m.parent in self.deleted]
        missing = [m for m in lost if m.parent not in self.deleted]
        below = under(lost) - {m.id for m in lost}
        circular = set(self.messages) - reached - under(lost)
        counts = {
            "replies to a deleted message": len(to_deleted),
            "whose parent is not in the file": len(missing),
            "under those": len(below),
            "in or under a circle of parent ids": len(circular),
            "marked deleted": len(self.deleted),
        }
        self.dropped = {reason: n for reason, n in counts.items() if n}

    def _children(self, m: Message) -> list[Message]:
        return sorted((self.messages[r] for r in m.replies), key=lambda c: (c.rank, c.order))

    def _leaf_paths(self, root: Message) -> list[list[Message]]:
        paths, stack, seen = [], [[root]], set()
        while stack:
            path = stack.pop()
            children = self._children(path[-1])
            if children:
                stack += [path + [c] for c in reversed(children)]
                continue
            trimmed = path[:-1] if path[-1].role == "prompter" else path
            key = tuple(m.id for m in trimmed)
            if key not in seen:
                seen.add(key)
                paths.append(trimmed)
        return paths

    def _best_path(self, root: Message) -> list[Message]:
        path = [root]
        while children := self._children(path[-1]):
            path.append(children[0])
        return path[:-1] if path[-1].role == "prompter" else path

    @staticmethod
    def _turns(path: list[Message]) -> Turns:
        for i, m in enumerate(path):
            want = "prompter" if i % 2 == 0 else "assistant"
            if m.role != want:
                raise ValueError(f"oasst1 message {m.id}: a {m.role} message where the conversation needs a {want} one")
        return Turns((path[i].text, path[i + 1].text) for i in range(0, len(path), 2))
