"""The Accelerator every command trains or measures with: which device, how many connected processes, FSDP2.

One place decides the device (CUDA, else MPS, else CPU, unless a flag or the launcher says otherwise), so `run`,
`bench`, `gpu_check` and `runs evaluate` measure and train on the same hardware.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate.utils import DistributedType

from trainer_accel.devices.hardware import compute_warnings
from trainer_accel.errors import UserError

log = logging.getLogger(__name__)

HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}  # mixed_precision -> the dtype it computes in


DEVICES = ("cpu", "mps", "cuda")  # what every command's --device takes


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def check_device(device: str | None) -> None:
    """A --device that this machine lacks is the user's one-line error, before anything is built on it."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if device == "mps" and not mps_available():
        raise UserError("--device mps: Apple MPS is not available on this machine")


def pick_device(device: str | None) -> torch.device:
    """The device of a command that runs without an Accelerator (bench's plain loop, `runs evaluate`): --device,
    else the same rule Accelerate follows for `run`, CUDA, else MPS, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError:
        raise UserError(
            f"--device {device}: expected one of {', '.join(DEVICES)} (cuda:N for one GPU of several)"
        ) from None
    check_device(picked.type)
    return picked


def make_accelerator(device: str | None, mixed_precision: str | None):
    """Accelerate picks CUDA, else MPS, else CPU, or what `accelerate launch` configured; --device narrows it.

    Several launched processes on a machine with neither CUDA nor MPS are connected on the CPU over gloo: the
    launcher starts several processes only through its multi-GPU path (launch/cpu_2proc.yaml), and left to
    itself Accelerate would leave them unconnected there.
    """
    check_device(device)
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = device == "cpu" or (launched > 1 and not torch.cuda.is_available() and not mps_available())
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and (cpu or not torch.cuda.is_available()):
        raise UserError(
            "FSDP was asked for (launch/fsdp.yaml) without a CUDA GPU; Accelerate shards with FSDP on GPUs "
            "only: use launch/cpu_2proc.yaml for several CPU processes"
        )
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        fsdp_plugin=fsdp_plugin(mixed_precision) if fsdp else None,
        kwargs_handlers=[process_group_kwargs()],
    )
    if launched > 1 and acc.num_processes == 1:  # each process would train alone and write the same files
        raise UserError(
            f"the launcher started {launched} processes but they are not connected (several processes train together "
            "on CUDA GPUs or on the CPU, not on Apple MPS); add --device cpu to connect them on the CPU over gloo, or "
            "launch one process"
        )
    return acc


COLLECTIVE_TIMEOUT_ENV = "TRAINER_COLLECTIVE_TIMEOUT_S"
COLLECTIVE_TIMEOUT_S = 3600  # the work one process does while the others wait (the gate, an export, samples)


def process_group_kwargs():
    """How long a process waits in a collective before the run fails: an hour by default, not NCCL's 10 minutes,
    because the promotion gate, the best.pt export and the samples run on the main process alone while the others
    wait in a barrier, and on a big model with many val sets they take longer than that. TRAINER_COLLECTIVE_TIMEOUT_S
    sets it (a real hang then surfaces after that long)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, str(COLLECTIVE_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{COLLECTIVE_TIMEOUT_ENV}={value}: expected a number of seconds above 0")
    return InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))


def fsdp_plugin(mixed_precision: str | None):
    """The launch file's FSDP settings (from the launcher's environment), with fp32 gradient reduction.

    Under FSDP2 Accelerate turns bf16 / fp16 into a policy that also reduces gradients in half precision, and
    (unlike one GPU or DDP) adds no autocast. Here parameters are gathered and computed in half precision, but
    gradients are reduced in fp32, as DDP reduces them; the master weights and the optimizer state stay fp32 and
    the loss is computed in fp32 from the logits (the phase's loss upcasts them). Outputs stay in half precision: an
    fp32 output_dtype would also apply to Accelerate's separate unit for the final norm, whose fp32 output then
    meets the half-precision output layer ("expected m1 and m2 to have the same dtype").
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserError(
            f"FSDP version {plugin.fsdp_version} was asked for; this trainer runs FSDP2 "
            "(fsdp_version: 2, as in launch/fsdp.yaml)"
        )
    if plugin.activation_checkpointing:  # its wrapper renames every parameter and redraws dropout masks
        raise UserError(
            "fsdp_activation_checkpointing: true in the launch file; set train_cfg.activation_checkpointing "
            "instead (Accelerate's wrapper renames the parameters a checkpoint is saved under and does not "
            "keep the dropout masks)"
        )
    precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    half = HALF_PRECISION.get(precision)
    if half is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    return plugin


def announce_compute(acc, device_flag: str | None = None) -> None:
    """Log the device, processes, precision and threads once, and warn about set-ups that waste the machine."""
    how = ""
    if acc.num_processes > 1 and acc.device.type == "cpu":
        how = " connected over gloo" + ("" if device_flag == "cpu" else " (no CUDA or MPS here)")
    log.info(
        "compute: %d process(es) on %s%s, precision %s, %d CPU threads per process",
        acc.num_processes,
        acc.device,
        how,
        acc.mixed_precision,
        torch.get_num_threads(),
    )
    if acc.distributed_type == DistributedType.FSDP:
        policy = acc.state.fsdp_plugin.mixed_precision_policy

        def name(dtype) -> str:
            return str(dtype or torch.float32).removeprefix("torch.")

        log.info(
            "FSDP2: parameters gathered and computed in %s, gradients reduced in %s; weights, optimizer state "
            "and the loss float32",
            name(policy and policy.param_dtype),
            name(policy and policy.reduce_dtype),
        )
    if acc.is_main_process:
        for warning in compute_warnings(acc.device, acc.mixed_precision, acc.num_processes):
            log.warning("%s", warning)
