"""The checkpoint format: what a checkpoint directory holds, its sidecar read, verified and upgraded from older
versions (versions.py), canonical state dicts (tied tensors stored once), and the hashes that seal it.

A checkpoint is a directory of three files:
    model.safetensors  canonical weights (no wrapper prefixes), each tied tensor stored once
    optimizer.pt       the optimizer's state_dict, read back with torch.load(weights_only=True)
    meta.json          the sidecar and the truth about the checkpoint: format version, phase, run id, step,
                       best_val_loss, model_cfg, train_cfg, the config as given, the tokenizer, tied-weight
                       aliases, and the size and sha256 of the other two files. It is written last, so its presence
                       marks the directory complete, and its checksums catch truncation and flipped bytes alike.
Nothing here knows about phases beyond the name it is given.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from trainer_accel.config import (
    complete_model_cfg,
    model_cfg_problems,
)
from trainer_accel.fsio import (
    loads,
    sha256_of,
)
from trainer_accel.versions import upgrade

FORMAT = "trainer_accel.checkpoint"


FORMAT_VERSION = 4


def _v1_to_v2(meta: dict[str, Any]) -> dict[str, Any]:
    """Version 2 records every model option (activation and ln_eps arrived with it; version 1 sidecars may lack
    bias and tie_embeddings too) and the tokenizer file's path, which an export to Hugging Face needs."""
    if isinstance(meta.get("model_cfg"), dict):
        meta["model_cfg"] = complete_model_cfg(meta["model_cfg"])
    meta.setdefault("tokenizer_path", None)
    return meta


def _v2_to_v3(meta: dict[str, Any]) -> dict[str, Any]:
    """Version 3 seals the sidecar with its own sha256 (`sidecar_sha256`); a version 2 sidecar has no seal, so its
    loop state is checked by type and range alone."""
    return meta


def _v3_to_v4(meta: dict[str, Any]) -> dict[str, Any]:
    """Version 4 models may be Llama-family decoders (rotary positions, RMSNorm, a gated MLP, grouped-query
    attention: models/config.py); a version 3 model is GPT-2-style, which the new options' defaults describe. The
    version moved so that a trainer before them refuses such a checkpoint instead of building a GPT-2 from it."""
    if isinstance(meta.get("model_cfg"), dict):
        meta["model_cfg"] = complete_model_cfg(meta["model_cfg"])
    return meta


UPGRADES = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}  # version -> the step to the next (versions.py)


SEAL = "sidecar_sha256"


MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.safetensors", "optimizer.pt", "meta.json"


STEP_DIR = re.compile(r"^step_(\d{7,})$")


BEST_PT_KEYS = ("model_cfg", "train_cfg", "model_state", "optimizer_state", "step", "best_val_loss")


class InvalidCheckpoint(Exception):
    """A checkpoint that is incomplete or corrupt; the message says why."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def canonical_state(state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """Strip DDP/compile prefixes, move to CPU, and leave out the tied aliases (`tied`: {dropped key: kept key},
    found from the model by `full_state.tied_aliases`), which `expand_aliases` restores on load."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        key = key.replace("_orig_mod.", "")
        key = key[len("module.") :] if key.startswith("module.") else key
        if key not in tied:
            out[key] = t.detach().to("cpu").contiguous()
    return out


def expand_aliases(state: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    full = dict(state)
    for key, target in aliases.items():
        full[key] = full[target]
    return full


_hashes: dict[tuple[int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, hashed once per process: files are never changed in place, and latest/ and
    best/ are hard links to a step directory's files (same inode), so start-up checks do not re-read them. The
    file is opened once: latest/ may be replaced between a stat and a read of its path."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _hashes:
            _hashes[key] = sha256_of(f)
    return _hashes[key]


def sidecar_sha256(meta: dict[str, Any]) -> str:
    """The seal of a sidecar: the sha256 of everything in it but the seal, in one canonical JSON form. A hand edit
    (a step moved back from 280 to 5 beside step-280 weights, a best_val_loss that no later eval can beat) breaks it."""
    body = {k: v for k, v in meta.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _loss(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def loop_state_problems(meta: dict[str, Any]) -> list[str]:
    """The loop state a resume continues, checked by type and range (what a seal cannot vouch for: a sidecar of an
    older version, or one a bug wrote)."""
    step = meta.get("step")
    problems = [] if _whole(step) and step >= 0 else [f"step is {step!r}, not a whole number >= 0"]
    if meta.get("best_val_loss") is not None and not _loss(meta["best_val_loss"]):
        problems.append(f"best_val_loss is {meta['best_val_loss']!r}, not a finite loss >= 0 or null")
    last = meta.get("last_val_loss")  # NaN when the last eval measured nothing
    if last is not None and (isinstance(last, bool) or not isinstance(last, (int, float))):
        problems.append(f"last_val_loss is {last!r}, not a number or null")
    for key in ("tokens_seen", "skipped_steps", "global_batch"):
        if key in meta and not (_whole(meta[key]) and meta[key] >= (1 if key == "global_batch" else 0)):
            problems.append(f"{key} is {meta[key]!r}, not a whole number >= {1 if key == 'global_batch' else 0}")
    best_step = meta.get("best_val_step")
    if best_step is not None and not (_whole(best_step) and _whole(step) and 0 <= best_step <= step):
        problems.append(f"best_val_step is {best_step!r}, not a step between 0 and the checkpoint's step")
    for key in ("model_cfg", "train_cfg", "tied"):
        if key in meta and not isinstance(meta[key], dict):
            problems.append(f"{key} is {type(meta[key]).__name__}, not an object")
    return problems


def read_meta(ckpt: Path, verify: bool = True) -> dict[str, Any]:
    """The sidecar of a complete, intact checkpoint directory; raises InvalidCheckpoint saying why not."""
    meta_file = ckpt / META_FILE
    if not ckpt.is_dir():
        raise InvalidCheckpoint("not a directory")
    if not meta_file.is_file():
        raise InvalidCheckpoint(f"no {META_FILE} (an unfinished save)")
    try:
        meta = loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidCheckpoint(f"{META_FILE} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidCheckpoint(f"{META_FILE} is not a {FORMAT} sidecar")
    as_written = meta
    try:  # a newer version raises versions.NewerFormat, a UserError: refused, not set aside as broken
        meta = upgrade(meta, "format_version", FORMAT_VERSION, UPGRADES, str(ckpt), "checkpoint", meta_file)
    except ValueError as e:
        raise InvalidCheckpoint(str(e)) from None
    if as_written["format_version"] >= 3 and as_written.get(SEAL) != sidecar_sha256(as_written):
        raise InvalidCheckpoint(
            f"{META_FILE} was changed after the save (it does not match its {SEAL}); its step, "
            "losses and settings cannot be trusted"
        )
    for key in ("step", "model_cfg", "train_cfg", "best_val_loss", "phase", "run_id", "files"):
        if key not in meta:
            raise InvalidCheckpoint(f"{META_FILE} lacks '{key}'")
    problems = loop_state_problems(meta)
    if isinstance(meta.get("model_cfg"), dict):
        problems += model_cfg_problems(complete_model_cfg(meta["model_cfg"]), "model_cfg", known_only=True)
    if problems:
        raise InvalidCheckpoint(f"{META_FILE}: {'; '.join(problems)}")
    if not isinstance(meta["files"], dict):
        raise InvalidCheckpoint(f"{META_FILE} has a malformed 'files'")
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        expected = meta["files"].get(name)
        path = ckpt / name
        if expected is None or not path.is_file():
            raise InvalidCheckpoint(f"{name} is missing")
        if (
            not isinstance(expected, dict)
            or not _whole(expected.get("size"))
            or not isinstance(expected.get("sha256"), str)
        ):
            raise InvalidCheckpoint(f"{META_FILE}: files.{name} is not {{size, sha256}}")
        size = path.stat().st_size
        if size != expected["size"]:
            raise InvalidCheckpoint(f"{name} is {size} bytes, the sidecar says {expected['size']} (truncated?)")
        if verify and file_sha256(path) != expected["sha256"]:
            raise InvalidCheckpoint(f"{name} does not match its sha256 in the sidecar (corrupt)")
    return meta


def model_sha256(meta: dict) -> str | None:
    """The weights' identity: the sha256 of model.safetensors (for an exported .pt, the one its record carries)."""
    return (meta.get("files") or {}).get(MODEL_FILE, {}).get("sha256") or meta.get("model_sha256")
