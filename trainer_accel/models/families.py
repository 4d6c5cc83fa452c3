"""Which Hugging Face mapping reads and writes which model: a config.json's model_type picks the mapping that
reads it, a model_cfg's options the one that writes it. Each mapping module (gpt_hf, llama_hf) offers the
functions `FamilyMapping` declares (a module satisfies the Protocol as a class would; tested), so a new family is
one module beside them and one entry in MAPPINGS.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from trainer_accel.errors import UserError
from trainer_accel.models import gpt_hf, llama_hf
from trainer_accel.models.config import ModelConfig


class FamilyMapping(Protocol):
    """A family's Hugging Face mapping: config.json and state-dict names both ways, pure functions."""

    def model_cfg_from_hf(self, hf: dict[str, Any], where: str) -> dict[str, Any]: ...

    def state_from_hf(
        self, tensors: dict[str, torch.Tensor], model_cfg: dict[str, Any], where: str
    ) -> dict[str, torch.Tensor]: ...

    def mismatches(self, hf_cfg: dict[str, Any], model: ModelConfig, where: str) -> list[str]: ...

    def unrepresentable(self, model_cfg: dict[str, Any]) -> list[str]: ...

    # adapters (models/lora.py, hf/peft.py): the modules PEFT names, where block i's modules are, PEFT's default
    HF_BLOCKS: str
    DEFAULT_ADAPTER_TARGETS: tuple[str, ...]

    def adapter_targets(self, m: ModelConfig) -> list[tuple[str, str, int, int, str]]: ...

    def hf_config(self, model_cfg: dict[str, Any], special: dict[str, int], eos: str, pad: str) -> dict[str, Any]: ...

    def state_to_hf(self, state: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> dict[str, torch.Tensor]: ...


MAPPINGS: dict[str, FamilyMapping] = {"gpt2": gpt_hf, **dict.fromkeys(llama_hf.MODEL_TYPES, llama_hf)}


def reading(hf: Any, where: str) -> FamilyMapping:
    """The mapping for a config.json; anything else (an unknown model_type, MoE families, encoders) is refused."""
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    if not isinstance(kind, str) or kind not in MAPPINGS:
        raise UserError(
            f"{where}: model_type {json.dumps(kind)} is not a family this trainer computes (it reads "
            f"{', '.join(MAPPINGS)})"
        )
    return MAPPINGS[kind]


def writing(model_cfg: dict[str, Any]) -> FamilyMapping:
    """The mapping an export writes a model through: GPT-2 for learned positions with LayerNorm and a plain MLP,
    the Llama family for anything with rotary positions, RMSNorm or a gated MLP."""
    return llama_hf if llama_hf.is_llama_like(model_cfg) else gpt_hf


def model_cfg_from_hf(hf: Any, where: str) -> dict[str, Any]:
    return reading(hf, where).model_cfg_from_hf(hf, where)
