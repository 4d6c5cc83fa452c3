"""PEFT's LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`), written from an adapter
checkpoint and read as a start point, exactly.

PEFT names a weight `base_model.model.<the Hugging Face module>.lora_A.weight`; ours is
`blocks.i.<our linear>.lora_A.<PEFT's module name>` (models/lora.py), so each of PEFT's modules is one of our
targets and nothing is split or stacked. What the file holds is what vLLM's loader accepts: the required fields,
only `lora_A`/`lora_B` keys, `bias` none, no `modules_to_save`. What we cannot represent exactly (DoRA, per-layer
ranks, regex targets, trained biases, extra modules) is refused on import, one line each, never approximated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer_accel.errors import UserError, raise_if_any
from trainer_accel.fsio import FILE_MODE, fsync_dir, fsync_file, loads, swap_into_place, write_atomic
from trainer_accel.hf.directory import EXPORT_RECORD
from trainer_accel.models import families
from trainer_accel.models.build import expected_shapes
from trainer_accel.models.config import ModelConfig
from trainer_accel.models.lora import ALL_LINEAR, AdapterConfig, chosen_targets, family_targets, lora_converter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECORD_FORMAT = "trainer_accel.export.peft"
PREFIX = "base_model.model."
# settings PEFT may write that change nothing we compute when they hold these values
NEUTRAL = {
    "use_dora": (False, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "bias": ("none",),
    "exclude_modules": (None, []),
    "trainable_token_indices": (None,),
}


def is_peft_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def _names(model: ModelConfig) -> dict[str, str]:
    """Our adapter names -> PEFT's, for both matrices of every target of every block."""
    mapping = families.writing(model.to_dict())
    out = {}
    for i in range(model.L):
        for t in family_targets(model):
            for m in ("lora_A", "lora_B"):
                out[f"blocks.{i}.{t.module}.{m}.{t.name}"] = f"{PREFIX}{mapping.HF_BLOCKS}.{i}.{t.hf_module}.{m}.weight"
    return out


def peft_config(adapter: AdapterConfig, model: ModelConfig, base: str) -> dict[str, Any]:
    names = sorted({t.name for t in chosen_targets(adapter, model)})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": adapter.r,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": names,
        "use_rslora": adapter.rslora,
        "bias": "none",
        "modules_to_save": None,
        "fan_in_fan_out": families.writing(model.to_dict()).HF_BLOCKS == "transformer.h",  # GPT-2's Conv1D layers
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_tensors(adapter_state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    names = _names(model)
    return {names[k]: v.float().contiguous() for k, v in adapter_state.items()}


def check_peft_out(out: Path) -> None:
    """--out may be new, empty, or an earlier PEFT export of ours (it is replaced whole); a directory with anything
    else in it is the user's and is refused before anything is written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a directory")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return
    ours = set(present) <= {ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_RECORD}
    try:
        ours = ours and loads((out / EXPORT_RECORD).read_text()).get("format") == RECORD_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        listed = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise UserError(
            f"--out {out}: a directory with other files in it ({listed}), not an earlier PEFT export of this trainer; "
            "nothing was written: choose a new or empty directory"
        )


def write_peft_dir(
    out: Path,
    adapter: AdapterConfig,
    adapter_state: dict[str, torch.Tensor],
    model: ModelConfig,
    base: str,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Write the adapter directory whole (a temporary directory renamed into place), then read it back as an
    import would and check that it holds exactly these tensors; returns the config written."""
    check_peft_out(out)
    config = peft_config(adapter, model, base)
    tensors = peft_tensors(adapter_state, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        os.chmod(tmp / ADAPTER_WEIGHTS, FILE_MODE)
        fsync_file(tmp / ADAPTER_WEIGHTS)
        write_atomic(tmp / ADAPTER_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
        write_atomic(tmp / EXPORT_RECORD, (json.dumps({"format": RECORD_FORMAT, **record}, indent=2) + "\n").encode())
        fsync_dir(tmp)
        back_cfg, back, _ = read_peft_dir(tmp, model)
        if (
            back_cfg.r != adapter.r
            or set(back) != set(adapter_state)
            or any(not torch.equal(back[k], adapter_state[k].float()) for k in back)
        ):
            raise UserError(f"{out}: the adapter read back differs from the one written; nothing was exported")
        swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
    return config


def read_peft_base(path: Path) -> str | None:
    """The base_model_name_or_path an adapter directory names (None if none, or unreadable)."""
    try:
        base = loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def read_peft_dir(path: Path, model: ModelConfig) -> tuple[AdapterConfig, dict[str, torch.Tensor], str | None]:
    """A PEFT LoRA directory -> (its settings as our adapter config, its tensors under our names, its
    base_model_name_or_path). Everything it holds must map onto `model` exactly."""
    path = Path(path)
    try:
        config = loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / ADAPTER_CONFIG}: cannot be read as JSON ({type(e).__name__})") from None
    where = str(path / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a JSON object")
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"{where}: peft_type is {json.dumps(config.get('peft_type'))}; only LORA adapters load here")
    if config.get("task_type") not in ("CAUSAL_LM", None):
        problems.append(f"{where}: task_type is {json.dumps(config.get('task_type'))}, expected CAUSAL_LM")
    for key, allowed in NEUTRAL.items():
        if key in config and config[key] not in allowed:
            problems.append(f"{where}: {key} is {json.dumps(config[key])}; only {json.dumps(allowed[0])} is computed "
                            "exactly here")  # fmt: skip
    tm = config.get("target_modules")
    if tm != ALL_LINEAR and not (isinstance(tm, list) and all(isinstance(n, str) for n in tm)):
        problems.append(f"{where}: target_modules is {json.dumps(tm)}; expected a list of module names (a regular "
                        f'expression is not read) or "{ALL_LINEAR}"')  # fmt: skip
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
        problems.append(f"{where}: r and lora_alpha must be numbers (r a whole number >= 1), got {r!r}, {alpha!r}")
    raise_if_any(problems)
    adapter = AdapterConfig(
        r=r,
        alpha=float(alpha),
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=tm if tm == ALL_LINEAR else tuple(tm),
        rslora=bool(config.get("use_rslora", False)),
    )
    try:
        targets = chosen_targets(adapter, model)
    except ValueError as e:
        raise UserError(f"{where}: target_modules: {e}") from None
    weights = path / ADAPTER_WEIGHTS
    try:
        theirs = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: unreadable adapter weights ({e})") from None
    ours_of = {v: k for k, v in _names(model).items()}
    unknown = [k for k in theirs if k not in ours_of]
    if unknown:
        raise UserError(f"{weights}: {len(unknown)} tensors are no LoRA matrix of this model's targets (first: "
                        f"{unknown[0]}); only lora_A and lora_B of {', '.join(sorted({t.name for t in targets}))} "
                        "are read")  # fmt: skip
    state = {ours_of[k]: v.float() for k, v in theirs.items()}
    wanted = {
        f"blocks.{i}.{t.module}.{m}.{t.name}" for i in range(model.L) for t in targets for m in ("lora_A", "lora_B")
    }
    expected = expected_shapes(model, [lora_converter(adapter, model)])
    theirs_of = _names(model)
    problems = [f"{weights}: lacks {theirs_of[k]}" for k in sorted(wanted - set(state))[:3]]
    problems += [f"{weights}: holds {k} for a module target_modules does not name" for k in sorted(set(state) - wanted)]
    problems += [
        f"{weights}: {k} is {list(v.shape)}, expected {list(expected[k])} (r={adapter.r})"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    raise_if_any(problems)
    base = config.get("base_model_name_or_path")
    return adapter, state, base if isinstance(base, str) and base else None
