"""What a phase's loss gives the loop, and the token-level reduction pretraining and SFT share.

A loss returns `LossOut`: the summed loss, the weight it is a sum over (the loop divides by the weight summed over
every micro-step and process, so accumulation and process count never change what "loss" means) and the sums of
any metrics the phase wants logged (divided by the same weight). The model hands back per-token log-probabilities
of the targets it is given, or their summed negative (the cross-entropy sum) when that is all a phase needs: the
sum is taken inside the fused cross-entropy, in the same order as always, so pretraining and SFT losses are
byte-identical to what they were (a sum of the per-token values differs in the last bits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from trainer_accel.data.cache import IGNORE_INDEX
from trainer_accel.models.lora import adapter_off
from trainer_accel.training.batches import Batch


class LossOut(NamedTuple):
    total: torch.Tensor  # summed loss of this micro-batch (fp32)
    weight: torch.Tensor  # what `total` is a sum over (counted tokens for token losses)
    metrics: dict[str, torch.Tensor] = {}  # summed extra figures, logged divided by the step's weight


def counted_targets(batch: Batch) -> torch.Tensor:
    """The targets a token loss counts, as a device tensor (reading it would be a host sync)."""
    return (batch.y_masked != IGNORE_INDEX).sum()


def token_cross_entropy(model: torch.nn.Module, batch: Batch) -> LossOut:
    """Summed cross-entropy of every counted target (a stream row's every next token, an example's answers).

    Called through the model's forward (in chunks there: a large vocabulary's fp32 logits never exist whole), so
    DDP's and FSDP's hooks stay around the head."""
    total = model(batch.x, batch.segments, targets=batch.y_masked)
    return LossOut(total, counted_targets(batch))


def sequence_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed log-probability of each row's counted targets and (B,) their number: what sequence-level losses
    (preference tuning) reduce, from the model's per-token log-probabilities (0 where a target is not counted)."""
    per_token = model(batch.x, batch.segments, targets=batch.y_masked, reduction="none")  # (B, T)
    return per_token.sum(dim=1), (batch.y_masked != IGNORE_INDEX).sum(dim=1)


def answer_logps(model: torch.nn.Module, batch: Batch, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, T) per-token log-probabilities of `targets` (0 where ignored; the answers, or with batch.y_all the
    prompts too) and (2B,) each row's summed answer log-probability: what preference losses reduce."""
    per_token = model(batch.x, batch.segments, targets=targets, reduction="none").float()
    return per_token, torch.where(batch.y_masked != IGNORE_INDEX, per_token, 0.0).sum(dim=1)


@contextlib.contextmanager
def reference_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model as a preference loss's reference: its adapter off (the start model, for free), dropout off, no
    graph; restored on exit."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), adapter_off(model):
            yield
    finally:
        model.train(was)
