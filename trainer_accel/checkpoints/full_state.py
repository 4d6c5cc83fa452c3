"""Full, unsharded model and optimizer state from a model however it is wrapped (DDP, FSDP2, torch.compile).

Checkpoints must load into a run with any number of processes and into downstream code that knows nothing of
sharding, so they always hold what one plain process would: canonical parameter names (no `module.` or
`_orig_mod.` prefixes) and a torch `optimizer.state_dict()` keyed by parameter index. torch's
`torch.distributed.checkpoint.state_dict` gathers FSDP shards (a collective: every process calls these
functions) and is a plain copy for an unsharded model; the only translation here is between its parameter names
and the index keys of `optimizer.state_dict()`.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

# torch.distributed.checkpoint is imported only when a sharded state is gathered or scattered: importing it costs
# about half a second at every start, which every run that is not FSDP would pay for nothing.


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the real one


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Canonical names of the optimizer's parameters in `state_dict()` index order (tied weights: first name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in _torch_optimizer(optimizer).param_groups for p in group["params"]]


def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """{name: the name it is tied to} for each parameter registered under a second name (`lm_head.weight` ->
    `tok_emb.weight`), read from the module itself. A state dict cannot tell: FSDP's gathered full state holds a
    separate copy under each name, so a tie found by tensor identity would be missed there."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def full_model_state(acc: Accelerator, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The full weights with each tied tensor once, and the aliases that re-tie them (`tied_aliases`).

    Every process must call this; under FSDP only the main process gets the tensors (the others an empty dict).
    """
    canonical = acc.unwrap_model(model, keep_torch_compile=False)
    aliases = tied_aliases(canonical)
    state = acc.get_state_dict(model) if acc.distributed_type == DistributedType.FSDP else canonical.state_dict()
    return {k: v for k, v in state.items() if k not in aliases}, aliases


def plain_model(
    model_cfg,
    state: dict[str, torch.Tensor],
    aliases: dict[str, str],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    converters=(),
):
    """A plain GPT on `device` in `dtype` holding a full state: what the main process alone may run (sampling)
    while the training model is sharded, whose forward all-gathers with every process. Built on the meta device,
    so it draws no random numbers and allocates once, in `dtype`."""
    from trainer_accel.checkpoints.layout import expand_aliases
    from trainer_accel.models.build import build_model

    model = build_model(model_cfg, "meta", dtype, converters=converters)
    model.to_empty(device=device)  # gives each name its own tensor: the ties are made again, so each is held once
    for alias, name in aliases.items():
        owner, _, leaf = alias.rpartition(".")
        model.get_submodule(owner).register_parameter(leaf, model.get_parameter(name))
    model.load_state_dict(expand_aliases(state, aliases), strict=True)
    return model.eval()


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a value that FSDP2 returns as a replicated DTensor (the clipped gradient norm), so it
    can be stacked with plain tensors and read; a plain tensor is returned as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_optimizer_state(acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` as one unsharded process would have it. Every process must call this."""
    opt = _torch_optimizer(optimizer)
    if acc.distributed_type != DistributedType.FSDP:
        return opt.state_dict()
    return gather_sharded_optimizer_state(model, acc.unwrap_model(model, keep_torch_compile=False), opt)


# Implementation choices of torch's optimizers that belong to the device a run trains on, not to the training:
# `Optimizer.load_state_dict` would otherwise keep the saved ones (a run started on CPU, resumed on CUDA, would
# silently keep the slower non-fused AdamW).
DEVICE_FLAGS = ("fused", "foreach", "capturable")


def load_full_optimizer_state(
    acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load an index-keyed full optimizer state (every process holds it) into a plain or sharded optimizer.

    The optimizer keeps the device flags it was built with (DEVICE_FLAGS); they are set in the state before
    loading, so that the loaded step counters land where those flags want them (on the GPU for fused AdamW).
    """
    opt = _torch_optimizer(optimizer)
    if len(state.get("param_groups", [])) == len(opt.param_groups):
        state = {
            **state,
            "param_groups": [
                {**saved, **{k: now[k] for k in DEVICE_FLAGS if k in now}}
                for saved, now in zip(state["param_groups"], opt.param_groups)
            ],
        }
    if acc.distributed_type != DistributedType.FSDP:
        opt.load_state_dict(state)
    else:
        scatter_sharded_optimizer_state(model, acc.unwrap_model(model, keep_torch_compile=False), opt, state)


def gather_sharded_optimizer_state(
    model: torch.nn.Module, canonical: torch.nn.Module, opt: torch.optim.Optimizer
) -> dict:
    """Index-keyed full state of a sharded optimizer on the main process ({} on the others). `model` is what was
    sharded (and possibly wrapped), `canonical` the plain module whose parameter names the checkpoint uses."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    by_name = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not by_name:
        return {}
    index = {n: i for i, n in enumerate(parameter_names(canonical, opt))}
    return {
        "state": {index[n]: s for n, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def scatter_sharded_optimizer_state(
    model: torch.nn.Module, canonical: torch.nn.Module, opt: torch.optim.Optimizer, state: dict
) -> None:
    """Each process keeps its shard of an index-keyed full optimizer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = parameter_names(canonical, opt)
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Bytes a checkpoint of this model takes (weights + AdamW's two fp32 moments), from parameter shapes alone,
    so every process computes the same figure whether or not it holds the gathered state. A checkpoint holds what
    trains: every weight, or an adapter run's adapter alone (its frozen base is recorded, not stored)."""
    trained = [p for p in model.parameters() if p.requires_grad]  # tied weights counted once
    return sum(p.numel() * (p.element_size() + 2 * 4) for p in trained)
