"""The reference log-probabilities of a preference run without an adapter: the start model's, computed once per cache.

DPO and IPO compare the policy with the model the phase started from. With an adapter that model is the policy with
its adapter off (live, for free); without one it would be a second copy of the model, so instead each pair's two
answer log-probabilities are computed once, before the first step, and kept beside the cache
(`NAME_train.bin.ref.safetensors`, tensor "logps" (pairs, 2), fp32) with a fingerprint of everything they depend on:
the reference weights, the cache, its tokenizer and template, T (a pair longer than T+1 is cut) and the precision.
A later run or a resume with the same fingerprint reads them; any change computes them again, saying why. The
pairs are computed in chunks of B, chunk c on process c mod processes, so the values are the same for any process
count; every process then holds all of them (one all-gather), and the main process writes the file.

A resumed run's reference is the model its run started from, not the checkpoint it resumes: its identity is in
the checkpoint's record (`reference.weights_sha256`), and when the file must be computed again, those weights are
read from the run's parent checkpoint (refused, naming it, if it is gone or holds other weights now).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save

from trainer_accel.config import PhaseConfig, fingerprint
from trainer_accel.data.cache import Cache
from trainer_accel.data.chat_template import template_key
from trainer_accel.devices.collective import main_process_decides
from trainer_accel.errors import UserError
from trainer_accel.fsio import write_atomic
from trainer_accel.models.build import build_model
from trainer_accel.training.adapters import weights_sha256
from trainer_accel.training.batches import PairSource
from trainer_accel.training.losses import answer_logps, reference_mode
from trainer_accel.training.start import StartPoint, load_start, model_for

log = logging.getLogger(__name__)

RULE = "last-answer-v1"  # what a row scores and how a long pair is cut (batches.fit_pair); part of the fingerprint


def reference_file(cache: Cache) -> Path:
    return cache.path.with_name(cache.path.name + ".ref.safetensors")


def cache_fingerprint(weights: str, cache: Cache, T: int, precision: str) -> str:
    meta = cache.meta
    return fingerprint(
        {
            "weights": weights,
            "cache": meta["sha256"],
            "tokenizer": meta["tokenizer"],
            "template": template_key(meta.get("chat")),
            "T": T,
            "precision": precision,
            "rule": RULE,
        }
    )


def read_reference(cache: Cache, expected: str) -> tuple[np.ndarray | None, str | None]:
    """(the stored log-probabilities, None) when the file is there for exactly this fingerprint; else (None, why
    they must be computed)."""
    path = reference_file(cache)
    if not path.is_file():
        return None, "none computed yet"
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            stored = (f.metadata() or {}).get("fingerprint")
        logps = load_file(str(path))["logps"]
    except Exception as e:  # noqa: BLE001 - a damaged file is computed again, said in the log
        return None, f"{path.name} is not readable ({type(e).__name__})"
    if stored != expected:
        return None, f"{path.name} was computed for another start model, cache, tokenizer, template, T or precision"
    if logps.shape != (cache.num_examples // 2, 2):
        return None, f"{path.name} holds {logps.shape}, not one pair of values per pair"
    return logps, None


@torch.no_grad()
def compute_reference(acc, model: torch.nn.Module, source: PairSource, c: int, B: int) -> np.ndarray:
    """(pairs, 2) answer log-probabilities of cache c under the reference model, chunk k on process k mod world;
    every process runs the same number of forwards (FSDP gathers weights in each) and gets all the values."""
    n = source.caches[c].num_examples // 2
    chunks = [list(range(a, min(a + B, n))) for a in range(0, n, B)]
    world, rank = acc.num_processes, acc.process_index
    rounds = -(-len(chunks) // world)
    mine = torch.zeros(rounds, 2 * B, device=acc.device)
    for r in range(rounds):
        k = r * world + rank
        pairs = chunks[k] if k < len(chunks) else chunks[0]
        pairs = pairs + [pairs[-1]] * (B - len(pairs))  # the same rows for a chunk in any split: the same values
        batch = source.batch_of([(c, i) for i in pairs]).to(acc.device)
        with reference_mode(model), acc.autocast():
            mine[r] = answer_logps(model, batch, batch.y_masked)[1]
    every = (
        acc.gather(mine[None]).reshape(world, rounds, 2 * B).cpu().numpy() if world > 1 else mine[None].cpu().numpy()
    )
    out = np.zeros((n, 2), dtype=np.float32)
    for k, pairs in enumerate(chunks):
        values = every[k % world, k // world]
        out[pairs, 0], out[pairs, 1] = values[: len(pairs)], values[B : B + len(pairs)]
    return out


def reference_weights(cfg: PhaseConfig, start: StartPoint) -> str:
    """The identity of the reference weights: the start model's, hashed as loaded (under FSDP the model's own state
    is sharded), or its seed and shape when it starts from random weights (model_for draws them from the seed);
    recorded by the run, and read back when it resumes; the base's with its quantization for an adapter run."""
    if cfg.adapter is not None:
        return f"{start.base_record['sha256']}|{cfg.adapter.quantize_base}"
    if start.resumed is not None:
        recorded = (start.resumed.meta.get("reference") or {}).get("weights_sha256")
        if recorded is None:
            raise UserError(
                f"{start.resumed.source}: records no reference model to resume a precomputed-reference run with "
                "(written by another trainer version?); start the phase again with --no-resume"
            )
        return recorded
    if start.initial is not None:
        return weights_sha256(start.initial.model_state)
    return "random:" + fingerprint({"seed": cfg.train.seed, "model_cfg": cfg.model.to_dict()})


def reference_model(cfg: PhaseConfig, start: StartPoint, weights: str, device) -> torch.nn.Module:
    """The start model of a resumed full run, whose reference must be computed again: drawn from the seed again
    when it started from random weights, else read from the run's parent checkpoint and checked to be the same
    weights (a plain model on this process's device)."""
    if weights.startswith("random:"):
        return model_for(cfg, StartPoint()).to(device)
    parent = start.resumed.meta.get("parent") or {}
    path = Path(parent["checkpoint"]) if parent.get("checkpoint") else None
    loaded = load_start(path, cfg.model, with_optimizer=False) if path is not None and path.exists() else None
    if loaded is None or weights_sha256(loaded.model_state) != weights:
        raise UserError(
            f"{start.resumed.source}: its reference log-probabilities must be computed again and the model its run "
            f"started from ({path or 'not recorded'}) is {'gone' if loaded is None else 'holding other weights now'}"
            "; start the phase again with --no-resume"
        )
    return build_model(cfg.model, device, state=loaded.model_state)


def attach_reference(trainer, start: StartPoint) -> None:
    """Fill every pair source's reference values (trainer.batches) before the first step; record what they are."""
    acc, cfg, batches = trainer.acc, trainer.cfg, trainer.batches
    weights = reference_weights(cfg, start)
    found: dict[str, str] = {}
    computing_model = None
    for source in [batches.train] + ([batches.val] if batches.val is not batches.train else []):
        refs = []
        for c, cache in enumerate(source.caches):
            fp = cache_fingerprint(weights, cache, cfg.seq_len, str(acc.mixed_precision))
            found[f"{cache.path.parent.name}/{cache.path.name}"] = fp
            why = main_process_decides(acc, lambda cache=cache, fp=fp: read_reference(cache, fp)[1])
            if why is None:  # every process reads what the main process found (one filesystem, as for checkpoints)
                logps, problem = read_reference(cache, fp)
                if logps is None:
                    raise UserError(f"{reference_file(cache)}: {problem} on process {acc.process_index}")
                refs.append(logps)
                continue
            log.info("%s: computing the reference log-probabilities of its pairs (%s)", cache.path, why)
            if computing_model is None:
                computing_model = (
                    trainer.model
                    if cfg.adapter is not None or start.resumed is None
                    else reference_model(cfg, start, weights, acc.device)
                )
            logps = compute_reference(acc, computing_model, source, c, cfg.train.B)
            if acc.is_main_process:
                write_atomic(reference_file(cache), save({"logps": logps}, metadata={"fingerprint": fp}))
            acc.wait_for_everyone()
            refs.append(logps)
        source.refs = refs
    trainer.data_info["reference"] = {"weights_sha256": weights, "fingerprints": found}
    log.info("reference log-probabilities: %s", json.dumps({k: v[:12] for k, v in found.items()}))
