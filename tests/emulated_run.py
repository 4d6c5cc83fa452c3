"""`python -m trainer_accel.run`, with Accelerate set up as it is on GPUs, on the CPU where Accelerate refuses it.

    accelerate launch --config_file launch/fsdp.yaml tests/emulated_run.py fsdp --phase pretrain --config X.json
    python tests/emulated_run.py fp16 --phase pretrain --config X.json        (TEST_INIT_SCALE: the scaler's start)
    accelerate launch --config_file launch/cpu_2proc.yaml tests/emulated_run.py mps --phase pretrain ...

Accelerate shards with FSDP only on GPUs (a CPU run is MULTI_CPU, and its state never becomes FSDP) and refuses
fp16 on the CPU, so neither trainer path could otherwise run without a GPU. Here the accelerator the trainer
makes is switched after creation, the rest is the real command:
- `fsdp`: Accelerate's state says FSDP with the plugin the trainer builds from the launch file, so `prepare`
  shards the model with FSDP2 `fully_shard` over the gloo processes (torch runs FSDP2 on the CPU).
- `fp16`: a torch GradScaler on the CPU, fp16 autocast and the unscale in clip_grad_norm_, as Accelerate sets
  them up for fp16 on a GPU.
- `mps`: torch says Apple's MPS is available, as on a Mac, where Accelerate has no multi-process backend and
  several launched processes stay unconnected copies (which the trainer must refuse).
What cannot be checked here (NCCL, the GPU kernels, real fp16 overflow rates) is the GPU check's job
(`python -m trainer_accel.gpu_check`).
"""

import os
import sys

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

import trainer_accel.experiments.runner as runner
import trainer_accel.run as run
from trainer_accel.devices.accelerator import fsdp_plugin, make_accelerator


def fsdp_on_cpu(device, mixed_precision):
    os.environ["ACCELERATE_USE_FSDP"] = "false"  # else the trainer refuses FSDP on the CPU, as it must for users
    acc = make_accelerator("cpu", mixed_precision)
    plugin = fsdp_plugin(mixed_precision)
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return acc


def fp16_on_cpu(device, mixed_precision):
    acc = make_accelerator("cpu", "no")
    AcceleratorState._shared_state["_mixed_precision"] = "fp16"
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=float(os.environ.get("TEST_INIT_SCALE", 2.0**16)))
    return acc


def as_on_a_mac(device, mixed_precision):
    torch.backends.mps.is_available = lambda: True
    return make_accelerator(device, mixed_precision)


if __name__ == "__main__":
    runner.make_accelerator = {"fsdp": fsdp_on_cpu, "fp16": fp16_on_cpu, "mps": as_on_a_mac}[sys.argv[1]]
    sys.exit(run.main(sys.argv[2:]))
