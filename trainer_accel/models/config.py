"""The model's configuration: the options that say which network a model is and what its weights compute, and
their checks. Every checkpoint records it; resume and every start point are checked against it.

Each option's default is what a GPT-2 model of this trainer computes, so a model_cfg an older trainer recorded
reads as the model it was (complete_model_cfg).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from trainer_accel.schema import build_dataclass, type_ok

MODEL_SHAPE_KEYS = ("V", "T", "C", "L", "H", "d_ff")
MAX_DIM = 2**31 - 1  # what torch takes as one dimension everywhere
ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("plain", "gated")
ROPE_SCALING_TYPES = ("llama3",)  # the rope scalings computed exactly; any other is refused, never approximated
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# with the shape: what the weights mean (a checkpoint that differs in any of these is refused on resume)
MODEL_FUNCTION_KEYS = (
    "bias",
    "tie_embeddings",
    "activation",
    "ln_eps",
    "position",
    "rope_theta",
    "rope_scaling",
    "norm",
    "mlp",
    "n_kv_heads",
    "head_dim",
    "qkv_bias",
    "qk_norm",
)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT; stored in every checkpoint and checked on resume."""

    V: int  # vocabulary size (at least the tokenizer's vocabulary)
    T: int  # context length: the longest sequence the model sees
    C: int  # width of the residual stream (embedding size)
    L: int  # number of transformer blocks
    H: int  # attention heads per block; C must be divisible by H
    d_ff: int  # hidden width of each block's MLP
    dropout: float = 0.0  # dropout on attention weights and residual branches while training
    bias: bool = False  # biases in Linear and LayerNorm layers
    tie_embeddings: bool = True  # output projection shares the token embedding matrix (stored once)
    activation: str = "gelu"  # MLP activation: "gelu" (exact, erf), "gelu_tanh" (GPT-2's gelu_new) or "silu"
    ln_eps: float = 1e-5  # epsilon of every norm (GPT-2's layer_norm_epsilon, Llama's rms_norm_eps)
    # The options below arrived with the Llama family; each default is what a GPT-2 model computes.
    position: str = "learned"  # "learned": a table of T positions (GPT-2); "rope": rotary positions (Llama, Qwen)
    rope_theta: float = 10000.0  # rotary base (position "rope")
    # rotary frequency scaling: null, or Llama 3.1/3.2's {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} as their config.json gives it
    rope_scaling: dict | None = None
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama, Qwen)
    mlp: str = "plain"  # "plain": down(act(up x)); "gated": down(act(gate x) * up x), SwiGLU with activation "silu"
    n_kv_heads: int | None = None  # key/value heads, fewer than H for grouped-query attention; null: H
    head_dim: int | None = None  # width of one head; null: C / H (Qwen3 sets its own)
    qkv_bias: bool = False  # biases on the q, k and v projections alone (Qwen2); `bias` puts them everywhere
    qk_norm: bool = False  # a norm on each head's q and k before the rotation (Qwen3)
    max_positions: int | None = None  # the longest context the model was made for (max_position_embeddings), kept
    # for export; rope models train at any T up to it; null: T
    architecture: str | None = None  # the Hugging Face architecture it came from ("Qwen3ForCausalLM"), which an
    # export keeps while the options still match it; null: chosen from the options
    # Mistral's attention window: each token sees the last sliding_window tokens. This decoder's attention sees the
    # whole row, which is the same while T <= sliding_window (checked); kept for export. null: no window
    sliding_window: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The options; sliding_window only when set, so the record (and fingerprint) of every model without one is
        what it was before the option existed."""
        out = dataclasses.asdict(self)
        if out["sliding_window"] is None:
            del out["sliding_window"]
        return out

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.H

    @property
    def hd(self) -> int:
        """The width of one attention head."""
        return self.head_dim or self.C // self.H


def model_problems(m: ModelConfig, where: str) -> list[str]:
    out = [
        f"{where}.{k}: must be a positive integer, got {getattr(m, k)}" for k in MODEL_SHAPE_KEYS if getattr(m, k) <= 0
    ]
    out += [
        f"{where}.{k}: must be at most {MAX_DIM:,} (a tensor dimension), got {getattr(m, k):,}"
        for k in MODEL_SHAPE_KEYS
        if getattr(m, k) > MAX_DIM
    ]
    if m.head_dim is None and m.C > 0 and m.H > 0 and m.C % m.H:
        out.append(f"{where}.C: width {m.C} must be divisible by the number of heads H={m.H} (or set head_dim)")
    if not 0.0 <= m.dropout < 1.0:
        out.append(f"{where}.dropout: must be in [0, 1), got {m.dropout}")
    for key, allowed in (("activation", ACTIVATIONS), ("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
        if getattr(m, key) not in allowed:
            out.append(f"{where}.{key}: expected one of {', '.join(allowed)}, got {json.dumps(getattr(m, key))}")
    if not (math.isfinite(m.ln_eps) and 0.0 < m.ln_eps < 1.0):
        out.append(f"{where}.ln_eps: must be in (0, 1), got {m.ln_eps}")
    for key in ("n_kv_heads", "head_dim", "max_positions", "sliding_window"):
        value = getattr(m, key)
        if value is not None and not 0 < value <= MAX_DIM:
            out.append(f"{where}.{key}: must be a positive integer or null, got {value}")
    if m.n_kv_heads is not None and m.n_kv_heads > 0 and m.H > 0 and m.H % m.n_kv_heads:
        out.append(
            f"{where}.n_kv_heads: {m.n_kv_heads} must divide the number of heads H={m.H} (each key/value head "
            "serves the same number of query heads)"
        )
    out += _position_problems(m, where)
    return out


def _position_problems(m: ModelConfig, where: str) -> list[str]:
    if m.position != "rope":
        return [
            f'{where}.{key}: only for rotary positions (position "rope"); learned positions have a table of T={m.T}'
            for key in ("rope_scaling", "max_positions", "sliding_window")
            if getattr(m, key) is not None
        ]
    out = []
    if not (math.isfinite(m.rope_theta) and m.rope_theta > 0):
        out.append(f"{where}.rope_theta: must be a positive number, got {m.rope_theta}")
    if m.hd > 0 and m.hd % 2:
        out.append(
            f"{where}.head_dim: rotary positions turn pairs of features, so the head width must be even, got {m.hd}"
        )
    if m.max_positions is not None and 0 < m.max_positions < m.T:
        out.append(f"{where}.T: {m.T} is longer than the model's own context max_positions={m.max_positions}")
    if m.sliding_window is not None and 0 < m.sliding_window < m.T:
        out.append(
            f"{where}.T: {m.T} is longer than the model's attention window sliding_window={m.sliding_window}, "
            "which this trainer does not compute (its attention sees the whole row); set T to at most "
            f"{m.sliding_window}"
        )
    if m.rope_scaling is not None:
        out += rope_scaling_problems(m.rope_scaling, f"{where}.rope_scaling")
    return out


def rope_scaling_problems(scaling: Any, where: str) -> list[str]:
    """A rope scaling this trainer computes exactly (Llama 3's), with its numbers in range; anything else refused."""
    if not isinstance(scaling, dict):
        return [f"{where}: expected an object or null, got {json.dumps(scaling)}"]
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_TYPES:
        return [
            f"{where}: rope_type {json.dumps(kind)} is not computed by this trainer (it computes "
            f"{', '.join(ROPE_SCALING_TYPES)}); refused rather than approximated"
        ]
    out = []
    for key in LLAMA3_SCALING_KEYS:
        value = scaling.get(key)
        if not type_ok(value, float) or value <= 0:
            out.append(f"{where}.{key}: expected a positive number, got {json.dumps(value)}")
    extra = sorted(set(scaling) - {"rope_type", "type", *LLAMA3_SCALING_KEYS})
    if extra:
        out.append(f'{where}: unknown key{"s" * (len(extra) > 1)} {", ".join(extra)} for rope_type "llama3"')
    if not out and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        out.append(
            f"{where}: low_freq_factor {scaling['low_freq_factor']} must be below high_freq_factor "
            f"{scaling['high_freq_factor']}"
        )
    return out


def model_cfg_problems(data: Any, where: str, known_only: bool = False) -> list[str]:
    """The config's own check of a model_cfg, for one read from a file a past run or another tool wrote (a sidecar, a
    .pt): types first, then ranges. `known_only`: options a later trainer may have added are the reader's to judge."""
    problems: list[str] = []
    if known_only and isinstance(data, dict):
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        data = {k: v for k, v in data.items() if k in known}
    model = build_dataclass(ModelConfig, data, where, problems)
    if model is not None and not problems:
        problems += model_problems(model, where)
    return problems


def complete_model_cfg(saved: dict[str, Any]) -> dict[str, Any]:
    """A model_cfg as an older trainer recorded it, with the options it did not know yet at their defaults: the
    defaults are what every earlier trainer computed (no biases, tied head, exact GELU, epsilon 1e-5)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    return {**defaults, **saved}


def resolved_model_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A complete model_cfg with its nulls that stand for a value resolved (n_kv_heads null is H, head_dim null is
    C / H), so two configs that mean the same model compare equal."""
    cfg = complete_model_cfg(model_cfg)
    H, C = cfg.get("H"), cfg.get("C")
    if cfg.get("n_kv_heads") is None:
        cfg["n_kv_heads"] = H
    if cfg.get("head_dim") is None and isinstance(C, int) and isinstance(H, int) and H > 0:
        cfg["head_dim"] = C // H
    return cfg
