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


def full_model_state(acc: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every process must call this; under FSDP only the main process gets the tensors (the others an empty dict)."""
    if acc.distributed_type == DistributedType.FSDP:
        return acc.get_state_dict(model)
    return acc.unwrap_model(model, keep_torch_compile=False).state_dict()


def full_optimizer_state(acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` as one unsharded process would have it. Every process must call this."""
    opt = _torch_optimizer(optimizer)
    if acc.distributed_type != DistributedType.FSDP:
        return opt.state_dict()
    return gather_sharded_optimizer_state(model, acc.unwrap_model(model, keep_torch_compile=False), opt)


def load_full_optimizer_state(acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """Load an index-keyed full optimizer state (every process holds it) into a plain or sharded optimizer."""
    opt = _torch_optimizer(optimizer)
    if acc.distributed_type != DistributedType.FSDP:
        opt.load_state_dict(state)
    else:
        scatter_sharded_optimizer_state(model, acc.unwrap_model(model, keep_torch_compile=False), opt, state)


def gather_sharded_optimizer_state(model: torch.nn.Module, canonical: torch.nn.Module,
                                   opt: torch.optim.Optimizer) -> dict:
    """Index-keyed full state of a sharded optimizer on the main process ({} on the others). `model` is what was
    sharded (and possibly wrapped), `canonical` the plain module whose parameter names the checkpoint uses."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not by_name:
        return {}
    index = {n: i for i, n in enumerate(parameter_names(canonical, opt))}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def scatter_sharded_optimizer_state(model: torch.nn.Module, canonical: torch.nn.Module, opt: torch.optim.Optimizer,
                                    state: dict) -> None:
    """Each process keeps its shard of an index-keyed full optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = parameter_names(canonical, opt)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Bytes a checkpoint of this model takes (weights + AdamW's two fp32 moments), from parameter shapes alone,
    so every process computes the same figure whether or not it holds the gathered state."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    moments = sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return weights + moments
