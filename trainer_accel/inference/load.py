"""A model to talk to, from every form one comes in: a checkpoint directory, an exported .pt (by default
checkpoints/best.deployable.pt when there is one, else best.pt), or a Hugging Face directory (an export of ours
or a Llama / Qwen / GPT-2 model), with the tokenizer its ids belong to and the chat template it was trained in.

Loading goes through the start-point loader a run uses (training/start.py), so a file that fails its record's
check is refused here as it is there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer_accel.data.chat_template import (
    ChatFormat,
    TemplateEncoder,
    chat_format,
    find_chat_template,
)
from trainer_accel.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from trainer_accel.devices.accelerator import pick_device
from trainer_accel.errors import UserError
from trainer_accel.fsio import loads
from trainer_accel.hf.directory import EXPORT_RECORD, is_hf_dir, tokenizer_identity
from trainer_accel.hf.export import find_tokenizer
from trainer_accel.models.config import ModelConfig
from trainer_accel.models.gpt import GPT
from trainer_accel.paths import Paths
from trainer_accel.training.start import load_start

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: GPT
    tok: Tokenizer
    chat: ChatFormat | None  # None: the model was never fine-tuned on conversations and has no template
    source: Path
    phase: str | None

    def stop_ids(self, chat: bool) -> frozenset[int]:
        """What ends a completion: the end-of-turn token in a chat, and the end of a document always."""
        ends = {self.tok.special["<|endoftext|>"]}
        if chat and self.chat is not None:
            ends.add(self.chat.stop_id)
        return frozenset(ends)


def default_model(paths: Paths) -> Path:
    """checkpoints/best.deployable.pt (the newest export whose SFT passed its gate), else checkpoints/best.pt."""
    for name in ("best.deployable.pt", "best.pt"):
        if (paths.checkpoints / name).is_file():
            return paths.checkpoints / name
    raise UserError(f"{paths.checkpoints}: no best.deployable.pt or best.pt; train a model first (python -m "
                    "trainer_accel.run) or name one with --model (a checkpoint directory, a .pt or a Hugging Face "
                    "directory)")


def _export_phase(directory: Path) -> str | None:
    """The phase an export of ours came from (its record); None for any other Hugging Face directory."""
    try:
        record = loads((directory / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record.get("phase") if isinstance(record, dict) else None


def _hf_tokenizer_and_chat(directory: Path) -> tuple[Tokenizer, ChatFormat | None]:
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{directory}: no tokenizer.json beside the weights; generation needs the model's tokenizer")
    byte_export = tokenizer_identity(directory) == ByteTokenizer.identity  # ours, exported: the ids are bytes
    tok: Tokenizer = ByteTokenizer() if byte_export else HFTokenizer(tok_file)
    template = find_chat_template(tok_file)
    if template is None or _export_phase(directory) == "pretrain":  # our exports carry the template whatever the phase
        return tok, None
    return tok, ChatFormat(tok, TemplateEncoder(tok, template) if not byte_export else None)


def load_model(path: Path | None, paths: Paths, device: str | None = None, dtype: str = "fp32") -> LoadedModel:
    """The model at `path` (default: default_model) in eval mode on the trainer's default device, in `dtype`."""
    source = Path(path) if path is not None else default_model(paths)
    if path is None:
        log.info("model: %s (the newest %s)", source, "deployable export" if "deployable" in source.name else "export")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    dev = pick_device(device)
    if dtype != "fp32" and dev.type == "cpu":
        raise UserError(f"--dtype {dtype}: half precision is for a GPU; on the CPU use fp32")
    loaded = load_start(source, None, with_optimizer=False)
    phase = loaded.meta.get("phase")
    if is_hf_dir(source):
        tok, chat = _hf_tokenizer_and_chat(source)
        phase = _export_phase(source)
    else:
        tok = find_tokenizer(loaded, None, paths)
        chat = chat_format(tok, loaded.meta.get("chat")) if loaded.meta.get("phase") == "sft" else None
    model = GPT(ModelConfig(**loaded.meta["model_cfg"]))
    model.load_state_dict(loaded.model_state, strict=True)
    return LoadedModel(model.to(device=dev, dtype=DTYPES[dtype]).eval(), tok, chat, source, phase)
