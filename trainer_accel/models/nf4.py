"""QLoRA's frozen base: the blocks' linear weights held in 4-bit NormalFloat with torchao's pure-PyTorch NF4Tensor,
which runs on the CPU, dequantizes inside `F.linear`, and shards under FSDP2 (bitsandbytes does neither through
Accelerate). Embeddings, norms and the output head stay in the run's precision, as QLoRA keeps them.

The quantized weights are made from the base's full weights each time a model is built (quantization is a pure
function of them), so an adapter checkpoint never stores them: it records the base it was trained against.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from trainer_accel.errors import UserError
from trainer_accel.models.lora import LoRALinear

BLOCK = 64  # weights per quantization block (QLoRA's)
SCALER_BLOCK = 256  # block scales per second-level block (QLoRA's double quantization)


def _nf4():
    # torchao's import warns of each optional compiled kernel it cannot load (mxfp8, cutlass): none is NF4's
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:  # torchao 0.18 moved it here from torchao.dtypes.nf4tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import to_nf4
        except ImportError:
            raise UserError(
                'adapter.quantize_base "nf4" needs torchao (pip install torchao, or the qlora extra of this package)'
            ) from None
    return to_nf4


def quantizable(weight: torch.Tensor) -> bool:
    """NF4 quantizes whole blocks: the weight's count a multiple of 64, and its 64-blocks' count divisible into
    second-level blocks (256 of them, or fewer for a small weight)."""
    n = weight.numel()
    return n % BLOCK == 0 and scaler_block(n // BLOCK) > 0


def scaler_block(blocks: int) -> int:
    """The largest second-level block (at most 256 scales) that divides the number of 64-blocks; 0 if none."""
    return next((s for s in range(min(SCALER_BLOCK, blocks), 0, -1) if blocks % s == 0 and s % 2 == 0), 0)


def quantize_base(model: nn.Module) -> nn.Module:
    """Every linear weight of the blocks that does not train becomes an NF4 parameter (after the base's weights
    are loaded). A weight NF4 cannot block is refused with its name and size."""
    to_nf4 = _nf4()
    for name, module in model.blocks.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(module, (nn.Linear, LoRALinear)) or w is None:
            continue
        if not quantizable(w):
            raise UserError(
                f"blocks.{name}.weight: {w.numel():,} values cannot be held in NF4 blocks of {BLOCK} (a multiple of "
                f"{BLOCK * 2} is needed); train this model without quantize_base"
            )
        quantized = to_nf4(w.detach(), BLOCK, scaler_block(w.numel() // BLOCK))
        module.weight = nn.Parameter(quantized, requires_grad=False)
    return model


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """What the NF4 base computes with for this weight (the base an adapter was trained against)."""
    to_nf4 = _nf4()
    return to_nf4(weight.detach().float(), BLOCK, scaler_block(weight.numel() // BLOCK)).get_original_weight()
