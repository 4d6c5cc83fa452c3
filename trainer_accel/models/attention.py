"""Attention under a mask (packed rows, padded batches), on a kernel chosen on purpose rather than left to SDPA.

Unmasked causal attention is left to `scaled_dot_product_attention`'s own choice (flash, or cuDNN's on Hopper):
fast and well trodden. With an explicit mask on CUDA in bf16 or fp16, SDPA prefers cuDNN's attention on Hopper
with a recent cuDNN, for which torch has a reported regression since 2.11 (NaN gradients of q with an explicit
mask at some sequence lengths; pytorch issue 196678), so the masked path asks for the memory-efficient kernel
(the one the packing measurements in docs/devices.md ran on), with the math kernel as the fallback for a shape it
refuses. That kernel does not take grouped-query heads in every torch this trainer supports (torch's
sdp_utils.cpp refuses them for it in older releases and admits them on CUDA in 2.14), so there k and v are
repeated to one per query head, as transformers' SDPA path does under a mask: the same numbers, one extra copy of
k and v per layer. On the CPU, MPS and in fp32 SDPA keeps its choice (its masked kernels there have no such report).
`gpu_check` asserts the kernel with the profiler and the gradients finite at T % 128 == 64.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MASKED_HALF_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def pinned_kernel(q: torch.Tensor) -> bool:
    """Whether masked attention of queries `q` runs on the chosen kernels instead of SDPA's choice."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float, pin: bool | None = None
) -> torch.Tensor:
    """SDPA of (B, H, T, hd) queries over (B, KV, S, hd) keys and values under a boolean (B, 1, T, S) mask (True:
    may attend). `pin` (default: `pinned_kernel(q)`) runs the memory-efficient / math kernels with k and v
    repeated per query head."""
    pin = pinned_kernel(q) if pin is None else pin
    groups = q.shape[1] // k.shape[1]
    if not pin:
        gqa = {"enable_gqa": True} if groups > 1 else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    with sdpa_kernel(MASKED_HALF_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
