"""What the model says: completions for the config's `sample_prompts`, written at every checkpoint.

Each prompt is a string or an object {prompt, seed, max_new_tokens, temperature, top_k, task}; `task` is
"completion" (default) or "chat" (the prompt is wrapped in the template SFT used, the built-in one or the model's
own, and the answer read up to the token that ends a turn in it).
Sampling uses its own generator seeded per prompt (`seed`, else the config's `sample_seed`), so a sample is a
function of the weights and its settings, and it never touches the training randomness.
Files: samples/{phase}/step-{step:08d}-{i:02d}.json with the prompt, the settings, the step and the text (one
folder per phase, because a pipeline's pretrain and SFT both reach, say, step 200).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer_accel.config import SamplePrompt
from trainer_accel.data.chat_template import ChatFormat
from trainer_accel.data.tokenizer import DOC, EOT, Tokenizer
from trainer_accel.fsio import write_atomic
from trainer_accel.models.generation import generate
from trainer_accel.models.gpt import GPT


def sample_text(
    model: GPT, tok: Tokenizer, spec: SamplePrompt, default_seed: int, chat_form: ChatFormat | None = None
) -> str:
    """One completion, deterministic for given weights, settings and seed. Usable on any GPT, e.g. after export.
    `chat_form`: the template of chat prompts (default: the built-in one)."""
    device = next(model.parameters()).device
    chat = spec.task == "chat"
    form = chat_form or ChatFormat(tok)
    ids = form.prompt(spec.prompt, (), spec.system) if chat else tok.encode_prompt(spec.prompt)
    if not ids:
        ids = [tok.special.get(EOT, tok.special[DOC])]
    ids = ids[-model.cfg.T :]
    gen = torch.Generator().manual_seed(spec.seed if spec.seed is not None else default_seed)
    out = generate(
        model,
        torch.tensor([ids], device=device),
        spec.max_new_tokens,
        spec.temperature,
        spec.top_k,
        generator=gen,
        stop_id=form.stop_id if chat else None,
    )
    new = out[0, len(ids) :].tolist()
    if chat and form.stop_id in new:
        new = new[: new.index(form.stop_id)]
    return tok.decode(new)


def write_samples(
    model: GPT, chat_form: ChatFormat, specs: list[SamplePrompt], default_seed: int, step: int, samples_dir: Path
) -> list[dict]:
    """Generate and write every prompt's sample; returns the records (each with its file's path)."""
    records = []
    for i, spec in enumerate(specs):
        record = {
            "step": step,
            **spec.to_dict(),
            "seed": spec.seed if spec.seed is not None else default_seed,
            "text": sample_text(model, chat_form.tok, spec, default_seed, chat_form),
        }
        path = samples_dir / f"step-{step:08d}-{i:02d}.json"
        write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
        records.append({**record, "path": str(path)})
    return records
