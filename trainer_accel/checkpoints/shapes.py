"""Whether a state fits the model its model_cfg describes: every tensor there, none extra, each of its shape; the
expected names and shapes come from the one model builder (models/build.py), on the meta device.
"""

from __future__ import annotations

import torch

from trainer_accel.config import (
    ModelConfig,
    complete_model_cfg,
)
from trainer_accel.errors import first_line
from trainer_accel.models.build import expected_shapes


def state_problems(model_state: dict, model_cfg: dict) -> list[str]:
    """What keeps a state from loading, strictly, into the model its model_cfg describes: a missing, extra or
    wrong-shaped tensor. Checked on the meta device, so nothing is allocated."""
    try:
        expected = expected_shapes(ModelConfig(**complete_model_cfg(model_cfg)))
    except (TypeError, ValueError, RuntimeError) as e:
        return [f"model_cfg describes no model ({first_line(e)})"]
    if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
        return ["model_state is not a dict of tensors"]
    problems = [f"model_state lacks {k} {list(shape)}" for k, shape in expected.items() if k not in model_state]
    problems += [f"model_state holds {k}, which the model has not" for k in model_state if k not in expected]
    problems += [
        f"model_state {k} is {list(v.shape)}, the model's is {list(expected[k])}"
        for k, v in model_state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    return problems
