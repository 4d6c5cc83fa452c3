"""What a phase is: everything that makes one way of training differ from another, in one declaration.

The loop never asks which phase it runs: it draws the phase's batches by address and calls its loss. Everything
else that differs (the config keys, the caches, the end-of-phase gate, whether the result talks in a chat
template) is read from here by whoever needs it, so a new phase is one new module and no change elsewhere
(docs/architecture.md, "adding a phase").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trainer_accel.config import PhaseConfig, PhaseKeys
from trainer_accel.training.batches import Batch
from trainer_accel.training.losses import LossOut, counted_targets, token_cross_entropy

# A gate: (the measured validation sets of the candidate against its start, the forgetting tolerance, the minimum
# improvement) -> ("pass" | "fail", reasons). See experiments/evaluation.py for what a measured set holds.
Gate = Callable[[list[dict[str, Any]], float, float], tuple[str, list[str]]]


@dataclass(frozen=True)
class Phase:
    name: str  # --phase NAME, its checkpoints folder (checkpoints/NAME), the phase in every record
    title: str  # how messages name it: "pretrain", "SFT"
    stage_id: int  # its place in a pipeline's plots and events (pretrain 0, SFT 1)
    keys: PhaseKeys  # its own part of the config: the sources key and the kind of cache it names, replay, packing
    # the summed loss of a micro-batch, the weight it is a sum over, and the metrics to log (training/losses.py)
    loss: Callable[[torch.nn.Module, Batch], LossOut] = token_cross_entropy
    # the weight of a batch before any forward: the loop sums it over the step's micro-batches and processes first
    weight: Callable[[Batch], torch.Tensor] = counted_targets
    needs_reference: bool = False  # whether its loss compares with a frozen reference model (the start model)
    gate: Gate | None = None  # run on the phase's best at its end; its verdict decides whether best.pt deploys
    chat_model: bool = False  # its result answers in the chat template its caches were written in
    starts_from_a_model: bool = False  # without init_from (or a pipeline's earlier phase) it starts from random
    doc: str = ""  # one line for --help and docs: what the phase trains
    # the phase as one config's settings make it (its own config section: a loss and its weights), or None: the same
    configure: Callable[[Phase, PhaseConfig], Phase] | None = None
    # what it does once the model is ready, before the first step: (the Trainer, its StartPoint) -> None
    # (preference: the reference log-probabilities of its pairs)
    setup: Callable[[Any, Any], None] | None = None

    def for_config(self, cfg: PhaseConfig) -> Phase:
        return self if self.configure is None else self.configure(self, cfg)
