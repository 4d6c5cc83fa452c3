"""Which Hugging Face mapping reads and writes which model: a config.json's model_type picks the mapping that
reads it, a model_cfg's options the one that writes it. Each mapping module (gpt_hf, llama_hf) offers the same
functions: model_cfg_from_hf, state_from_hf, mismatches, unrepresentable, hf_config, state_to_hf.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from trainer_accel.errors import UserError
from trainer_accel.models import gpt_hf, llama_hf

MAPPINGS: dict[str, ModuleType] = {"gpt2": gpt_hf, **dict.fromkeys(llama_hf.MODEL_TYPES, llama_hf)}


def reading(hf: Any, where: str) -> ModuleType:
    """The mapping for a config.json; anything else (an unknown model_type, MoE families, encoders) is refused."""
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    if not isinstance(kind, str) or kind not in MAPPINGS:
        raise UserError(
            f"{where}: model_type {json.dumps(kind)} is not a family this trainer computes (it reads "
            f"{', '.join(MAPPINGS)})"
        )
    return MAPPINGS[kind]


def writing(model_cfg: dict[str, Any]) -> ModuleType:
    """The mapping an export writes a model through: GPT-2 for learned positions with LayerNorm and a plain MLP,
    the Llama family for anything with rotary positions, RMSNorm or a gated MLP."""
    return llama_hf if llama_hf.is_llama_like(model_cfg) else gpt_hf


def model_cfg_from_hf(hf: Any, where: str) -> dict[str, Any]:
    return reading(hf, where).model_cfg_from_hf(hf, where)
