"""Preference tuning: a prompt with a chosen and a rejected answer; the model is taught to prefer the chosen one.

Four losses, each the formula of its paper on the summed log-probabilities of each answer's tokens (its
end-of-turn token included; the prompt never counts): the pair's chosen and rejected rows go through one forward.
    dpo    -log σ(β((log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))))          Rafailov et al. 2023
    ipo    (h − 1/(2τ))², h the same log-ratio difference with each answer's log-ratio averaged over its tokens,
           as TRL computes it and the IPO authors confirmed (Azar et al. 2023, eq. 17)
    simpo  −log σ(β·mean log π(y_w) − β·mean log π(y_l) − γ), no reference                  Meng et al. 2024
    orpo   NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)), odds from each answer's mean token log-probability,
           in fp32, no reference (Hong et al. 2024); the NLL is token-weighted over the step's chosen answers, or
           over their prompts and answers with `nll_counts_prompt` (TRL's ORPOTrainer counts the prompt)
The reference of DPO and IPO is the model the phase starts from: with an adapter, the same model with the adapter
off (computed live, `reference: "live"`); without, its log-probabilities computed once per cache and kept beside
it with a fingerprint (training/reference.py). Metrics carry TRL's names so runs compare across tools.

Its gate: held-out pair accuracy above the start model's, SFT answers not worse beyond the tolerance, no
pretraining text forgotten, and answers that still end (generated length and end-of-answer rate, measured by
experiments/evaluation.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainer_accel.config import PhaseConfig, PhaseKeys
from trainer_accel.data.cache import IGNORE_INDEX
from trainer_accel.paths import EXAMPLES, PAIRS, STREAM
from trainer_accel.phases.phase import Phase
from trainer_accel.phases.sft import rose, unmeasured
from trainer_accel.schema import build_dataclass
from trainer_accel.training.batches import Batch
from trainer_accel.training.losses import LossOut, answer_logps, reference_mode
from trainer_accel.training.reference import attach_reference

LOSSES = ("dpo", "ipo", "simpo", "orpo")
NEEDS_REFERENCE = ("dpo", "ipo")
REFERENCES = ("live", "precomputed")
# each loss's own settings (JSON keys); `reference` belongs to those that compare with one
OWN_KEYS = {
    "dpo": ("beta", "reference"),
    "ipo": ("tau", "reference"),
    "simpo": ("beta", "gamma"),
    "orpo": ("lambda", "nll_counts_prompt"),
}
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}
# the gate's length check: the candidate's mean generated answer may be this much longer than the start model's,
# and its share of answers that end (the end-of-turn token within the budget) this much lower
LENGTH_RATIO, END_RATE_DROP = 1.5, 0.1


@dataclass(frozen=True)
class PreferenceConfig:
    """The `preference` section of a preference config."""

    loss: str = "dpo"  # dpo | ipo | simpo | orpo
    beta: float | None = None  # dpo: the KL weight (0.1); simpo: the reward scale (2.0)
    tau: float = 0.1  # ipo: the regularisation (the target log-ratio difference is 1/(2 tau))
    gamma: float = 1.0  # simpo: the target reward margin (gamma/beta 0.5 at beta 2, the paper's range)
    lambda_: float = 0.1  # orpo: the odds-ratio term's weight ("lambda" in the JSON)
    nll_counts_prompt: bool = False  # orpo: the NLL term over the chosen prompt and answer (TRL) or the answer (paper)
    reference: str | None = None  # dpo/ipo: "live" (adapter off) or "precomputed"; null: live with an adapter

    @property
    def scale(self) -> float:
        """The reward scale of the loss (TRL logs rewards as it)."""
        return {"ipo": self.tau, "orpo": self.lambda_}.get(self.loss, self.beta or 0.0)

    @property
    def needs_reference(self) -> bool:
        return self.loss in NEEDS_REFERENCE

    def to_dict(self) -> dict[str, Any]:
        """Only the chosen loss's settings, as the user writes them."""
        out = {"loss": self.loss}
        for key in OWN_KEYS[self.loss]:
            out[key] = getattr(self, "lambda_" if key == "lambda" else key)
        return out


def parse_preference(value: Any, where: str, problems: list[str], adapter: bool) -> PreferenceConfig:
    """The section: `loss` and that loss's own settings (a setting of another loss is a mistake, said as one)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f'{where}: expected an object like {{"loss": "dpo", "beta": 0.1}}')
        return PreferenceConfig()
    loss = value.get("loss", "dpo")
    if loss not in LOSSES:
        problems.append(f"{where}.loss: expected one of {', '.join(LOSSES)}, got {json.dumps(loss)}")
        return PreferenceConfig()
    for key in value:
        if key != "loss" and key not in OWN_KEYS[loss]:
            owner = next((name for name, keys in OWN_KEYS.items() if key in keys), None)
            problems.append(
                f"{where}.{key}: not a setting of loss {loss} (it takes {', '.join(OWN_KEYS[loss])})"
                + (f"; {key} is {owner}'s" if owner else "")
            )
    data = {("lambda_" if k == "lambda" else k): v for k, v in value.items() if k == "loss" or k in OWN_KEYS[loss]}
    found: list[str] = []
    built = build_dataclass(PreferenceConfig, data, where, found) or PreferenceConfig(loss=loss)
    problems += [line.replace(f"{where}.lambda_:", f"{where}.lambda:") for line in found]  # as the user spells it
    cfg = dataclasses.replace(built, beta=built.beta if built.beta is not None else DEFAULT_BETA.get(loss))
    for key in ("beta", "tau", "lambda_"):
        v = getattr(cfg, key)
        if key.rstrip("_") in OWN_KEYS[loss] and v is not None and not v > 0:
            problems.append(f"{where}.{key.rstrip('_')}: must be positive, got {v}")
    if loss == "simpo" and not cfg.gamma >= 0:
        problems.append(f"{where}.gamma: must be >= 0, got {cfg.gamma}")
    if cfg.needs_reference:
        if cfg.reference is None:
            cfg = dataclasses.replace(cfg, reference="live" if adapter else "precomputed")
        elif cfg.reference not in REFERENCES:
            problems.append(f"{where}.reference: expected live or precomputed, got {json.dumps(cfg.reference)}")
        elif cfg.reference == "live" and not adapter:
            problems.append(
                f'{where}.reference: "live" is the model with its adapter off, and this run has no adapter; '
                'use "precomputed" (the start model\'s log-probabilities, computed once per cache)'
            )
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# The losses


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and far below it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def reference_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    if batch.ref_logps is not None:
        return batch.ref_logps.float()
    with reference_mode(model):
        return answer_logps(model, batch, batch.y_masked)[1]


def pair_losses(cfg: PreferenceConfig, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None) -> dict:
    """Per pair: the loss (without ORPO's NLL), the rewards of each answer and what is logged beside them."""
    B = logps.shape[0] // 2
    pc, pr = logps[:B], logps[B:]
    nc, nr = counts[:B].clamp_min(1), counts[B:].clamp_min(1)
    out: dict[str, torch.Tensor] = {}
    if cfg.loss in ("dpo", "ipo"):
        rc, rr = ref[:B], ref[B:]
        if cfg.loss == "dpo":
            out["loss"] = -F.logsigmoid(cfg.beta * ((pc - rc) - (pr - rr)))
        else:
            h = (pc - rc) / nc - (pr - rr) / nr
            out["loss"] = (h - 1 / (2 * cfg.tau)) ** 2
        out["chosen"], out["rejected"] = cfg.scale * (pc - rc), cfg.scale * (pr - rr)
    elif cfg.loss == "simpo":
        mc, mr = pc / nc, pr / nr
        out["loss"] = -F.logsigmoid(cfg.beta * mc - cfg.beta * mr - cfg.gamma)
        out["chosen"], out["rejected"] = cfg.beta * mc, cfg.beta * mr
    else:
        mc, mr = pc / nc, pr / nr
        log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
        ratio = F.logsigmoid(log_odds)
        out["loss"] = -cfg.lambda_ * ratio
        out["chosen"], out["rejected"] = cfg.lambda_ * mc, cfg.lambda_ * mr
        out["log_odds_ratio"], out["log_odds_chosen"] = ratio, log_odds
        pc, pr = mc, mr  # TRL's ORPO logs the mean token log-probabilities
    out["logps/chosen"], out["logps/rejected"] = pc, pr
    return out


def preference_loss(cfg: PreferenceConfig):
    """The phase's loss for these settings: (model, batch) -> LossOut, summed over the batch's pairs (and, for
    ORPO, its NLL summed over its tokens: the second part of the weight)."""

    def loss(model: torch.nn.Module, batch: Batch) -> LossOut:
        ref = reference_logps(model, batch) if cfg.needs_reference else None
        orpo = cfg.loss == "orpo"
        per_token, logps = answer_logps(model, batch, batch.y_all if orpo else batch.y_masked)
        counts = (batch.y_masked != IGNORE_INDEX).sum(dim=1)
        parts = pair_losses(cfg, logps, counts, ref)
        B = counts.shape[0] // 2
        d = {k: v.detach() for k, v in parts.items()}
        metrics = {
            "rewards/chosen": d["chosen"].sum(),
            "rewards/rejected": d["rejected"].sum(),
            "rewards/accuracies": (d["chosen"] > d["rejected"]).float().sum(),
            "rewards/margins": (d["chosen"] - d["rejected"]).sum(),
            "logps/chosen": d["logps/chosen"].sum(),
            "logps/rejected": d["logps/rejected"].sum(),
            "lengths/chosen": counts[:B].float().sum(),
            "lengths/rejected": counts[B:].float().sum(),
        }
        total = parts["loss"].sum()
        if not orpo:
            return LossOut(total, torch.full((), B, dtype=torch.float, device=total.device), metrics)
        answer_nll = -logps[:B].sum()
        all_nll = -per_token[:B].sum()
        n_answer, n_all = counts[:B].sum().float(), (batch.y_all[:B] != IGNORE_INDEX).sum().float()
        metrics["log_odds_ratio"] = d["log_odds_ratio"].sum()
        metrics["log_odds_chosen"] = d["log_odds_chosen"].sum()
        nll = all_nll if cfg.nll_counts_prompt else answer_nll
        # (sum, count) pairs: logged as their ratio over the step, token-weighted as the loss is
        metrics["nll_loss"] = torch.stack([nll.detach(), n_all if cfg.nll_counts_prompt else n_answer])
        metrics["nll_loss/answer"] = torch.stack([answer_nll.detach(), n_answer])
        metrics["nll_loss/prompt_and_answer"] = torch.stack([all_nll.detach(), n_all])
        return LossOut(torch.stack([total, nll]), orpo_weight(cfg, batch), metrics)

    return loss


def pairs_weight(batch: Batch) -> torch.Tensor:
    """A pair loss is a mean over pairs: the weight of a batch is its number of pairs."""
    return torch.full((), batch.x.shape[0] // 2, dtype=torch.float, device=batch.x.device)


def orpo_weight(cfg: PreferenceConfig, batch: Batch) -> torch.Tensor:
    """ORPO is two means: over pairs (the odds-ratio term) and over the NLL's tokens."""
    B = batch.x.shape[0] // 2
    targets = batch.y_all if cfg.nll_counts_prompt else batch.y_masked
    return torch.stack([pairs_weight(batch), (targets[:B] != IGNORE_INDEX).sum().float()])


# ---------------------------------------------------------------------------------------------------------------
# The gate


def preference_gate(sets: list[dict], tolerance: float, min_improvement: float = 0.0) -> tuple[str, list[str]]:
    """Pass when the held-out pair accuracy rose on every preference set, no SFT set's answers got worse and no
    stream's loss rose beyond the tolerance, and the generated answers neither grew past LENGTH_RATIO times the
    start model's nor stopped ending (END_RATE_DROP)."""
    reasons = unmeasured(sets, "preference tuning")
    measured = [s for s in sets if s.get("measured", True)]
    pairs = [s for s in measured if s["kind"] == PAIRS]
    if not pairs:
        reasons.append("no measured preference validation set to show an improvement on")
    for s in pairs:
        if not s["candidate"] > s["baseline"]:
            reasons.append(
                f"{s['name']}: held-out pair accuracy did not rise ({s['baseline']:.3f} -> {s['candidate']:.3f})"
            )
        g = s.get("generation")
        if g is None:
            continue
        if g["candidate_length"] > LENGTH_RATIO * max(g["baseline_length"], 1.0):
            reasons.append(
                f"{s['name']}: generated answers grew from {g['baseline_length']:.1f} to {g['candidate_length']:.1f} "
                f"tokens on average (more than {LENGTH_RATIO:g}x)"
            )
        if g["candidate_ended"] < g["baseline_ended"] - END_RATE_DROP:
            reasons.append(
                f"{s['name']}: answers that end fell from {g['baseline_ended']:.0%} to {g['candidate_ended']:.0%}"
            )
    reasons += rose(sets, EXAMPLES, "SFT", tolerance) + rose(sets, STREAM, "pretrain", tolerance)
    return ("pass" if not reasons else "fail"), reasons


def configured(phase: Phase, cfg: PhaseConfig) -> Phase:
    """The phase with this config's loss: its weight (ORPO's two parts), and its reference (precomputed: filled
    in before the first step by training/reference.py)."""
    settings: PreferenceConfig = cfg.settings
    return dataclasses.replace(
        phase,
        loss=preference_loss(settings),
        weight=(lambda batch: orpo_weight(settings, batch)) if settings.loss == "orpo" else pairs_weight,
        needs_reference=settings.needs_reference,
        setup=attach_reference if settings.reference == "precomputed" and settings.needs_reference else None,
    )


def _parse(value: Any, where: str, problems: list[str], data: dict) -> PreferenceConfig:
    return parse_preference(value, where, problems, data.get("adapter") is not None)


PREFERENCE = Phase(
    name="preference",
    title="preference",
    stage_id=2,
    keys=PhaseKeys(
        sources_key="pref_sources",
        sources_kind=PAIRS,
        example="facts",
        missing='{"facts": 1.0}',
        no_packing="packing is for SFT; a preference row is one side of a pair, scored whole, as long as the pair's "
        "longest row",
        settings_key="preference",
        settings=_parse,
        settings_fields=frozenset({"loss", "beta", "tau", "gamma", "lambda", "nll_counts_prompt", "reference"}),
    ),
    loss=preference_loss(PreferenceConfig(loss="dpo", beta=0.1)),
    weight=pairs_weight,
    needs_reference=True,
    gate=preference_gate,
    chat_model=True,
    starts_from_a_model=True,
    configure=configured,
    doc="pairs of answers in the chat template, the chosen one preferred (dpo, ipo, simpo, orpo)",
)
