"""A small synthetic world for the demo: invented creatures and the facts about them.

Pretrain sources state the facts in many phrasings, so a tiny model learns them and its val loss falls
clearly. SFT sources ask about the same facts in the chat template; the pretrained model knows the facts but
not the question-answer form, so SFT visibly improves its answers. The preference pairs answer the same
questions twice: rightly, and with another creature's fact or with the right fact rambling on past its end.
Everything is a pure function of a fixed seed: the demo is the same on every machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
SYLLABLES = ["zor", "ba", "kel", "mi", "tu", "ran", "pho", "li", "dax", "quo", "ve", "nim"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
PLACES = ["Kelm", "Ostra", "Varn", "Lupe", "Drisk", "Moar"]
FOODS = ["plums", "moss", "fish", "seeds", "honey", "roots", "beetles", "clover"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass(frozen=True)
class Creature:
    name: str
    color: str
    place: str
    food: str
    legs: int


def creatures(rng: random.Random, n: int = 24) -> list[Creature]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.sample(SYLLABLES, 2))
        if name not in names:
            names.append(name)
    return [
        Creature(nm, rng.choice(COLORS), rng.choice(PLACES), rng.choice(FOODS), rng.choice([2, 4, 6, 8]))
        for nm in names
    ]


WIKI_TEMPLATES = [
    "The {name} is a {color} creature from {place}. It eats {food} and walks on {legs} legs.",
    "In {place} lives the {name}. The {name} is {color} and likes to eat {food}.",
    "A {name} has {legs} legs. Its color is {color}, and its favourite food is {food}.",
    "The {color} {name} comes from {place}, where it hunts for {food}.",
    "People in {place} know the {name} well: a {color} animal with {legs} legs that eats {food}.",
    "The {name} eats {food}. The {name} is {color}. The {name} lives in {place}.",
]
QUESTIONS = [
    ("What color is the {name}?", "The {name} is {color}."),
    ("Where does the {name} live?", "The {name} lives in {place}."),
    ("What does the {name} eat?", "The {name} eats {food}."),
    ("How many legs does the {name} have?", "The {name} has {legs} legs."),
]


def _facts(c: Creature) -> dict:
    return {"name": c.name, "color": c.color, "place": c.place, "food": c.food, "legs": NUMBERS[c.legs]}


def wiki_text(world: list[Creature], rng: random.Random) -> str:
    paras = [
        t.format(**_facts(c)) + " " + rng.choice(WIKI_TEMPLATES).format(**_facts(c))
        for _ in range(6)
        for c in world
        for t in WIKI_TEMPLATES
    ]
    rng.shuffle(paras)
    return "\n\n".join(paras) + "\n"


def roam_text(world: list[Creature], rng: random.Random) -> str:
    notes = []
    for _ in range(4):
        for c in world:
            f = _facts(c)
            notes.append(
                f"- [[{c.name}]]\n  - color:: {f['color']}\n  - home:: [[{f['place']}]]\n  - eats:: {f['food']}"
            )
    rng.shuffle(notes)
    return "\n\n".join(notes) + "\n"


def primer_text(rng: random.Random) -> str:
    lines = []
    for _ in range(400):
        a, b = rng.randrange(0, 5), rng.randrange(0, 5)
        lines.append(f"{NUMBERS[a]} and {NUMBERS[b]} make {NUMBERS[a + b]}.")
    return "\n\n".join(lines) + "\n"


def qa_pairs(world: list[Creature]) -> list[tuple[str, str]]:
    return [(q.format(**_facts(c)), a.format(**_facts(c))) for c in world for q, a in QUESTIONS]


def oasst_rows(conversations: list[list[tuple[str, str]]]) -> list[dict]:
    """Conversations as oasst1 message-tree rows (one tree each), the shape OpenAssistant publishes."""
    rows = []
    for t, turns in enumerate(conversations):
        parent = None
        for i, text in enumerate(x for pair in turns for x in pair):
            mid = f"demo-{t}-{i}"
            rows.append(
                {
                    "message_id": mid,
                    "parent_id": parent,
                    "role": "prompter" if i % 2 == 0 else "assistant",
                    "text": text,
                    "lang": "en",
                    "rank": None if i % 2 == 0 else 0,
                }
            )
            parent = mid
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def preference_rows(world: list[Creature], rng: random.Random) -> list[dict]:
    """Questions with a better and a worse answer. Those SFT taught (a right answer against another creature's fact,
    or against the right fact rambling on past its end), which the SFT model already ranks right; and yes/no
    questions SFT never asked ("Is the zorba red?"), which it ranks by chance and preference tuning teaches, the
    answer checked against the facts it learnt in pretraining. Half the rows are in TRL's conversational form, half
    plain strings: both shapes people publish."""
    rows = []

    def add(question: str, right: str, wrong: str) -> None:
        if rng.random() < 0.5:
            rows.append({"prompt": question, "chosen": right, "rejected": wrong})
        else:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": right}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                }
            )

    for c in world:
        facts = _facts(c)
        for k, (q, a) in enumerate(QUESTIONS):
            field = FIELDS[k]
            other = rng.choice([o for o in world if _facts(o)[field] != facts[field]])
            right, question = a.format(**facts), q.format(**facts)
            add(question, right, a.format(**{**facts, field: _facts(other)[field]}))
            if rng.random() < 0.5:
                ramble = " ".join(rng.choice(WIKI_TEMPLATES).format(**_facts(o)) for o in (c, other))
                add(question, right, right + " " + ramble)
            asked = YES_NO[k]
            add(asked.format(**facts), f"Yes. {right}", f"No. {a.format(**{**facts, field: _facts(other)[field]})}")
            wrong = {**facts, field: _facts(other)[field]}
            add(asked.format(**wrong), f"No. {right}", f"Yes. {a.format(**wrong)}")
    rng.shuffle(rows)
    return rows


YES_NO = ["Is the {name} {color}?", "Does the {name} live in {place}?", "Does the {name} eat {food}?",
          "Does the {name} have {legs} legs?"]  # fmt: skip
FIELDS = ["color", "place", "food", "legs"]  # the fact each of QUESTIONS asks about


def write_demo_corpus(out_dir: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    """Write the demo's inputs under out_dir in the formats users bring: pretraining text as JSONL rows with a
    "text" field (one document each), SFT as prompt/response rows and oasst1 message trees, preference pairs as
    prompt/chosen/rejected rows. Returns the stream, SFT and preference sources, name -> file."""
    rng = random.Random(SEED)
    world = creatures(rng)
    streams = {
        name: _write_jsonl(
            out_dir / "streams" / f"{name}.jsonl", [{"text": doc} for doc in text.rstrip("\n").split("\n\n")]
        )
        for name, text in (
            ("wiki", wiki_text(world, rng)),
            ("roam", roam_text(world, rng)),
            ("primer", primer_text(rng)),
        )
    }

    pairs = qa_pairs(world)
    dolly = [{"prompt": q, "response": a} for q, a in pairs]
    rng.shuffle(dolly)
    conversations = [rng.sample(pairs, 2) for _ in range(len(pairs))]
    primer = [
        {"prompt": f"What do {NUMBERS[a]} and {NUMBERS[b]} make?", "response": f"{NUMBERS[a + b]}."}
        for a in range(5)
        for b in range(5)
    ]
    sfts = {
        name: _write_jsonl(out_dir / "sft" / f"{name}.jsonl", rows)
        for name, rows in (("dolly", dolly), ("oasst1", oasst_rows(conversations)), ("primer", primer))
    }
    prefs = {"facts": _write_jsonl(out_dir / "pref" / "facts.jsonl", preference_rows(world, rng))}
    return streams, sfts, prefs
