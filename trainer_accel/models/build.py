"""The one place a model is built: from a model config, with any converters, on a device and dtype, the meta
device included; which of its parameters train is decided here too.

Every part of the package that needs a model (the loop, a plain copy for samples under FSDP, a checkpoint's
expected tensor names and shapes, inference, the gate, --plan, doctor, the benchmarks) asks here, so a converter
(an adapter beside the linear layers, a quantized base) changes every one of them at once. A converter is a
callable that takes the built model and returns it changed; it runs before any weights are loaded, so the state
it is given holds the converted model's names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from trainer_accel.models.config import ModelConfig
from trainer_accel.models.gpt import GPT

Converter = Callable[[GPT], GPT]


def build_model(
    cfg: ModelConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    state: dict[str, torch.Tensor] | None = None,
    converters: Sequence[Converter] = (),
    trains: Callable[[str], bool] | None = None,
    activation_checkpointing: int = 0,
    after_load: Sequence[Converter] = (),
) -> GPT:
    """A model of `cfg`. Its initial weights are drawn on the CPU from torch's global generator (seeded by the
    caller), so a seed gives the same weights on every device; on the meta device nothing is drawn or allocated
    (shapes only, or a model to fill with `to_empty`). `state` is loaded strictly, then the model moves to
    `device` and `dtype`. `trains(name)` says which parameters train (None: all); `activation_checkpointing`
    recomputes every k-th block in the backward pass (0: none), with no wrapper modules, so names are unchanged.
    A converter's own tensors (a fresh adapter) may be absent from `state`; `after_load` converters change the
    loaded weights themselves (an NF4 base is quantized from the weights it holds)."""
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            model = GPT(cfg)
        for convert in converters:
            model = convert(model)
        if trains is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(trains(name))
        return model.to(dtype) if dtype is not None else model
    model = GPT(cfg)
    own = set(model.state_dict())
    for convert in converters:
        model = convert(model)
    if state is not None:
        # strict, except that what a converter added (a fresh adapter) may be absent and keeps its initial draw
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k in own]
        if missing or unexpected:
            raise RuntimeError(f"state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    for finish in after_load:
        model = finish(model)
    if trains is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(trains(name))
    model.checkpoint_every = activation_checkpointing
    return model


def expected_shapes(cfg: ModelConfig, converters: Sequence[Converter] = ()) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the model's state and its shape: what a checkpoint of it must hold (nothing is
    allocated)."""
    model = build_model(cfg, "meta", converters=converters)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
