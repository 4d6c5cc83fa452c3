"""A Hugging Face model directory as a start point: its config.json, its weights (safetensors, shards, a safe
pytorch_model.bin), its tokenizer's identity; loaded as a LoadedCheckpoint and fitted to the run's model config.

The mapping of names and shapes between the two layouts is the model family's own (models/gpt_hf.py); this module
only finds and reads the files. Nothing here imports transformers: it is needed to use an export, not to make one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainer_accel.checkpoints.loading import LoadedCheckpoint
from trainer_accel.config import ModelConfig
from trainer_accel.data.tokenizer import file_identity
from trainer_accel.errors import UserError, first_line, raise_if_any
from trainer_accel.fsio import loads, sha256_file
from trainer_accel.models import families
from trainer_accel.models.config import model_cfg_problems
from trainer_accel.models.gpt_hf import grow_vocab, without_zero_biases

log = logging.getLogger(__name__)

EXPORT_RECORD = "trainer_accel_export.json"  # in a directory hf/export.py wrote: where it came from
HF_FORMAT = "huggingface"  # the `format` of a LoadedCheckpoint read from a Hugging Face directory
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# what older files hold beside the weights (GPT-2's causal masks, rotary frequencies): the mappings skip them
BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------------------------
# Ours -> Hugging Face


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face -> ours


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory (config.json and weights), not one of our checkpoints (meta.json)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and not (path / "meta.json").exists()


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        cfg = loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable config.json ({e})") from None
    families.reading(cfg, str(path))
    return cfg


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The directory's tensors, read without running any code: safetensors, or a .bin with weights_only."""
    directory = Path(directory)
    single, index, pickled = (directory / name for name in WEIGHT_FILES)
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            return {k: v for shard in shard_files(index) for k, v in load_file(str(shard)).items()}
        if pickled.is_file():
            state = torch.load(pickled, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(f"holds a {type(state).__name__}, not a state dict")
            return state
    except UserError:
        raise  # a shard index's own problem (a missing shard, a path outside the directory), said as it is
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as e:
        raise UserError(f"{directory}: unreadable weights ({first_line(e)})") from None
    except pickle.UnpicklingError as e:  # torch.load's refusal of a pickle that is not plain tensors
        unsupported = next(
            (line.strip().split(" Please use")[0] for line in str(e).splitlines() if "Unsupported global" in line), ""
        )  # without torch's advice to allow it
        raise UserError(
            f"{pickled}: holds more than tensors, so it is not loaded (loading it would run code in it"
            f"{': ' + unsupported if unsupported else ''}); convert it to model.safetensors where it came "
            "from"
        ) from None
    except Exception as e:  # a truncated or empty file (EOFError), anything else torch.load raises
        raise UserError(f"{pickled}: unreadable weights ({type(e).__name__}: {first_line(e)})") from None
    raise UserError(f"{directory}: no weights ({' or '.join(WEIGHT_FILES)}) beside config.json")


def shard_files(index: Path) -> list[Path]:
    """The shards a model.safetensors.index.json names, each checked to lie in the index's own directory: an
    index naming ../other/model.safetensors (or an absolute path) would load weights from elsewhere."""
    try:
        weight_map = loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise UserError(f"{index}: not a readable shard index ({first_line(e)})") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(
            f'{index}: "weight_map" must be an object of tensor name -> shard file name, got '
            f"{type(weight_map).__name__}"
        )
    shards, problems = [], []
    for name in sorted(set(weight_map.values())):
        shard = index.parent / name
        # by name, not by resolving links: a hub snapshot's shards are links into its blobs/ folder
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            problems.append(
                f"{index}: shard {name!r} is not a file name beside the index; shards must sit in {index.parent}"
            )
        elif not shard.is_file():
            problems.append(f"{index}: shard {name!r} is missing")
        shards.append(shard)
    raise_if_any(problems)
    return shards


def weights_file(directory: Path) -> Path | None:
    return next((Path(directory) / n for n in WEIGHT_FILES if (Path(directory) / n).is_file()), None)


def weights_sha256(directory: Path) -> str | None:
    """The weights' identity, as model_sha256 is for our checkpoints. For shards: a hash over the index and every
    shard's own sha256, so a swapped shard is another identity (hashing the index alone missed it)."""
    found = weights_file(directory)
    if found is None:
        return None
    if found.name != WEIGHT_FILES[1]:
        return sha256_file(found)
    lines = [f"index {sha256_file(found)}"] + [f"{s.name} {sha256_file(s)}" for s in shard_files(found)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def tokenizer_identity(directory: Path) -> str | None:
    """The identity (tokenizer.py) of the tokenizer a directory's model learnt: what our export recorded, else
    that of its tokenizer.json as `prepare --tokenizer` would name it; None when it has neither."""
    try:
        return loads((directory / EXPORT_RECORD).read_text())["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = directory / "tokenizer.json"
    return file_identity(found) if found.is_file() else None


def load_hf_dir(directory: Path) -> LoadedCheckpoint:
    """A Hugging Face model directory (GPT-2 or a Llama-family model) as a checkpoint to start from: weights in
    float32 at its own vocabulary size, no optimizer, step 0."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    mapping = families.reading(hf, str(directory / "config.json"))
    cfg = mapping.model_cfg_from_hf(hf, str(directory / "config.json"))
    raise_if_any(model_cfg_problems(cfg, str(directory / "config.json")))  # heads that do not divide, before weights
    tensors = read_hf_weights(directory)
    raise_if_any(weight_value_problems(tensors, directory))
    state = mapping.state_from_hf(tensors, cfg, str(directory))
    meta = {
        "format": HF_FORMAT,
        "model_cfg": cfg,
        "train_cfg": {},
        "phase": None,
        "run_id": None,
        "model_sha256": weights_sha256(directory),
        "tokenizer": tokenizer_identity(directory),
    }
    return LoadedCheckpoint(
        source=directory, model_state=state, optimizer_state=None, step=0, best_val_loss=None, meta=meta
    )


def weight_value_problems(tensors: dict[str, torch.Tensor], directory: Path) -> list[str]:
    """Weights a model can be: floating point (an int8 or quantized tensor cast to float would be other numbers)
    and finite (NaN weights generate nonsense with exit 0, and a run from them diverges at once)."""
    problems = []
    for name, t in tensors.items():
        if name.endswith(BUFFERS):
            continue
        if not t.is_floating_point():
            problems.append(
                f"{directory}: weight {name} is {str(t.dtype).removeprefix('torch.')}, not floating point "
                "(a quantized model is not read: use the unquantized weights)"
            )
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{directory}: weight {name} holds NaN or infinite values; the file is damaged")
    return problems[:8] + ([f"{directory}: ... and {len(problems) - 8} more"] if len(problems) > 8 else [])


def fit(loaded: LoadedCheckpoint, model: ModelConfig) -> LoadedCheckpoint:
    """A loaded Hugging Face model checked against the run's model config, one error per mismatch, its vocabulary
    grown to V."""
    if loaded.meta.get("format") != HF_FORMAT:
        return loaded
    cfg, state = without_zero_biases(loaded.meta["model_cfg"], loaded.model_state, model)
    loaded = dataclasses.replace(loaded, model_state=state, meta={**loaded.meta, "model_cfg": cfg})
    mapping = families.writing(cfg)
    raise_if_any(mapping.mismatches(cfg, model, str(Path(loaded.source) / "config.json")))
    if cfg.get("position") == "rope" and model.T != cfg["T"]:  # rotary positions hold no table: any T up to the
        cfg = {**cfg, "T": model.T}  # maximum (max_positions, which the export keeps) is the same weights
        loaded = dataclasses.replace(loaded, meta={**loaded.meta, "model_cfg": cfg})
    if model.V == cfg["V"]:
        return loaded
    log.info(
        "%s: embedding grown from %d to %d rows (model_cfg.V); the new rows start at the mean embedding",
        loaded.source,
        cfg["V"],
        model.V,
    )
    state = grow_vocab(loaded.model_state, model.V, cfg["tie_embeddings"])
    return dataclasses.replace(loaded, model_state=state, meta={**loaded.meta, "model_cfg": {**cfg, "V": model.V}})
