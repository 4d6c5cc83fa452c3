"""Supervised fine-tuning: conversations in the model's chat template, cross-entropy on the answers.

Examples are one per row or packed, with stream rows mixed in as replay (a stream row counts every target).
Its gate compares the phase's best with the model it started from on every validation set: better answers on
each SFT set, beyond noise, and no pretraining text forgotten beyond the tolerance.
"""

from __future__ import annotations

from typing import Any

from trainer_accel.config import PhaseKeys
from trainer_accel.paths import EXAMPLES, STREAM
from trainer_accel.phases.phase import Phase


def needed_improvement(s: dict[str, Any], min_improvement: float) -> float:
    """How far an SFT val loss must fall to be told from noise: the configured minimum, and twice the standard
    error of the per-batch differences (one batch has no spread to measure: the minimum alone)."""
    return max(min_improvement, 2 * s["stderr"]) if s.get("stderr") is not None else min_improvement


def unmeasured(sets: list[dict], phase: str) -> list[str]:
    """A set that could not be measured fails a gate: a source never measured is never certified."""
    return [
        f"{s['name']}: not measured ({s['why']}), so nothing shows what {phase} did to it"
        for s in sets
        if not s.get("measured", True)
    ]


def rose(sets: list[dict], kind: str, what: str, tolerance: float) -> list[str]:
    """Each measured set of `kind` whose val loss rose by more than the tolerance (forgetting)."""
    return [
        f"{s['name']}: {what} val loss rose by {s['delta']:+.4f}, more than the tolerance {tolerance:g}"
        for s in sets
        if s.get("measured", True) and s["kind"] == kind and not s["delta"] <= tolerance
    ]


def promotion_gate(sets: list[dict], tolerance: float, min_improvement: float = 0.0) -> tuple[str, list[str]]:
    """A set that could not be measured fails the gate. Each SFT set judged is noted with the fall it `needed`."""
    reasons = unmeasured(sets, "SFT")
    measured = [s for s in sets if s.get("measured", True)]
    answers = [s for s in measured if s["kind"] == EXAMPLES]
    if not answers:
        reasons.append("no measured SFT validation set to show an improvement on")
    for s in answers:
        s["needed"] = need = needed_improvement(s, min_improvement)
        if not s["delta"] < -need:
            reasons.append(
                f"{s['name']}: SFT val loss did not improve by more than {need:.4g} "
                f"({s['baseline']:.4f} -> {s['candidate']:.4f}, delta {s['delta']:+.4g})"
            )
    reasons += rose(sets, STREAM, "pretrain", tolerance)
    return ("pass" if not reasons else "fail"), reasons


SFT = Phase(
    name="sft",
    title="SFT",
    stage_id=1,
    keys=PhaseKeys(
        sources_key="sft_sources",
        sources_kind=EXAMPLES,
        example="dolly",
        missing='{"dolly": 0.5, "oasst1": 0.5}',
        replay=True,
        packs=True,
    ),
    gate=promotion_gate,
    chat_model=True,
    starts_from_a_model=True,
    doc="conversations in the model's chat template, cross-entropy on the answers",
)
