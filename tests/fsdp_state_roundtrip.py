"""Run by test_devices.py under `torch.distributed.run --nproc_per_node 2`: a GPT sharded with FSDP2 (gloo, CPU)
trains a step, its optimizer state is gathered to the checkpoint form and must equal a plain single-process
run's; scattered into a freshly sharded model, a second step must again match the plain run."""

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import fully_shard

from trainer_accel.checkpoints.full_state import (
    gather_sharded_optimizer_state,
    scatter_sharded_optimizer_state,
)
from trainer_accel.config import ModelConfig

CFG = ModelConfig(V=260, T=16, C=32, L=2, H=2, d_ff=64)


def model_and_optimizer(sharded: bool):
    torch.manual_seed(0)
    from trainer_accel.models.gpt import GPT

    model = GPT(CFG)
    if sharded:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model, opt, seed):
    x = torch.randint(0, 260, (4, 16), generator=torch.Generator().manual_seed(seed))
    model(x).float().logsumexp(
        -1
    ).mean().backward()  # the same batch on every process: the mean gradient is the plain one
    opt.step()
    opt.zero_grad()


def main() -> int:
    dist.init_process_group("gloo")
    plain, plain_opt = model_and_optimizer(sharded=False)
    step(plain, plain_opt, 1)
    reference_after_one = copy.deepcopy(plain_opt.state_dict())  # state_dict() holds the live tensors
    step(plain, plain_opt, 2)

    model, opt = model_and_optimizer(sharded=True)
    step(model, opt, 1)
    full = gather_sharded_optimizer_state(model, model, opt)
    full = [full]
    dist.broadcast_object_list(full, src=0)  # a checkpoint every process reads
    full = full[0]
    ok = full["param_groups"] == reference_after_one["param_groups"] and all(
        torch.allclose(full["state"][i][k], v, atol=1e-6)
        for i, s in reference_after_one["state"].items()
        for k, v in s.items()
    )
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    fresh, fresh_opt = model_and_optimizer(sharded=True)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()})  # the shards of the weights after step 1
    scatter_sharded_optimizer_state(fresh, fresh, fresh_opt, full)
    step(fresh, fresh_opt, 2)
    final = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        ok = (
            ok
            and len(weights) == len(plain.state_dict())
            and all(torch.allclose(final[k], v, atol=1e-5) for k, v in plain.state_dict().items())
        )
        print("FSDP STATE ROUNDTRIP", "OK" if ok else "MISMATCH", flush=True)
    # both ranks done before either tears down: a rank destroying its gloo group while the other still works
    # aborted it ("terminate called without an active exception") once under load
    dist.barrier()
    return 0 if ok else 1


if __name__ == "__main__":
    from trainer_accel.devices.collective import end_process_group

    code = main()  # its sharded models, which hold the gloo group, are freed before the group ends, as run does
    end_process_group()
    sys.exit(code)
