"""Our GPT as a Hugging Face GPT-2 and back: config.json and the state dict, both ways, exactly.

The two models compute the same function; what differs is the layout:
    ours                          transformers GPT2LMHeadModel
    tok_emb, pos_emb              transformer.wte, transformer.wpe
    blocks.i.ln1 / ln2            transformer.h.i.ln_1 / ln_2
    blocks.i.attn.qkv / proj      transformer.h.i.attn.c_attn / c_proj   Conv1D: weight stored (in, out), transposed
    blocks.i.mlp.up / down        transformer.h.i.mlp.c_fc / c_proj      Conv1D, transposed
    ln_f, lm_head                 transformer.ln_f, lm_head (left out of the file when tied to wte)
    bias: false                   zero biases (GPT-2 always has them; zeros compute what no bias does)
    activation gelu / gelu_tanh   activation_function "gelu" / "gelu_new"
    ln_eps, T, V, tie_embeddings  layer_norm_epsilon, n_positions (and n_ctx, which llama.cpp's converter reads),
                                  vocab_size, tie_word_embeddings
A model option GPT-2 cannot express is refused, never exported approximately. Reading a directory (hf/directory.py)
takes
model.safetensors (or the shards its index names) or, failing that, pytorch_model.bin through
torch.load(weights_only=True); GPT-2 checkpoints from the Hub store keys with or without the `transformer.`
prefix and carry the causal-mask buffers (`attn.bias`, `attn.masked_bias`), which hold no weights.
Nothing here imports transformers or reads files: it is needed to use an export, not to make one.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from trainer_accel.errors import UserError
from trainer_accel.models.config import ModelConfig, complete_model_cfg

ACTIVATION_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
ACTIVATION_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}  # same function
REPRESENTABLE = {"V", "T", "C", "L", "H", "d_ff", "dropout", "bias", "tie_embeddings", "activation", "ln_eps"}
BLOCK_LAYOUT = (  # (ours, theirs, transposed): the weights of block i
    ("ln1.weight", "ln_1.weight", False),
    ("ln1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("ln2.weight", "ln_2.weight", False),
    ("ln2.bias", "ln_2.bias", False),
    ("mlp.up.weight", "mlp.c_fc.weight", True),
    ("mlp.up.bias", "mlp.c_fc.bias", False),
    ("mlp.down.weight", "mlp.c_proj.weight", True),
    ("mlp.down.bias", "mlp.c_proj.bias", False),
)


TOP_LAYOUT = (
    ("tok_emb.weight", "transformer.wte.weight"),
    ("pos_emb.weight", "transformer.wpe.weight"),
    ("ln_f.weight", "transformer.ln_f.weight"),
    ("ln_f.bias", "transformer.ln_f.bias"),
)


def layout(L: int) -> list[tuple[str, str, bool]]:
    """(our key, the HF key, whether the HF tensor is the transpose of ours) for every weight but lm_head."""
    out = [(ours, theirs, False) for ours, theirs in TOP_LAYOUT]
    for i in range(L):
        out += [(f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", t) for ours, theirs, t in BLOCK_LAYOUT]
    return out


HF_BLOCKS = "transformer.h"  # block i's modules are transformer.h.i.*
DEFAULT_ADAPTER_TARGETS = ("c_attn",)  # what PEFT adapts in a GPT-2 when no target_modules are given


def adapter_targets(m: ModelConfig) -> list[tuple[str, str, int, int, str]]:
    """(PEFT's name, our linear, first row, end row, Hugging Face module) of each linear of a block an adapter can
    target. GPT-2 names both output projections c_proj, so that name adapts both, as PEFT's does."""
    return [
        ("c_attn", "attn.qkv", 0, (m.H + 2 * m.kv_heads) * m.hd, "attn.c_attn"),
        ("c_proj", "attn.proj", 0, m.C, "attn.c_proj"),
        ("c_fc", "mlp.up", 0, m.d_ff, "mlp.c_fc"),
        ("c_proj", "mlp.down", 0, m.C, "mlp.c_proj"),
    ]


def unrepresentable(model_cfg: dict[str, Any]) -> list[str]:
    """Why a model cannot be written as GPT-2, one line per option (empty: it can)."""
    cfg, defaults = complete_model_cfg(model_cfg), complete_model_cfg({})
    out = [
        f"model_cfg.{k}={json.dumps(cfg[k])} has no GPT-2 equivalent"
        for k in sorted(set(cfg) - REPRESENTABLE)
        if cfg[k] != defaults.get(k, object()) and k != "architecture"
    ]
    if cfg.get("activation") not in ACTIVATION_TO_HF:
        out.append(f"model_cfg.activation={json.dumps(cfg.get('activation'))} has no GPT-2 activation_function")
    return out


def hf_config(model_cfg: dict[str, Any], special: dict[str, int], eos: str, pad: str) -> dict[str, Any]:
    """config.json of the GPT2LMHeadModel that computes what our model computes."""
    m = ModelConfig(**complete_model_cfg(model_cfg))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.V,
        "n_positions": m.T,
        "n_ctx": m.T,
        "n_embd": m.C,
        "n_layer": m.L,
        "n_head": m.H,
        "n_inner": m.d_ff,
        "activation_function": ACTIVATION_TO_HF[m.activation],
        "layer_norm_epsilon": m.ln_eps,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "tie_word_embeddings": m.tie_embeddings,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "initializer_range": 0.02,
        "bos_token_id": special[pad],
        "eos_token_id": special[eos],
        "pad_token_id": special[pad],
        "use_cache": True,
        "torch_dtype": "float32",
    }


def state_to_hf(state: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our full state dict (tied keys present) -> GPT2LMHeadModel's, float32, contiguous, the tied head once."""
    m = ModelConfig(**complete_model_cfg(model_cfg))
    out = {}
    for ours, theirs, transposed in layout(m.L):
        if ours in state:
            t = state[ours].float()
        else:  # a bias-free model's bias: zeros add nothing, and LayerNorm's bias is an addition too
            t = torch.zeros(state[ours.replace(".bias", ".weight")].shape[0], dtype=torch.float32)
        out[theirs] = (t.t() if transposed else t).contiguous()
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"].float().contiguous()
    return out


POSITIVE_INTS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


def value_problems(hf: dict[str, Any], where: str) -> list[str]:
    """Types and ranges of the config.json values the model is built from, before anything is built from them."""

    def whole(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    out = [
        f"{where}: {key} is {json.dumps(hf[key])}, expected a positive integer"
        for key in POSITIVE_INTS
        if key in hf and not whole(hf[key])
    ]
    if hf.get("n_inner") is not None and not whole(hf["n_inner"]):
        out.append(f"{where}: n_inner is {json.dumps(hf['n_inner'])}, expected a positive integer or null")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        out.append(f"{where}: layer_norm_epsilon is {json.dumps(eps)}, expected a number in (0, 1)")
    if not isinstance(hf.get("tie_word_embeddings", True), bool):
        out.append(f"{where}: tie_word_embeddings is {json.dumps(hf['tie_word_embeddings'])}, expected true or false")
    C, H = hf.get("n_embd", 768), hf.get("n_head", 12)
    if not out and C % H:
        out.append(f"{where}: n_embd {C} is not divisible by n_head {H}")
    return out


def model_cfg_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Our model_cfg for a GPT-2 config.json; refuses the GPT-2 options our model does not compute."""
    problems = []
    for key, ok in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(key, ok) != ok:
            problems.append(
                f"{where}: {key} is {json.dumps(hf.get(key))}; this trainer's attention needs {json.dumps(ok)}"
            )
    act = hf.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in ACTIVATION_FROM_HF:
        problems.append(
            f"{where}: activation_function {json.dumps(act)} is not one this trainer computes "
            f"({', '.join(ACTIVATION_FROM_HF)})"
        )
    problems += value_problems(hf, where)
    if problems:
        raise UserError(problems)
    C = hf.get("n_embd", 768)
    return complete_model_cfg(
        {
            "V": hf.get("vocab_size", 50257),
            "T": hf.get("n_positions", 1024),
            "C": C,
            "L": hf.get("n_layer", 12),
            "H": hf.get("n_head", 12),
            "d_ff": hf.get("n_inner") or 4 * C,
            "bias": True,
            "tie_embeddings": hf.get("tie_word_embeddings", True),
            "activation": ACTIVATION_FROM_HF[act],
            "ln_eps": hf.get("layer_norm_epsilon", 1e-5),
        }
    )


CONFIG_NAMES = {
    "V": "vocab_size",
    "T": "n_positions",
    "C": "n_embd",
    "L": "n_layer",
    "H": "n_head",
    "d_ff": "n_inner (4 x n_embd when null)",
    "tie_embeddings": "tie_word_embeddings",
    "activation": "activation_function",
    "ln_eps": "layer_norm_epsilon",
}


def mismatches(hf_cfg: dict[str, Any], model: ModelConfig, where: str) -> list[str]:
    """One line per model option where the config disagrees with the checkpoint's config.json. A larger V is no
    mismatch: the embedding grows by rows for the tokens the checkpoint lacks (`grow_vocab`)."""
    ours = model.to_dict()
    out = (
        []
        if model.bias or not hf_cfg["bias"]
        else [f"{where}: GPT-2 layers have biases, model_cfg.bias is false (set model_cfg.bias to true)"]
    )
    for key, name in CONFIG_NAMES.items():
        want, have = hf_cfg[key], ours[key]
        if key == "V" and have >= want or want == have:
            continue
        value = json.dumps(want if key != "activation" else ACTIVATION_TO_HF[want])
        fix = f"set model_cfg.{key} to {json.dumps(want)}" if key != "V" else f"model_cfg.V must be at least {want}"
        out.append(f"{where}: {name} is {value} there, model_cfg.{key} is {json.dumps(have)} ({fix})")
    return out


def state_from_hf(tensors: dict[str, torch.Tensor], model_cfg: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's) tensors -> our full state dict at the checkpoint's own V."""
    m = ModelConfig(**model_cfg)
    found = {}
    for key, t in tensors.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers (c_attn.bias, the weight, ends in "_attn.bias")
        found[key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"] = t
    state, problems = {}, []
    for ours, theirs, transposed in layout(m.L):
        if theirs not in found:
            problems.append(f"{where}: weight {theirs} is missing")
            continue
        t = found.pop(theirs)
        state[ours] = (t.t() if transposed else t).float().contiguous()
    head = found.pop("lm_head.weight", None)
    if m.tie_embeddings:
        state["lm_head.weight"] = state.get("tok_emb.weight")
        if head is not None and "tok_emb.weight" in state and not torch.equal(head.float(), state["tok_emb.weight"]):
            problems.append(
                f"{where}: tie_word_embeddings is true but lm_head.weight differs from transformer.wte.weight"
            )
    elif head is None:
        problems.append(f"{where}: weight lm_head.weight is missing (tie_word_embeddings is false)")
    else:
        state["lm_head.weight"] = head.float().contiguous()
    problems += [f"{where}: unexpected weight {k} (not part of a GPT-2 language model)" for k in sorted(found)]
    if problems:
        raise UserError(problems)
    return state


def without_zero_biases(loaded_cfg: dict[str, Any], state: dict[str, torch.Tensor], model: ModelConfig):
    """A GPT-2 file whose biases are all zero, for a run whose model has none: the bias-free model it was exported
    from (an export writes zeros where the model has no bias), so the round trip keeps the config it trained with.
    Returns (model_cfg, state), unchanged unless that is the case."""
    biases = [k for k in state if k.endswith(".bias")]
    if model.bias or not loaded_cfg.get("bias") or any(state[k].any() for k in biases):
        return loaded_cfg, state
    return {**loaded_cfg, "bias": False}, {k: v for k, v in state.items() if k not in biases}


def grow_vocab(state: dict[str, torch.Tensor], V: int, tied: bool) -> dict[str, torch.Tensor]:
    """The embedding (and an untied head) with rows up to V; each new row is the mean of the existing ones, which
    keeps the new tokens' logits near the average instead of random (transformers' resize_token_embeddings)."""
    out = dict(state)
    for key in ("tok_emb.weight",) if tied else ("tok_emb.weight", "lm_head.weight"):
        w = state[key]
        out[key] = torch.cat([w, w.mean(dim=0, keepdim=True).expand(V - w.shape[0], -1)]).contiguous()
    if tied:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out
