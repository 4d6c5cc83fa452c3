"""Prompts to completions: reading a prompts file, encoding each prompt plainly or in the model's chat template,
batching, stop texts, and the figures each completion reports (tokens, tokens/s, why it ended)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer_accel.errors import UserError, raise_if_any
from trainer_accel.fsio import loads
from trainer_accel.inference.load import LoadedModel
from trainer_accel.inference.options import row_seed
from trainer_accel.models.generation import Sampling, generate_ids


@dataclass
class Prompt:
    text: str  # as shown in the output: the prompt, or the last user message
    chat: bool  # in the model's chat template
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier turns of a messages prompt
    system: str = ""  # the system message of a messages prompt (or --system)


MAX_PROMPTS_BYTES = 256 << 20  # a prompts file larger than this is not one (/dev/zero, a model passed by mistake)


def read_prompts(path: Path) -> list[Prompt]:
    """A text file (one prompt a line) or JSONL ({"prompt": ...} or {"messages": [...]} a line; a .jsonl or .json
    file of any case); blank lines skip. Lines end at \n (or \r\n) only: a form feed or U+2028 inside a prompt is
    part of it, as it is of a JSON string."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPTS_BYTES + 1)
        if len(data) > MAX_PROMPTS_BYTES:
            raise UserError(f"--prompts {path}: larger than {MAX_PROMPTS_BYTES >> 20} MiB; not a prompts file")
        lines = [line.removesuffix("\r") for line in data.decode("utf-8").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path}: cannot be read ({e})") from None
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    out, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            out.append(Prompt(line, chat=False))
            continue
        try:
            row = loads(line)
        except ValueError as e:
            problems.append(f"{path}:{n}: not valid JSON ({e})")
            continue
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append(Prompt(row["prompt"], chat=False))
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            out.append(_from_messages(row["messages"], f"{path}:{n}", problems))
        else:
            problems.append(f'{path}:{n}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    raise_if_any(problems)
    if not out:
        raise UserError(f"--prompts {path}: no prompts in it (one a line, or JSONL with a prompt or messages field)")
    return out


def _from_messages(messages: list, where: str, problems: list[str]) -> Prompt:
    """An optional system message, then user/assistant turns ending on a user message: the last one is the
    prompt, the rest its history."""
    system = ""
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system, messages = messages[0].get("content"), messages[1:]
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    ok = (
        all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        and messages
        and isinstance(system, str)
        and roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
    )
    if not ok:
        problems.append(
            f"{where}: messages must be an optional system message, then user and assistant in turn, "
            "ending on a user message, each with a string content"
        )
        return Prompt("", chat=True)
    history = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]
    return Prompt(messages[-1]["content"], chat=True, history=history, system=system)


def encode(lm: LoadedModel, prompt: Prompt, index: int) -> list[int]:
    if prompt.chat:
        if lm.chat is None:
            raise UserError(
                f"{lm.source}: this model has no chat template (it was not fine-tuned on conversations); "
                "give plain prompts, or use an SFT model"
            )
        ids = lm.chat.prompt(prompt.text, prompt.history, prompt.system)
    else:
        ids = lm.tok.encode_prompt(prompt.text)
    if not ids:
        raise UserError(f"prompt {index + 1} is empty")
    if len(ids) >= lm.model.cfg.T:
        raise UserError(
            f"prompt {index + 1} is {len(ids):,} tokens; the model's context T is {lm.model.cfg.T:,}, and "
            "an answer needs room after the prompt"
        )
    return ids


def complete(
    lm: LoadedModel,
    prompts: list[Prompt],
    max_new_tokens: int,
    sampling: Sampling,
    seed: int,
    stops: list[str],
    batch_size: int,
):
    """Yields one record per prompt, in order, batch by batch."""
    encoded = [encode(lm, p, i) for i, p in enumerate(prompts)]
    for first in range(0, len(prompts), batch_size):
        batch = list(range(first, min(first + batch_size, len(prompts))))
        gens = [torch.Generator().manual_seed(row_seed(seed, i)) for i in batch]  # per prompt: batch-independent
        stop_ids = [lm.stop_ids(prompts[i].chat) for i in batch]
        so_far: dict[int, list[int]] = {}

        def stopped(row: int, token: int) -> bool:
            so_far.setdefault(row, []).append(token)
            if token in stop_ids[row]:
                return True
            return bool(stops) and any(s in lm.tok.decode(so_far[row]) for s in stops)

        start = time.perf_counter()
        new = generate_ids(
            lm.model, [encoded[i] for i in batch], max_new_tokens, sampling, gens, frozenset(), on_token=stopped
        )
        seconds = time.perf_counter() - start
        total = sum(len(n) for n in new)
        for row, i in enumerate(batch):
            ids = new[row]
            reason = "length"
            if ids and ids[-1] in stop_ids[row]:
                ids, reason = ids[:-1], "stop"
            text = lm.tok.decode(ids)
            for s in stops:
                if s in text:
                    text, reason = text[: text.index(s)], "stop"
            yield {
                "prompt": prompts[i].text,
                "completion": text,
                "prompt_tokens": len(encoded[i]),
                "completion_tokens": len(new[row]),
                "finish_reason": reason,
                "tokens_per_s": round(total / seconds, 1) if seconds > 0 else None,
            }


def write_jsonl(records, out) -> None:
    for r in records:
        out.write(json.dumps(r, ensure_ascii=False) + "\n")
        out.flush()


def inputs_named_as_out(out: Path | None, model: Path | None, prompts: Path | None) -> list[str]:
    """--out naming a file `generate` reads (the model, the prompts) would replace it with completions."""
    if out is None or not out.exists():
        return []
    named = [("--model", model), ("--prompts", prompts)]
    return [
        f"--out {out}: is the {flag} file; nothing was written: choose another output file"
        for flag, path in named
        if path is not None and path.exists() and os.path.samefile(path, out)
    ]


def write_out(records, out: Path) -> None:
    """The completions into a new file beside --out, renamed over it when all are written: a run refused or
    stopped half way (a prompt too long, a full disk, Ctrl-C) leaves an existing --out as it was."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write_jsonl(records, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(
            f"--out {out}: cannot be written ({e.strerror or type(e).__name__}); an existing file there is as it was"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
