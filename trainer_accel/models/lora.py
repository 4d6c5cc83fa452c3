"""LoRA adapters: a converter that puts low-rank matrices beside the base's linear layers, the merge of an adapter
into the base's weights, and the "adapter off" switch that turns the trained model back into its base.

Targets carry PEFT's names (`q_proj`, `c_attn`, ...) because those are what users write and what PEFT and vLLM
read. Our decoder stacks q, k and v in one projection (and gate and up in one), so a target is a slice of rows of
one of our linears: each target gets its own A (r, in) and B (rows, r) matrices, named
`blocks.i.attn.qkv.lora_A.q_proj`, so a PEFT export splits nothing and an import stacks nothing. The update is
PEFT's: `W x + B A dropout(x) * scale`, scale = alpha / r (alpha / sqrt(r) with rslora), A drawn as PEFT draws it
(Kaiming-uniform) and B zero, so a fresh adapter computes exactly the base. Each family says which targets it
has and their Hugging Face module names (models/gpt_hf.py, models/llama_hf.py: `adapter_targets`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer_accel.models import families
from trainer_accel.models.config import ModelConfig

ALL_LINEAR = "all-linear"
QUANTIZATIONS = ("nf4",)
MERGE_INTO = ("original", "dequantized")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """A phase config's `adapter` section. Defaults are PEFT's LoraConfig (r 8, alpha 8, no dropout, and the
    family's default targets, as PEFT picks them: GPT-2's c_attn, the Llama family's q_proj and v_proj)."""

    r: int = 8  # rank of each adapter matrix pair
    alpha: float = 8.0  # lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # lora_dropout, on the adapter's input while training
    target_modules: tuple[str, ...] | str | None = None  # PEFT's module names, "all-linear", or null: the default
    rslora: bool = False  # rank-stabilised scaling, alpha / sqrt(r) (PEFT's use_rslora)
    base: str | None = None  # the frozen base's weights (as init_from takes them); null: init_from, or the base
    # recorded by the adapter being resumed or imported
    quantize_base: str | None = None  # "nf4": the frozen base held in 4-bit NormalFloat (QLoRA, torchao)
    merge_into: str = "original"  # what an NF4 run's exports merge into: "original" base or "dequantized" NF4

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        tm = self.target_modules
        return {**dataclasses.asdict(self), "target_modules": list(tm) if isinstance(tm, tuple) else tm}

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        tm = d.get("target_modules")
        return cls(**{**d, "target_modules": tuple(tm) if isinstance(tm, list) else tm})


@dataclasses.dataclass(frozen=True)
class Target:
    """One module PEFT would adapt, as rows of one of our linears in every block."""

    name: str  # PEFT's module name: "q_proj", "c_attn"
    module: str  # our linear within a block: "attn.qkv"
    rows: tuple[int, int]  # the rows of its weight (its outputs) the target is
    hf_module: str  # Hugging Face's module within a block: "self_attn.q_proj"


def family_targets(model: ModelConfig) -> list[Target]:
    """Every target the model's family has, in the order of our weights' rows."""
    mapping = families.writing(model.to_dict())
    return [Target(n, m, (s, e), hf) for n, m, s, e, hf in mapping.adapter_targets(model)]


def default_targets(model: ModelConfig) -> tuple[str, ...]:
    return families.writing(model.to_dict()).DEFAULT_ADAPTER_TARGETS


def chosen_targets(adapter: AdapterConfig, model: ModelConfig) -> list[Target]:
    """The targets an adapter config names ("all-linear": every linear of the blocks, as PEFT reads it: not the
    output head). An unknown name raises ValueError naming the family's."""
    every = family_targets(model)
    names = adapter.target_modules
    if names is None:
        names = default_targets(model)
    if names == ALL_LINEAR:
        return every
    known = list(dict.fromkeys(t.name for t in every))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} is not a module of this model (it has {', '.join(known)}, or "
                         f'"{ALL_LINEAR}")')  # fmt: skip
    return [t for t in every if t.name in names]


def adapter_problems(adapter: AdapterConfig, model: ModelConfig | None, where: str) -> list[str]:
    problems = []
    if adapter.r < 1:
        problems.append(f"{where}.r: expected a rank >= 1, got {adapter.r}")
    if adapter.alpha <= 0:
        problems.append(f"{where}.alpha: expected a number > 0, got {adapter.alpha}")
    if not 0 <= adapter.dropout < 1:
        problems.append(f"{where}.dropout: expected a probability in [0, 1), got {adapter.dropout}")
    tm = adapter.target_modules  # its type is config.parse_adapter's to check
    if isinstance(tm, tuple) and not tm:
        problems.append(f"{where}.target_modules: empty (an adapter on nothing would train nothing)")
    elif model is not None:
        try:
            chosen_targets(adapter, model)
        except ValueError as e:
            problems.append(f"{where}.target_modules: {e}")
    if adapter.quantize_base is not None and adapter.quantize_base not in QUANTIZATIONS:
        problems.append(f"{where}.quantize_base: expected null or {', '.join(QUANTIZATIONS)}, got "
                        f"{adapter.quantize_base!r}")  # fmt: skip
    if adapter.merge_into not in MERGE_INTO:
        problems.append(f"{where}.merge_into: expected one of {', '.join(MERGE_INTO)}, got {adapter.merge_into!r}")
    return problems


def is_adapter_name(name: str) -> bool:
    """Whether a parameter or state name is an adapter's (what trains in an adapter run, and what its checkpoints
    hold)."""
    return ".lora_A." in name or ".lora_B." in name


class LoRALinear(nn.Module):
    """A linear layer with adapters on row slices of its output. It holds the base's own weight and bias
    parameters under their old names, so the base's state loads into it unchanged."""

    def __init__(self, linear: nn.Linear, targets: list[Target], r: int, scale: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.rows = {t.name: t.rows for t in sorted(targets, key=lambda t: t.rows)}
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(r, self.in_features, **kw)) for n in self.rows})
        self.lora_B = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(e - s, r, **kw)) for n, (s, e) in self.rows.items()}
        )
        for a in self.lora_A.values():  # PEFT's draw; B stays zero, so the adapter starts as no change at all
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scale, self.dropout = scale, dropout
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        # one dropout mask for the targets of this linear (PEFT draws one per module; with q, k and v stacked here
        # that would be three copies of x kept for the backward pass, for no difference in what dropout means)
        seen = F.dropout(x, self.dropout, self.training) if self.dropout else x
        for name, (start, stop) in self.rows.items():
            # the scale goes into B (r columns), not onto the (B, T, rows) output; the update is added in place,
            # since the base matmul's backward needs its input and weight, not its output
            delta = F.linear(F.linear(seen, self.lora_A[name]), self.lora_B[name] * self.scale)
            if start == 0 and stop == self.out_features:
                y = y.add_(delta)
            else:
                y[..., start:stop] += delta
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.rows)}, scale={self.scale:g}"


def lora_converter(adapter: AdapterConfig, model_cfg: ModelConfig):
    """A models/build.py converter: every block's targeted linears become LoRALinear, the base's weights kept."""
    targets = chosen_targets(adapter, model_cfg)

    def convert(model: nn.Module) -> nn.Module:
        by_module: dict[str, list[Target]] = {}
        for t in targets:
            by_module.setdefault(t.module, []).append(t)
        for block in model.blocks:
            for module, ts in by_module.items():
                owner, _, leaf = module.rpartition(".")
                parent = block.get_submodule(owner)
                setattr(parent, leaf, LoRALinear(getattr(parent, leaf), ts, adapter.r, adapter.scale, adapter.dropout))
        return model

    return convert


@contextlib.contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    """The model as its base computes it (a preference loss's reference model, for free), restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if is_adapter_name(k)}


def merged_state(
    base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], cfg: AdapterConfig, model: ModelConfig
) -> dict[str, torch.Tensor]:
    """The base's weights with the adapter added in: W + scale * B A for each target's rows, summed in fp32 and
    cast once to the base's dtype (a bf16 weight rounded once, not once per target)."""
    rows = {(t.module, t.name): t.rows for t in family_targets(model)}
    out = dict(base)
    pending: dict[str, torch.Tensor] = {}
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        module, name = key.split(".lora_A.")
        b = adapter[f"{module}.lora_B.{name}"]
        start, stop = rows[(module.split(".", 2)[2], name)]  # "blocks.3.attn.qkv" -> "attn.qkv"
        w = pending.setdefault(module, base[f"{module}.weight"].float().clone())
        w[start:stop] += (b.float() @ a.float()) * cfg.scale
    for module, w in pending.items():
        out[f"{module}.weight"] = w.to(base[f"{module}.weight"].dtype)
    return out


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tied tensor once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
