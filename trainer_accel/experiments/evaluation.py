"""The eval summary and promotion gate of an SFT checkpoint: better at its task, not worse at everything else.

The candidate (an SFT checkpoint) and its baseline (the checkpoint it started from) are evaluated on the same
fixed batches of every validation cache present: the pretrain streams and the SFT sets. The verdict is `pass`
when the candidate's loss is lower than the baseline's on every SFT set and no stream's loss rose by more than
`train_cfg.forgetting_tolerance` (the forgetting check); otherwise `fail`, with the reasons. Only a checkpoint
whose weights passed is deployable; the summary names them by the sha256 of their weights file, so a verdict can
never stick to other weights.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer_accel.checkpoints.discovery import read_steadily
from trainer_accel.checkpoints.layout import InvalidCheckpoint, model_sha256, read_meta
from trainer_accel.checkpoints.loading import LoadedCheckpoint
from trainer_accel.checkpoints.records import read_export_record
from trainer_accel.config import MODEL_SHAPE_KEYS, ModelConfig, shape_diff
from trainer_accel.data.cache import open_cache
from trainer_accel.errors import UserError
from trainer_accel.fsio import now_iso
from trainer_accel.models.build import build_model
from trainer_accel.models.generation import generate_ids
from trainer_accel.models.gpt import GPT
from trainer_accel.observability.manifest import (
    read_manifest,
    write_manifest,
)
from trainer_accel.paths import FOLDER_KINDS, PAIRS, STREAM, Paths
from trainer_accel.phases.phase import Gate
from trainer_accel.phases.registry import gate_of, phase_of
from trainer_accel.training.batches import Batches, PairSource, RowSource, last_answer
from trainer_accel.training.losses import answer_logps, token_cross_entropy
from trainer_accel.training.start import load_start


def val_sets(paths: Paths, V: int, T: int, B: int) -> list[tuple[str, Batches]]:
    """(name, batches) for every validation cache present that the model can read, streams first."""
    out = []
    for kind, source, path in paths.caches("val"):
        if not path.is_file():
            continue
        name = f"{path.parent.name}/{source}"  # streams/wiki, sft/dolly, pref/facts
        cache = open_cache(path, kind)
        if cache.meta["vocab_size"] > V or (kind == STREAM and cache.meta["num_tokens"] < T + 1):
            continue  # another tokenizer's cache, or too short for one window: not comparable
        source = (
            PairSource([cache], np.ones(1), T, [name])
            if kind == PAIRS
            else RowSource([cache], np.ones(1), T, [kind], [name])
        )
        out.append((name, Batches(source, source, B, 0)))
    return out


@torch.no_grad()
def pair_scores(model: torch.nn.Module, rows: Batches, device: torch.device) -> list[float]:
    """Each held-out pair's margin: the model's log-probability of the chosen answer minus the rejected one's
    (summed over the answer's tokens, its end-of-turn token included). Every pair of the cache, in order."""
    source: PairSource = rows.val
    n = source.caches[0].num_examples // 2
    out: list[float] = []
    for a in range(0, n, rows.B):
        batch = source.batch_of([(0, i) for i in range(a, min(a + rows.B, n))]).to(device)
        logps = answer_logps(model, batch, batch.y_masked)[1]
        k = logps.shape[0] // 2
        out += (logps[:k] - logps[k:]).tolist()
    return out


GENERATED_PROMPTS = 32  # held-out prompts answered by both models in the length check
GENERATED_TOKENS = 4  # each may write this many times its chosen answer's length (and at least 32 tokens)


@torch.no_grad()
def generation_lengths(model: GPT, rows: Batches) -> tuple[float, float]:
    """(mean answer length in tokens, share of answers that end) of greedy answers to the first held-out prompts:
    the length blow-up check of a preference gate. An answer ends when it writes the template's end of turn within
    its budget (GENERATED_TOKENS times the chosen answer's length)."""
    source: PairSource = rows.val
    cache, rule = source.caches[0], source.answers
    tokens = cache.tokens
    prompts, budgets = [], []
    for i in range(min(GENERATED_PROMPTS, cache.num_examples // 2)):
        ids = np.asarray(tokens[cache.starts[2 * i] : cache.starts[2 * i + 1]], dtype=np.int64)
        start, stop = last_answer(ids, rule)
        if start < model.cfg.T - 1:
            prompts.append(ids[:start].tolist())
            budgets.append(max(32, GENERATED_TOKENS * (stop - start)))
    del tokens
    lengths, ended = [], []
    for p, budget in zip(prompts, budgets):
        new = generate_ids(model, [p], budget, stop_ids=frozenset({rule.end}))[0]
        lengths.append(len(new))
        ended.append(bool(new) and new[-1] == rule.end)
    return (float(np.mean(lengths)), float(np.mean(ended))) if lengths else (0.0, 0.0)


def compare_pairs(name: str, base: list[float], cand: list[float], generation: dict | None) -> dict[str, Any]:
    """A preference set measured on both models: pair accuracy (the chosen answer more likely than the rejected
    one) and the mean margin, and the generated answers' length and end rate."""
    entry: dict[str, Any] = {"name": name, "kind": PAIRS, "pairs": len(base)}
    if not base:
        return {**entry, "measured": False, "why": "it holds no pairs"}
    acc_b, acc_c = float(np.mean([m > 0 for m in base])), float(np.mean([m > 0 for m in cand]))
    return {
        **entry,
        "measured": True,
        "baseline": acc_b,
        "candidate": acc_c,
        "delta": acc_c - acc_b,
        "baseline_margin": float(np.mean(base)),
        "candidate_margin": float(np.mean(cand)),
        **({"generation": generation} if generation is not None else {}),
    }


@torch.no_grad()
def batch_losses(model: torch.nn.Module, rows: Batches, batches: int, device: torch.device) -> list[tuple[float, int]]:
    """(loss sum, counted tokens) of validation batches 0..batches-1 (the loop's own fixed batches): the token loss
    of what each cache teaches (a stream's every next token, an example's answers)."""
    out = []
    for i in range(batches):
        s, n, _ = token_cross_entropy(model, rows.val_batch(i).to(device))
        out.append((float(s), int(n)))
    return out


def compare_set(name: str, base: list[tuple[float, int]], cand: list[tuple[float, int]]) -> dict[str, Any]:
    """One validation set measured on both models: token-weighted losses, their delta, and the standard error of
    the per-batch paired differences (both models see the same batches, so the same tokens are counted)."""
    kind = FOLDER_KINDS[name.split("/", 1)[0]]
    counted = sum(n for _, n in base)
    entry: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "batches_measured": sum(1 for _, n in base if n),
        "tokens": counted,
    }
    if not counted:
        return {**entry, "measured": False, "why": f"its {len(base)} eval batches hold no counted tokens"}
    b, c = sum(s for s, _ in base) / counted, sum(s for s, _ in cand) / counted
    if not (math.isfinite(b) and math.isfinite(c)):
        return {**entry, "measured": False, "why": f"a loss is not finite (baseline {b}, candidate {c})"}
    diffs = [(sc - sb) / n for (sb, n), (sc, _) in zip(base, cand) if n]
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {**entry, "measured": True, "baseline": b, "candidate": c, "delta": c - b, "stderr": stderr}


def _model(loaded: LoadedCheckpoint, device: torch.device) -> GPT:
    return build_model(ModelConfig(**loaded.meta["model_cfg"]), device, state=loaded.model_state).eval()


def _identity(loaded: LoadedCheckpoint) -> dict[str, Any]:
    return {
        "checkpoint": str(Path(loaded.source).resolve()),
        "run_id": loaded.meta.get("run_id"),
        "phase": loaded.meta.get("phase"),
        "step": loaded.step,
        "model_sha256": model_sha256(loaded.meta),
    }


def eval_summary(
    candidate: LoadedCheckpoint,
    baseline: LoadedCheckpoint,
    paths: Paths,
    tolerance: float,
    batches: int,
    B: int,
    device: torch.device,
    min_improvement: float = 0.0,
    gate: Gate | None = None,
) -> dict[str, Any]:
    """Both checkpoints on the same batches of every validation set; the deltas and the verdict of `gate` (None:
    the candidate's phase's, registry.gate_of)."""
    mc, mb = candidate.meta["model_cfg"], baseline.meta["model_cfg"]
    T = min(mc["T"], mb["T"])
    sets = []
    cand_model, base_model = _model(candidate, device), _model(baseline, device)
    phase = phase_of(candidate.meta)
    judged_on_pairs = phase is not None and phase.keys.sources_kind == PAIRS
    for name, rows in val_sets(paths, min(mc["V"], mb["V"]), T, B):
        if isinstance(rows.val, PairSource):
            if not judged_on_pairs:  # pairs are a preference model's test; SFT and pretraining are judged without
                continue
            (bl, be), (cl, ce) = generation_lengths(base_model, rows), generation_lengths(cand_model, rows)
            lengths = {"baseline_length": bl, "candidate_length": cl, "baseline_ended": be, "candidate_ended": ce}
            sets.append(
                compare_pairs(
                    name, pair_scores(base_model, rows, device), pair_scores(cand_model, rows, device), lengths
                )
            )
            continue
        sets.append(
            compare_set(
                name, batch_losses(base_model, rows, batches, device), batch_losses(cand_model, rows, batches, device)
            )
        )
    result, reasons = (gate or gate_of(candidate.meta))(sets, tolerance, min_improvement)
    return {
        "candidate": _identity(candidate),
        "baseline": _identity(baseline),
        "sets": sets,
        "tolerance": tolerance,
        "min_improvement": min_improvement,
        "batches": batches,
        "B": B,
        "T": T,
        "verdict": result,
        "reasons": reasons,
        "evaluated_at": now_iso(),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'set':<18}{'baseline':>10}{'candidate':>11}{'delta':>10}{'needed':>10}"]
    for s in summary["sets"]:
        if not s.get("measured", True):
            lines.append(f"{s['name']:<18}{'not measured: ' + s['why']:>41}")
            continue
        if s["kind"] == PAIRS:  # pair accuracy, then the generated answers' length and end rate
            lines.append(
                f"{s['name'] + ' acc':<18}{s['baseline']:>10.3f}{s['candidate']:>11.3f}{s['delta']:>+10.3f}{'> 0':>10}"
            )
            g = s.get("generation")
            if g:
                lines.append(f"{'  answer length':<18}{g['baseline_length']:>10.1f}{g['candidate_length']:>11.1f}")
                lines.append(f"{'  answers ended':<18}{g['baseline_ended']:>10.0%}{g['candidate_ended']:>11.0%}")
            continue
        need = f"{-s['needed']:>+10.4f}" if "needed" in s else f"{'<= ' + format(summary['tolerance'], 'g'):>10}"
        lines.append(f"{s['name']:<18}{s['baseline']:>10.4f}{s['candidate']:>11.4f}{s['delta']:>+10.4f}{need}")
    lines.append(f"verdict: {summary['verdict']}" + "".join(f"\n  - {r}" for r in summary["reasons"]))
    if not_its_parent(summary):
        lines.append(f"NOT DEPLOYABLE whatever the verdict: {not_its_parent(summary)}")
    return "\n".join(lines)


def record_summary(paths: Paths, summary: dict[str, Any]) -> Path | None:
    """Add the summary to the candidate run's manifest (its eval summary is the newest one)."""
    run_id = summary["candidate"]["run_id"]
    if not run_id:
        return None
    path = paths.manifest(run_id)
    manifest = read_manifest(path) or {"run_id": run_id, "phase": summary["candidate"]["phase"], "status": "unknown"}
    write_manifest(
        path, {**manifest, "eval_summary": summary, "evaluations": [*manifest.get("evaluations", []), summary]}
    )
    return path


def find_verdict(paths: Paths, run_id: str | None, weights_sha256: str | None) -> dict[str, Any] | None:
    """The newest evaluation of exactly these weights, from their run's manifest."""
    manifest = read_manifest(paths.manifest(run_id)) if run_id else None
    for summary in reversed((manifest or {}).get("evaluations", [])):
        if weights_sha256 and summary["candidate"].get("model_sha256") == weights_sha256:
            return summary
    return None


def require_deployable(paths: Paths, checkpoint: Path) -> dict[str, Any]:
    """The passing evaluation of a checkpoint (a directory, or an exported .pt through its record), or a UserError
    that shows why it is not deployable."""
    if Path(checkpoint).is_file():
        record = read_export_record(Path(checkpoint))
        if record is None:
            raise UserError(
                f"{checkpoint}: no export record beside it to find its evaluation; pass its checkpoint directory"
            )
        run_id, weights = record.get("run_id"), record.get("model_sha256")
    else:
        try:
            meta = read_steadily(Path(checkpoint), read_meta)  # best/ may be replaced while its files are hashed
        except InvalidCheckpoint as e:
            raise UserError(f"{checkpoint}: not a checkpoint to check for deployment ({e})") from None
        run_id, weights = meta.get("run_id"), model_sha256(meta)
    summary = find_verdict(paths, run_id, weights)
    if summary is None:
        raise UserError(
            f"{checkpoint}: not deployable: never evaluated (run: python -m trainer_accel.runs evaluate "
            f"{checkpoint} --baseline BASELINE_CHECKPOINT)"
        )
    if summary["verdict"] != "pass":
        deltas = ", ".join(
            f"{s['name']} {s['delta']:+.4f}" if s.get("measured", True) else f"{s['name']} not measured"
            for s in summary["sets"]
        )
        raise UserError(
            f"{checkpoint}: not deployable: verdict {summary['verdict']} ({'; '.join(summary['reasons'])}); "
            f"deltas candidate - baseline: {deltas}"
        )
    if not_its_parent(summary):
        raise UserError(
            f"{checkpoint}: not deployable: its pass was against another model ({not_its_parent(summary)}); "
            "evaluate it against the checkpoint it started from"
        )
    return summary


def baseline_is_parent(candidate: LoadedCheckpoint, baseline: LoadedCheckpoint) -> bool | None:
    """Whether the baseline holds the weights the candidate's run started from (None: it recorded none)."""
    started_from = (candidate.meta.get("parent") or {}).get("model_sha256")
    return None if not started_from else model_sha256(baseline.meta) == started_from


def evaluate_checkpoints(
    paths: Paths,
    candidate: Path,
    baseline: Path,
    tolerance: float | None,
    device: torch.device,
    min_improvement: float | None = None,
) -> dict[str, Any]:
    """`runs evaluate` and the end of an SFT phase: load both, compare, record in the candidate's manifest.

    The gate measures what SFT cost the model it started from, so only that model is a baseline that can make
    the candidate deployable; another one is compared (and said to be another), models of other shapes are not."""
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(
            f"--tolerance: expected a number >= 0 (how far a pretrain val loss may rise, nats/token), got {tolerance:g}"
        )
    cand = load_start(candidate, None, with_optimizer=False)
    base = load_start(baseline, ModelConfig(**cand.meta["model_cfg"]), with_optimizer=False)  # grown as SFT's start was
    diff = shape_diff(base.meta["model_cfg"], cand.meta["model_cfg"], MODEL_SHAPE_KEYS)
    if diff:
        raise UserError(
            f"{baseline}: cannot be compared with {candidate}: the models differ ({diff}; baseline vs "
            "candidate); the baseline is the checkpoint the candidate started from"
        )
    t = cand.meta.get("train_cfg") or {}
    tol = tolerance if tolerance is not None else t.get("forgetting_tolerance", 0.1)
    if min_improvement is not None and not (math.isfinite(min_improvement) and min_improvement >= 0):
        raise UserError(
            f"--min-improvement: expected a number >= 0 (how far an SFT val loss must fall, nats/token), "
            f"got {min_improvement:g}"
        )
    floor = min_improvement if min_improvement is not None else t.get("min_improvement", 0.001)
    summary = eval_summary(cand, base, paths, tol, int(t.get("eval_batches", 8)), int(t.get("B", 8)), device, floor)
    summary["baseline_is_parent"] = baseline_is_parent(cand, base)
    record_summary(paths, summary)
    return summary


def not_its_parent(summary: dict[str, Any]) -> str | None:
    """Why a summary cannot make its candidate deployable, if it cannot: its baseline is not the candidate's parent."""
    known = summary.get("baseline_is_parent", True)  # summaries from before this was recorded were the gate's own
    if known is True:
        return None
    if known is None:
        checkpoint = summary["candidate"]["checkpoint"]
        return f"{checkpoint} records no checkpoint it started from, so no baseline is known to be its parent"
    return f"the baseline {summary['baseline']['checkpoint']} is not the checkpoint the candidate started from"
