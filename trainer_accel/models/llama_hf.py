"""Our decoder as a Hugging Face Llama, Mistral, Qwen2 or Qwen3 and back: config.json and the state dict, exactly.

The four families are one computation with switches (rotary positions, RMSNorm, SwiGLU, grouped-query
attention), so one mapping serves them:
    ours                              transformers *ForCausalLM
    tok_emb                           model.embed_tokens
    blocks.i.ln1 / ln2                model.layers.i.input_layernorm / post_attention_layernorm
    blocks.i.attn.qkv                 self_attn.q_proj, k_proj, v_proj stacked (rows: q, then k, then v)
    blocks.i.attn.q_norm / k_norm     self_attn.q_norm / k_norm                       (Qwen3)
    blocks.i.attn.proj                self_attn.o_proj
    blocks.i.mlp.up                   mlp.gate_proj, up_proj stacked (rows: gate, then up)
    blocks.i.mlp.down                 mlp.down_proj
    ln_f, lm_head                     model.norm, lm_head (left out of the file when tied)
    qkv_bias                          Qwen2's q/k/v biases (Qwen2 always has them; the others never)
    qk_norm, head_dim                 Qwen3's q_norm/k_norm and its head_dim
    rope_theta, rope_scaling          rope_theta / rope_scaling (transformers 4) or rope_parameters (5)
    n_kv_heads, max_positions         num_key_value_heads, max_position_embeddings
Hugging Face stores Llama's q and k in the half-split rotary layout our model computes (models/gpt.rotate), so
no row is permuted. A key config.json leaves out means what it means to transformers (FAMILY_DEFAULTS: Mistral's
4,096-token window, Qwen3's head_dim 128). What the decoder cannot compute exactly is refused, one line per
setting: a sliding window shorter than the run's T (Mistral's window is the whole context up to its length, so
a T within it is exact), per-layer windows, another rope scaling, partial rotary, biases on o_proj or the MLP,
mixture-of-experts.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from trainer_accel.errors import UserError
from trainer_accel.models.config import (
    ModelConfig,
    complete_model_cfg,
    resolved_model_cfg,
    rope_scaling_problems,
)

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
MODEL_TYPES = tuple(ARCHITECTURES)
ACTIVATION_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
ACTIVATION_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# What each family's transformers config class takes for a key its config.json leaves out (None: derived, as
# transformers derives it: num_key_value_heads from num_attention_heads, head_dim from hidden_size / heads).
# tests/test_model_families.py compares every value with the installed transformers' config classes.
COMMON_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
FAMILY_DEFAULTS = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "head_dim": None,
        "max_position_embeddings": 2048,
        "sliding_window": None,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": None,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": None,
        "max_position_embeddings": 32768,
        "sliding_window": None,
    },
    "qwen3": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "sliding_window": None,
    },
}
# what the family's own model computes, beside what every one of them computes (rope, rmsnorm, gated, no bias)
FAMILY_SWITCHES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
BLOCK_NORMS = (
    ("ln1.weight", "input_layernorm.weight"),
    ("ln2.weight", "post_attention_layernorm.weight"),
    ("attn.proj.weight", "self_attn.o_proj.weight"),
    ("mlp.down.weight", "mlp.down_proj.weight"),
)
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
CONFIG_NAMES = {
    "V": "vocab_size",
    "T": "max_position_embeddings",
    "C": "hidden_size",
    "L": "num_hidden_layers",
    "H": "num_attention_heads",
    "d_ff": "intermediate_size",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "tie_embeddings": "tie_word_embeddings",
    "activation": "hidden_act",
    "ln_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "qkv_bias": "q/k/v biases (Qwen2)",
    "qk_norm": "q/k norm (Qwen3)",
    "max_positions": "max_position_embeddings",
    "sliding_window": "sliding_window",
    "position": "position encoding",
    "norm": "norm",
    "mlp": "MLP",
    "bias": "biases",
}


def is_llama_like(model_cfg: dict[str, Any]) -> bool:
    cfg = complete_model_cfg(model_cfg)
    return cfg["position"] == "rope" or cfg["norm"] == "rmsnorm" or cfg["mlp"] == "gated"


def rope_of(hf: dict[str, Any]) -> tuple[Any, Any]:
    """(theta, scaling or None) from either form a config.json carries: transformers 5's `rope_parameters`, or the
    `rope_theta` and `rope_scaling` that configs written before it (every model on the Hub today) hold."""

    def plain(scaling: Any) -> bool:  # rope_type "default" is the plain rotation, whatever else the dict holds
        return scaling is None or (
            isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default"
        )

    params = hf.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    legacy = hf.get("rope_scaling")
    scaling = legacy if not plain(legacy) else {k: v for k, v in params.items() if k != "rope_theta"} or None
    return theta, None if plain(scaling) else scaling


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def refusals(hf: dict[str, Any], where: str) -> list[str]:
    """The settings of a config.json that this trainer cannot compute exactly, and values of the wrong type."""
    kind = hf.get("model_type")
    out = [
        f"{where}: {key} is {json.dumps(hf[key])}, expected a positive integer"
        for key in POSITIVE_INTS
        if key in hf and not _whole(hf[key])
    ]
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        if hf.get(key) is not None and not _whole(hf[key]):
            out.append(f"{where}: {key} is {json.dumps(hf[key])}, expected a positive integer or null")
    archs = hf.get("architectures")
    if archs is not None and archs != [ARCHITECTURES[kind]]:
        out.append(
            f"{where}: architectures {json.dumps(archs)}; model_type {json.dumps(kind)} is read as "
            f'["{ARCHITECTURES[kind]}"] only'
        )
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
        out.append(f"{where}: layer_types is {json.dumps(types)}, expected a list of strings or null")
        types = None
    for key in ("hidden_act", "model_type"):
        if key in hf and not isinstance(hf[key], str):
            out.append(f"{where}: {key} is {json.dumps(hf[key])}, expected a string")
    for key in ("use_sliding_window", "attention_bias", "mlp_bias"):
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            out.append(f"{where}: {key} is {json.dumps(hf[key])}, expected true or false")
    if out:
        return out
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in types or []):
        out.append(
            f"{where}: sliding-window attention in some layers (use_sliding_window, layer_types; "
            f"sliding_window {json.dumps(window)}) is not computed by this trainer; refused rather than "
            "approximated"
        )
    if kind == "mistral" and window is not None and not _whole(window):
        out.append(f"{where}: sliding_window is {json.dumps(window)}, expected a positive integer or null")
    if hf.get("attention_bias") and kind != "qwen2":
        out.append(f"{where}: attention_bias true (biases on o_proj too) is not computed by this trainer")
    if hf.get("mlp_bias"):
        out.append(f"{where}: mlp_bias true is not computed by this trainer")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        out.append(f"{where}: partial_rotary_factor {hf['partial_rotary_factor']} is not computed (only 1.0)")
    out += [
        f"{where}: {key} {json.dumps(hf[key])}: mixture-of-experts is not computed by this trainer"
        for key in MOE_KEYS
        if hf.get(key)
    ]
    act = hf.get("hidden_act") or "silu"
    if act not in ACTIVATION_FROM_HF:
        out.append(
            f"{where}: hidden_act {json.dumps(act)} is not one this trainer computes ({', '.join(ACTIVATION_FROM_HF)})"
        )
    theta, scaling = rope_of(hf)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        out.append(f"{where}: rope_theta is {json.dumps(theta)}, expected a positive number")
    if scaling is not None:
        out += rope_scaling_problems(scaling, f"{where}: rope_scaling")
    eps = hf.get("rms_norm_eps") or 1e-6
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        out.append(f"{where}: rms_norm_eps is {json.dumps(eps)}, expected a number in (0, 1)")
    if not isinstance(hf.get("tie_word_embeddings", False), bool):
        out.append(f"{where}: tie_word_embeddings is {json.dumps(hf['tie_word_embeddings'])}, expected true or false")
    return out


def family_value(hf: dict[str, Any], key: str) -> Any:
    """A config.json value as transformers reads it: the file's, else the family's default (FAMILY_DEFAULTS);
    a null that transformers replaces with its default is replaced here too."""
    defaults = {**COMMON_DEFAULTS, **FAMILY_DEFAULTS[hf.get("model_type")]}
    value = hf.get(key, defaults[key])
    if value is None and key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "hidden_act",
    ):
        value = defaults[key]
    return value


def model_cfg_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Our model_cfg for a Llama-family config.json (model_type llama, mistral, qwen2 or qwen3); a key it leaves out
    takes the family's transformers default."""
    kind = hf.get("model_type")
    problems = refusals(hf, where)
    if problems:
        raise UserError(problems)
    theta, scaling = rope_of(hf)
    qkv_bias, qk_norm = FAMILY_SWITCHES[kind]
    C, H = family_value(hf, "hidden_size"), family_value(hf, "num_attention_heads")
    head_dim = family_value(hf, "head_dim") or (C // H if C % H == 0 else None)
    if head_dim is None:
        raise UserError(
            f"{where}: hidden_size {C} is not divisible by num_attention_heads {H} and no head_dim is given"
        )
    T = family_value(hf, "max_position_embeddings")
    window = family_value(hf, "sliding_window") if kind == "mistral" else None
    return complete_model_cfg(
        {
            "V": family_value(hf, "vocab_size"),
            "C": C,
            "L": family_value(hf, "num_hidden_layers"),
            "H": H,
            "d_ff": family_value(hf, "intermediate_size"),
            "bias": False,
            "tie_embeddings": family_value(hf, "tie_word_embeddings"),
            "activation": ACTIVATION_FROM_HF[family_value(hf, "hidden_act")],
            "ln_eps": float(family_value(hf, "rms_norm_eps")),
            "position": "rope",
            "rope_theta": float(theta),
            "rope_scaling": dict(scaling) if scaling else None,
            "norm": "rmsnorm",
            "mlp": "gated",
            "n_kv_heads": family_value(hf, "num_key_value_heads") or H,
            "head_dim": head_dim,
            "qkv_bias": qkv_bias,
            "qk_norm": qk_norm,
            "max_positions": T,
            "architecture": ARCHITECTURES[kind],
            # a window computes the whole context up to its length: the directory's own context is that much of it
            "T": min(T, window) if window else T,
            "sliding_window": window,
        }
    )


def family_of(model_cfg: dict[str, Any]) -> str:
    """The model_type a Llama-style model exports as: the architecture it came in as when that still computes what
    it computes, else the family whose switches match (Qwen3 for a q/k norm, Qwen2 for q/k/v biases, else Llama)."""
    cfg = complete_model_cfg(model_cfg)
    switches = (cfg["qkv_bias"], cfg["qk_norm"])
    recorded = next((k for k, a in ARCHITECTURES.items() if a == cfg.get("architecture")), None)
    if recorded is not None and FAMILY_SWITCHES[recorded] == switches:
        return recorded
    return next(k for k in ("llama", "qwen2", "qwen3") if FAMILY_SWITCHES[k] == switches)


def unrepresentable(model_cfg: dict[str, Any]) -> list[str]:
    """Why a model cannot be written as a Llama-family model, one line per option (empty: it can)."""
    cfg = complete_model_cfg(model_cfg)
    need = {"position": "rope", "norm": "rmsnorm", "mlp": "gated", "bias": False}
    out = [
        f"model_cfg.{k}={json.dumps(cfg[k])}: a Llama-family model has {json.dumps(v)}"
        for k, v in need.items()
        if cfg[k] != v
    ]
    if cfg["qkv_bias"] and cfg["qk_norm"]:
        out.append("model_cfg.qkv_bias and qk_norm together: no Hugging Face family has both")
    if cfg["activation"] not in ACTIVATION_TO_HF:
        out.append(f"model_cfg.activation={json.dumps(cfg['activation'])} has no hidden_act")
    return out


def hf_config(model_cfg: dict[str, Any], special: dict[str, int], eos: str, pad: str) -> dict[str, Any]:
    """config.json of the transformers model that computes what ours computes, in the form transformers 4 wrote
    (rope_theta and rope_scaling), which transformers 5 and llama.cpp's converter read too."""
    m = ModelConfig(**complete_model_cfg(model_cfg))
    kind = family_of(model_cfg)
    out = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": m.V,
        "hidden_size": m.C,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.L,
        "num_attention_heads": m.H,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.hd,
        "hidden_act": ACTIVATION_TO_HF[m.activation],
        "max_position_embeddings": m.max_positions or m.T,
        "rms_norm_eps": m.ln_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": m.rope_scaling,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": m.dropout,
        "initializer_range": 0.02,
        "bos_token_id": special[pad],
        "eos_token_id": special[eos],
        "pad_token_id": special[pad],
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if kind in ("llama", "qwen3"):
        out.update(attention_bias=False)
    if kind == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    if kind in ("mistral", "qwen2", "qwen3"):
        out.update(sliding_window=m.sliding_window if kind == "mistral" else None)
    if kind in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, max_window_layers=m.L)
    return out


def _stacked(m: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Our stacked weights of one block -> (HF name, rows) of each part, in order."""
    q, kv = m.H * m.hd, m.kv_heads * m.hd
    out = {
        "attn.qkv.weight": [
            ("self_attn.q_proj.weight", q),
            ("self_attn.k_proj.weight", kv),
            ("self_attn.v_proj.weight", kv),
        ],
        "mlp.up.weight": [("mlp.gate_proj.weight", m.d_ff), ("mlp.up_proj.weight", m.d_ff)],
    }
    if m.qkv_bias:
        out["attn.qkv.bias"] = [
            ("self_attn.q_proj.bias", q),
            ("self_attn.k_proj.bias", kv),
            ("self_attn.v_proj.bias", kv),
        ]
    return out


def _singles(m: ModelConfig) -> list[tuple[str, str]]:
    out = list(BLOCK_NORMS)
    if m.qk_norm:
        out += [("attn.q_norm.weight", "self_attn.q_norm.weight"), ("attn.k_norm.weight", "self_attn.k_norm.weight")]
    return out


HF_BLOCKS = "model.layers"  # block i's modules are model.layers.i.*
DEFAULT_ADAPTER_TARGETS = ("q_proj", "v_proj")  # what PEFT adapts in these families when none are given


def adapter_targets(m: ModelConfig) -> list[tuple[str, str, int, int, str]]:
    """(PEFT's name, our linear, first row, end row, Hugging Face module) of each linear of a block an adapter can
    target: q, k and v are row slices of our stacked qkv, gate and up of our stacked up (_stacked's order)."""
    q, kv = m.H * m.hd, m.kv_heads * m.hd
    return [
        ("q_proj", "attn.qkv", 0, q, "self_attn.q_proj"),
        ("k_proj", "attn.qkv", q, q + kv, "self_attn.k_proj"),
        ("v_proj", "attn.qkv", q + kv, q + 2 * kv, "self_attn.v_proj"),
        ("o_proj", "attn.proj", 0, m.C, "self_attn.o_proj"),
        ("gate_proj", "mlp.up", 0, m.d_ff, "mlp.gate_proj"),
        ("up_proj", "mlp.up", m.d_ff, 2 * m.d_ff, "mlp.up_proj"),
        ("down_proj", "mlp.down", 0, m.C, "mlp.down_proj"),
    ]


def state_to_hf(state: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our full state dict -> the *ForCausalLM's, float32, contiguous, a tied head once."""
    m = ModelConfig(**complete_model_cfg(model_cfg))
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["ln_f.weight"]}
    for i in range(m.L):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out.update({theirs + hf: state[ours + key] for key, hf in _singles(m)})
        for key, parts in _stacked(m).items():
            pieces = state[ours + key].split([rows for _, rows in parts])
            out.update({theirs + hf: t for (hf, _), t in zip(parts, pieces)})
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.float().contiguous() for k, v in out.items()}


def hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape config.json gives each weight of a *ForCausalLM (the head's only when untied)."""
    q, kv = m.H * m.hd, m.kv_heads * m.hd
    out = {"model.embed_tokens.weight": (m.V, m.C), "model.norm.weight": (m.C,)}
    for i in range(m.L):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (m.C,),
                p + "post_attention_layernorm.weight": (m.C,),
                p + "self_attn.q_proj.weight": (q, m.C),
                p + "self_attn.k_proj.weight": (kv, m.C),
                p + "self_attn.v_proj.weight": (kv, m.C),
                p + "self_attn.o_proj.weight": (m.C, q),
                p + "mlp.gate_proj.weight": (m.d_ff, m.C),
                p + "mlp.up_proj.weight": (m.d_ff, m.C),
                p + "mlp.down_proj.weight": (m.C, m.d_ff),
            }
        )
        if m.qkv_bias:
            out.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
        if m.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (m.hd,), p + "self_attn.k_norm.weight": (m.hd,)})
    if not m.tie_embeddings:
        out["lm_head.weight"] = (m.V, m.C)
    return out


def state_from_hf(tensors: dict[str, torch.Tensor], model_cfg: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """A *ForCausalLM's tensors (any float dtype) -> our full state dict in float32 at the checkpoint's own V. Each
    weight is checked against the shape config.json gives it, piece by piece (a gate_proj and up_proj whose rows
    add up right, or a transposed o_proj, would otherwise load as another model)."""
    m = ModelConfig(**complete_model_cfg(model_cfg))
    found = {k: t for k, t in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer older files hold
    shapes = hf_shapes(m)
    wrong = [
        f"{k} is {list(t.shape)}, config.json gives it {list(shapes[k])}"
        for k, t in found.items()
        if k in shapes and tuple(t.shape) != shapes[k]
    ]
    if wrong:  # one line: a wrong width in config.json makes every weight wrong
        raise UserError(
            f"{where}: {len(wrong)} weight(s) do not have the shape config.json gives them "
            f"(config.json and the weights are of different models): {'; '.join(wrong[:3])}"
            + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        )
    problems: list[str] = []
    missing: list[str] = []

    def take(name: str) -> torch.Tensor | None:
        t = found.pop(name, None)
        if t is None:
            missing.append(name)
        return t

    state = {"tok_emb.weight": take("model.embed_tokens.weight"), "ln_f.weight": take("model.norm.weight")}
    for i in range(m.L):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        state.update({ours + key: take(theirs + hf) for key, hf in _singles(m)})
        for key, parts in _stacked(m).items():
            pieces = [take(theirs + hf) for hf, _ in parts]
            state[ours + key] = None if any(p is None for p in pieces) else torch.cat(pieces)
    head = found.pop("lm_head.weight", None)
    if m.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
        if head is not None and state["tok_emb.weight"] is not None and not torch.equal(head, state["tok_emb.weight"]):
            problems.append(
                f"{where}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
            )
    elif head is None:
        problems.append(f"{where}: weight lm_head.weight is missing (tie_word_embeddings is false)")
    else:
        state["lm_head.weight"] = head
    if missing:
        problems.insert(
            0,
            f"{where}: {len(missing)} weight(s) missing that config.json calls for: "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}",
        )
    if found:
        problems.append(
            f"{where}: {len(found)} unexpected weight(s), not part of a "
            f"{ARCHITECTURES.get(family_of(model_cfg))} as config.json describes it: "
            f"{', '.join(sorted(found)[:4])}{' ...' if len(found) > 4 else ''}"
        )
    if problems:
        raise UserError(problems)
    return {k: v.float().contiguous() for k, v in state.items()}


CHECKED = (
    "C",
    "L",
    "H",
    "d_ff",
    "n_kv_heads",
    "head_dim",
    "tie_embeddings",
    "activation",
    "ln_eps",
    "position",
    "rope_theta",
    "rope_scaling",
    "norm",
    "mlp",
    "bias",
    "qkv_bias",
    "qk_norm",
    "max_positions",
    "sliding_window",
)


def mismatches(hf_cfg: dict[str, Any], model: ModelConfig, where: str) -> list[str]:
    """One line per model option where the run's config disagrees with the directory's config.json. The run's T
    is its own below max_position_embeddings; a larger V grows the embedding (grow_vocab)."""
    theirs, ours = resolved_model_cfg(hf_cfg), resolved_model_cfg(model.to_dict())
    out = []
    if ours["V"] < theirs["V"]:
        out.append(
            f"{where}: vocab_size is {theirs['V']} there, model_cfg.V is {ours['V']} (model_cfg.V must be at "
            f"least {theirs['V']})"
        )
    if ours["T"] > theirs["max_positions"]:
        out.append(
            f"{where}: max_position_embeddings is {theirs['max_positions']} there, model_cfg.T is {ours['T']} "
            "(train at a T up to it)"
        )
    for key in CHECKED:
        if ours[key] != theirs[key]:
            out.append(
                f"{where}: {CONFIG_NAMES[key]} is {json.dumps(theirs[key])} there, model_cfg.{key} is "
                f"{json.dumps(ours[key])} (set model_cfg.{key} to {json.dumps(theirs[key])})"
            )
    return out
