"""What an adapter run adds to a start point and a checkpoint: the base's fingerprint (what it was loaded from and
the sha256 of its weights), the checks that an adapter continues on the base and settings it was trained with,
a PEFT directory read as one of our adapter checkpoints, and the NF4 step of the model's build.

An adapter checkpoint holds the adapter alone (its sidecar's `adapter` says with which settings and on which
base); training/start.py finds the base from that record and merges, so every command that runs a model runs
the base with the adapter on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from trainer_accel.checkpoints.loading import LoadedCheckpoint
from trainer_accel.errors import UserError
from trainer_accel.hf.peft import read_peft_dir
from trainer_accel.models import nf4
from trainer_accel.models.config import ModelConfig
from trainer_accel.models.lora import AdapterConfig, chosen_targets


def is_adapter(loaded: LoadedCheckpoint | None) -> bool:
    return loaded is not None and isinstance(loaded.meta.get("adapter"), dict)


def adapter_config_of(loaded: LoadedCheckpoint) -> AdapterConfig:
    return AdapterConfig.from_dict(loaded.meta["adapter"]["config"])


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """The identity of a set of weights, whatever file they came from: each tensor's name, dtype, shape and bytes,
    in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the tensor's own bytes, not a copy
    return h.hexdigest()


def base_record(base: LoadedCheckpoint) -> dict[str, Any]:
    """What an adapter checkpoint records of its base: enough to find it again and to know it is the same."""
    source = Path(base.origin or base.source).resolve()
    return {
        "source": str(source),  # the step directory behind a best/ or latest/: it does not move on
        "given": str(Path(base.source).resolve()),  # as the run named it (if the step directory was pruned)
        "sha256": weights_sha256(base.model_state),
        "step": base.step,
        "phase": base.meta.get("phase"),
        "run_id": base.meta.get("run_id"),
    }


def recorded_base(loaded: LoadedCheckpoint) -> Path | None:
    """Where the adapter's base was: its step directory, else the path the run named (the hash decides)."""
    record = loaded.meta["adapter"].get("base") or {}
    places = [Path(p) for p in (record.get("source"), record.get("given")) if p]
    return next((p for p in places if p.exists()), places[0] if places else None)


def base_problems(adapter: LoadedCheckpoint, base: LoadedCheckpoint, record: dict[str, Any]) -> list[str]:
    """An adapter goes on only on the base it was trained on (one that records no hash, a PEFT import, is taken
    as given)."""
    saved = (adapter.meta["adapter"].get("base") or {}).get("sha256")
    if saved is None or saved == record["sha256"]:
        return []
    was = adapter.meta["adapter"]["base"].get("source")
    return [
        f"{adapter.source}: this adapter was trained on the base {was} (weights sha256 {saved[:12]}), but this "
        f"run's base {base.source} holds other weights ({record['sha256'][:12]}); give it the base it was trained "
        "on (adapter.base or init_from), or start a new adapter (--no-resume)"
    ]


def settings_problems(loaded: LoadedCheckpoint, now: AdapterConfig, model: ModelConfig) -> list[str]:
    """An adapter goes on with the shape and scaling it was trained with (dropout may change)."""
    was = adapter_config_of(loaded)
    diffs = [
        f"{key} {a} vs {b}"
        for key, a, b in (
            ("r", was.r, now.r),
            ("alpha", was.alpha, now.alpha),
            ("rslora", was.rslora, now.rslora),
            ("quantize_base", was.quantize_base, now.quantize_base),
            (
                "target_modules",
                sorted({t.name for t in chosen_targets(was, model)}),
                sorted({t.name for t in chosen_targets(now, model)}),
            ),
        )
        if a != b
    ]
    if not diffs:
        return []
    return [f"{loaded.source}: the adapter differs from the config's adapter section ({'; '.join(diffs)}; adapter vs "
            "config); set the section as the adapter was trained, or start a new adapter"]  # fmt: skip


def load_peft_adapter(path: Path, model: ModelConfig) -> LoadedCheckpoint:
    """A PEFT adapter directory as an adapter checkpoint of step 0 (no optimizer state: it goes on fresh)."""
    adapter, state, base = read_peft_dir(path, model)
    meta = {
        "model_cfg": model.to_dict(),
        "phase": None,
        "run_id": None,
        "adapter": {"config": adapter.to_dict(), "base": {"source": base, "sha256": None}, "format": "peft"},
    }
    return LoadedCheckpoint(Path(path), state, None, 0, None, meta)


def base_quantizers(adapter: AdapterConfig) -> list:
    """The after-load steps of models/build.py that an adapter config asks for (its NF4 base)."""
    return [nf4.quantize_base] if adapter.quantize_base == "nf4" else []


def merge_base(base_state: dict[str, torch.Tensor], adapter: AdapterConfig) -> dict[str, torch.Tensor]:
    """The weights an export merges into: the original base, or (merge_into "dequantized") what its NF4 copy
    computed with while the adapter trained."""
    if adapter.quantize_base != "nf4" or adapter.merge_into == "original":
        return base_state
    return {
        k: nf4.dequantized(v).to(v.dtype) if k.startswith("blocks.") and v.dim() == 2 and nf4.quantizable(v) else v
        for k, v in base_state.items()
    }


def require_adapter_base(loaded: LoadedCheckpoint, base: Path | None) -> Path:
    if base is None:
        raise UserError(f"{loaded.source}: an adapter that names no base it was trained on; set adapter.base")
    if not base.exists():
        raise UserError(
            f"{loaded.source}: an adapter checkpoint holds the adapter alone, and its base {base} is not there; put "
            "the base back there (or name it in adapter.base)"
        )
    return base
