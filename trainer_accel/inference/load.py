"""A model to talk to, from every form one comes in: a checkpoint directory, an exported .pt (by default
checkpoints/best.deployable.pt when there is one, else best.pt), or a Hugging Face directory (an export of ours
or a Llama / Qwen / GPT-2 model), with the tokenizer its ids belong to and the chat template it was trained in.

Loading goes through the start-point loader a run uses (training/start.py), so a file that fails its record's
check is refused here as it is there.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer_accel.checkpoints.shapes import state_problems
from trainer_accel.data.chat_template import (
    ChatFormat,
    TemplateEncoder,
    chat_format,
    find_chat_template,
)
from trainer_accel.data.tokenizer import (
    CHAT_TOKENS,
    DOC,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
)
from trainer_accel.devices.accelerator import pick_device
from trainer_accel.errors import UserError, raise_if_any
from trainer_accel.fsio import loads
from trainer_accel.hf.directory import EXPORT_RECORD, is_hf_dir, tokenizer_identity
from trainer_accel.hf.export import find_tokenizer
from trainer_accel.hf.peft import is_peft_dir, read_peft_base
from trainer_accel.models.build import build_model
from trainer_accel.models.config import ModelConfig, model_cfg_problems
from trainer_accel.models.gpt import GPT
from trainer_accel.paths import Paths
from trainer_accel.phases.registry import is_chat_model
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
    model_stops: frozenset[int] = frozenset()  # the stop ids the model came with (its generation_config.json)

    def stop_ids(self, chat: bool) -> frozenset[int]:
        """What ends a completion, as transformers' generate ends it with the same files: the model's own stop ids
        (Qwen3: <|im_end|> and <|endoftext|>), the end of a document always, and the end-of-turn token in a chat."""
        ends = {self.tok.special[DOC], *self.model_stops}
        if chat and self.chat is not None and self.chat.stop_id is not None:
            ends.add(self.chat.stop_id)
        return frozenset(ends)


def model_stop_ids(folder: Path | None) -> frozenset[int]:
    """The eos ids of a model directory's generation_config.json (else its config.json), where it has them."""
    if folder is None:
        return frozenset()
    for name in ("generation_config.json", "config.json"):
        try:
            value = loads((Path(folder) / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        ids = value if isinstance(value, list) else [value]
        if value is not None and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            return frozenset(ids)
    return frozenset()


def default_model(paths: Paths) -> Path:
    """checkpoints/best.deployable.pt (the newest export whose SFT passed its gate), else checkpoints/best.pt."""
    for name in ("best.deployable.pt", "best.pt"):
        if (paths.checkpoints / name).is_file():
            return paths.checkpoints / name
    raise UserError(
        f"{paths.checkpoints}: no best.deployable.pt or best.pt; train a model first (python -m "
        "trainer_accel.run) or name one with --model (a checkpoint directory, a .pt or a Hugging Face "
        "directory)"
    )


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
    record = {"phase": _export_phase(directory)}  # our exports carry the template whatever the phase: used if chat
    if template is None or (record["phase"] is not None and not is_chat_model(record)):
        return tok, None
    return tok, ChatFormat(tok, TemplateEncoder(tok, template) if not byte_export else None)


def chosen_format(tok: Tokenizer, chat: ChatFormat | None, choice: str, args: tuple, source: Path) -> ChatFormat | None:
    """The template a conversation is written in: the one the model was trained in (or came with), unless the user
    names another (--chat-template builtin or PATH) or gives it arguments (--template-arg)."""
    if choice == "model" and not args:
        return chat
    if choice == "builtin":
        if args:
            raise UserError("--template-arg: the built-in chat format takes no template arguments")
        if not all(t in tok.special for t in CHAT_TOKENS):
            raise UserError(
                f"{source}: its tokenizer has no <|user|>, <|assistant|>, <|eot|>: it was not trained in "
                "the built-in format; leave --chat-template out"
            )
        return ChatFormat(tok)
    path = getattr(tok, "path", None)
    if choice == "model":
        if chat is None or chat.encoder is None:
            raise UserError(
                "--template-arg: this model was trained in the built-in format, which takes no template arguments"
            )
        template = dataclasses.replace(chat.encoder.template, args=args)
    else:
        template = find_chat_template(Path(path) if path else Path(choice), choice, args)
    if chat is not None and chat.encoder is not None and chat.encoder.template.text != template.text:
        log.warning(
            "%s was trained in the template of %s; prompting in %s instead",
            source,
            chat.encoder.template.source,
            template.source,
        )
    return ChatFormat(tok, TemplateEncoder(tok, template))


def load_model(
    path: Path | None,
    paths: Paths,
    device: str | None = None,
    dtype: str = "fp32",
    template: str = "model",
    template_arguments: tuple = (),
) -> LoadedModel:
    """The model at `path` (default: default_model) in eval mode on the trainer's default device, in `dtype`;
    conversations in the template it was trained in, or `template` (builtin, or a file) with `template_arguments`."""
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
    # a PEFT adapter directory holds no tokenizer: the Hugging Face base it names has it
    hf_source = Path(read_peft_base(source) or source) if is_peft_dir(source) else source
    if is_hf_dir(hf_source):
        tok, chat = _hf_tokenizer_and_chat(hf_source)
        phase, folder = _export_phase(hf_source), hf_source
    else:
        tok = find_tokenizer(
            loaded,
            None,
            paths,
            "put it back there, or export the model with python -m "
            "trainer_accel.export --format hf --tokenizer PATH and use that directory as --model",
        )
        chat = chat_format(tok, loaded.meta.get("chat")) if is_chat_model(loaded.meta) else None
        folder = Path(tok.path).parent if getattr(tok, "path", None) else None
    chat = chosen_format(tok, chat, template, template_arguments, source)
    cfg = loaded.meta["model_cfg"]
    # the checks a run makes of its start point: a config.json that contradicts its weights is said, not a traceback
    raise_if_any(
        model_cfg_problems(cfg, f"{source}: model_cfg", known_only=True)
        or [f"{source}: {p}" for p in state_problems(loaded.model_state, cfg)]
    )
    if tok.vocab_size > cfg["V"]:
        raise UserError(
            f"{source}: its tokenizer has {tok.vocab_size:,} tokens, the model {cfg['V']:,} rows: a token "
            "past them has no embedding; the tokenizer does not belong to these weights"
        )
    model = build_model(ModelConfig(**cfg), dev, DTYPES[dtype], state=loaded.model_state)
    return LoadedModel(model.eval(), tok, chat, source, phase, model_stop_ids(folder))
