"""What a run would do, before it spends hours: `run --plan` and `queue plan`.

Everything here reads and nothing writes: the resolved config with each value's origin, the compute, model size,
tokens and FLOPs, the caches, the checkpoints it would write and keep, and whether it would resume. Problems
that would stop the run (missing or broken caches, a starting checkpoint that does not fit) are listed too.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer_accel.checkpoints.discovery import checkpoint_phase, phase_finished
from trainer_accel.checkpoints.full_state import checkpoint_bytes
from trainer_accel.config import PhaseConfig
from trainer_accel.data.cache import open_cache
from trainer_accel.devices.ownership import in_use
from trainer_accel.errors import UserError
from trainer_accel.models.gpt import LOGIT_CHUNK_BYTES
from trainer_accel.models.lora import chosen_targets, parameter_counts
from trainer_accel.paths import PAIRS, STREAM, Paths
from trainer_accel.phases.pipeline import load_pipeline
from trainer_accel.phases.registry import PIPELINE, load_config, phase_named
from trainer_accel.training.inputs import check_phase_inputs, phase_cache_paths
from trainer_accel.training.start import check_start_checkpoint, model_shapes, resume_point, same_tokenizer


def flops_per_token(cfg: PhaseConfig) -> float:
    """6N for the weights' matmuls (forward and backward) plus the attention scores, as in the PaLM paper and
    nanoGPT; N leaves out the position embeddings, which are looked up, not multiplied."""
    m = cfg.model
    attention = m.C * (m.H + 2 * m.kv_heads) * m.hd + m.H * m.hd * m.C  # q, k, v and the output projection
    mlp = m.C * m.d_ff * (3 if m.mlp == "gated" else 2)
    n = m.V * m.C + m.L * (attention + mlp)  # the output layer, blocks
    return 6 * n + 12 * m.L * m.H * m.hd * cfg.seq_len


def architecture(m) -> str:
    """The model's options in a few words: 'learned positions, layernorm, gelu MLP, 6 heads' or 'rope (theta
    10000), rmsnorm, gated silu MLP, 6 query / 2 key-value heads of 64'."""
    pos = (
        f"rope (theta {m.rope_theta:g}{', llama3 scaling' if m.rope_scaling else ''})"
        if m.position == "rope"
        else "learned positions"
    )
    heads = f"{m.H} heads" if m.kv_heads == m.H else f"{m.H} query / {m.kv_heads} key-value heads"
    extras = [
        x
        for x, on in (
            ("q/k/v biases", m.qkv_bias),
            ("q/k norm", m.qk_norm),
            ("biases", m.bias),
            ("untied head", not m.tie_embeddings),
        )
        if on
    ]
    return ", ".join(
        [pos, m.norm, f"{'gated ' if m.mlp == 'gated' else ''}{m.activation} MLP", f"{heads} of {m.hd}", *extras]
    )


MANY_PASSES = 100  # over a training cache: past this the run mostly memorises
ASSUMED_MFU = {"cuda": 0.4, "cpu": 0.5}  # of the peak below; what the bench measured (GPU: 44-47%, CPU: 55%)


def assumed_flops(device, precision: str, tf32: bool) -> tuple[float | None, str]:
    """The FLOP/s a step-time estimate assumes on this machine, and what it rests on (None where nothing does)."""
    from trainer_accel.devices.hardware import gpu_peak_flops, measured_matmul_flops

    if device.type == "cuda":
        peak, source = gpu_peak_flops(device, precision, tf32)
    elif device.type == "cpu":  # fp32: a CPU without bf16 instructions emulates bf16 too slowly to measure quickly;
        # no 2048 x 2048: on one thread a single one takes 0.2 s and measures what 1024 does (within 2%, 2 cores)
        peak = measured_matmul_flops(device, torch.float32, seconds=0.2, sizes=(512, 1024))
        source = "an fp32 matmul peak measured now"
    else:
        return None, f"no peak known for {device.type}"
    if not peak:
        return None, source
    mfu = ASSUMED_MFU[device.type]
    return peak * mfu, f"{mfu:.0%} of {_si(peak)}FLOP/s, {source}"


@dataclass
class PhasePlan:
    cfg: PhaseConfig
    processes: int
    parameters: int
    checkpoint_bytes: int
    start_step: int
    start: str  # "fresh", or where it resumes / initialises from
    caches: list[dict[str, Any]] = field(default_factory=list)
    trainable: int | None = None  # an adapter run's trainable parameters (None: all of them train)
    data_fingerprint: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.B * t.accum_steps * self.processes * self.cfg.seq_len

    @property
    def steps_to_run(self) -> int:
        return max(0, self.cfg.train.total_steps - self.start_step)

    @property
    def flops_per_step(self) -> float:
        return flops_per_token(self.cfg) * self.tokens_per_step

    def memory_bytes(self, precision: str) -> dict[str, float]:
        """A rough upper estimate of one process's peak memory: fp32 weights, gradients and AdamW state (16 bytes a
        parameter); the activations a micro-batch keeps for its backward (after Korthikanti et al. 2022, with flash
        attention: (18 C + 4 d_ff) bytes per token and layer in 16-bit); the logits and their gradient (in the
        compute precision when compiled, with fp32 copies when not; one loss chunk of them for a large vocabulary).
        For GPT-2 small at B=64, bf16 + compile it says
        33.3 GiB where the bench measured 28.5 GiB on an H200."""
        m, t = self.cfg.model, self.cfg.train
        half = precision in ("bf16", "fp16")
        tokens = t.B * self.cfg.seq_len
        chunk = max(1, LOGIT_CHUNK_BYTES // (4 * m.V))  # the loss's logits exist a chunk at a time (models/gpt.py)
        per_layer = tokens * (18 * m.C + (6 if m.mlp == "gated" else 4) * m.d_ff) * (1 if half else 2)
        k = t.activation_checkpointing  # recomputed blocks keep their input alone, and one is recomputed at a time
        redone = len(range(0, m.L, k)) if k else 0
        if self.trainable is None:
            state = {"weights, gradients, AdamW state": 16.0 * self.parameters}
        else:  # a frozen base has no gradients or optimizer state: fp32 weights, or NF4's ~4.13 bits a weight
            frozen = self.parameters - self.trainable
            nf4 = self.cfg.adapter.quantize_base == "nf4"
            state = {
                f"frozen base ({'NF4' if nf4 else 'fp32'})": frozen * (4.13 / 8 if nf4 else 4.0),
                "adapter weights, gradients, AdamW state": 16.0 * self.trainable,
            }
        out = {
            **state,
            "activations": (m.L - redone) * per_layer
            + (redone * tokens * m.C * (2 if half else 4) + (per_layer if redone else 0)),
            "logits": min(tokens, chunk) * m.V * (4 if half and t.compile and tokens <= chunk else 12),
        }
        return {**out, "total": sum(out.values())}

    def passes(self) -> dict[str, float]:
        """How many times the run reads each training source over: rows drawn by its share, against the cache's
        tokens (streams), examples (SFT) or pairs (preference)."""
        t, out, mixture = self.cfg.train, {}, self.cfg.mixture()
        for c in self.caches:
            share = mixture.get(c["name"], 0)
            if c["split"] != "train" or c["status"] != "found" or share <= 0:
                continue
            key = c["name"] if self.cfg.replay or self.cfg.keys.sources_kind != STREAM else c["source"]  # SFT may
            # name a stream and a set alike
            if c.get("examples"):
                out[key] = self.steps_to_run * t.B * t.accum_steps * self.processes * share / c["examples"]
            else:
                out[key] = self.steps_to_run * self.tokens_per_step * share / c["tokens"]
        return out

    def warnings(self) -> list[str]:
        return [
            f"{source}: {n:,.0f} passes over its training cache; the model will have memorised it long before "
            f"the end (add data, or lower train_cfg.total_steps)"
            for source, n in self.passes().items()
            if n > MANY_PASSES
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.cfg.phase,
            "parameters": self.parameters,
            "tokens_per_step": self.tokens_per_step,
            "steps_to_run": self.steps_to_run,
            "tokens_to_run": self.tokens_per_step * self.steps_to_run,
            "flops_per_step": self.flops_per_step,
            "flops_to_run": self.flops_per_step * self.steps_to_run,
            "checkpoint_bytes": self.checkpoint_bytes,
            "start": self.start,
            "start_step": self.start_step,
            "data_fingerprint": self.data_fingerprint,
            "problems": self.problems,
        }


def _describe_caches(cfg: PhaseConfig, paths: Paths) -> list[dict[str, Any]]:
    train, val = phase_cache_paths(cfg, paths)
    out = []
    for split, refs in (("train", train), ("val", val)):
        for r in refs:
            row = {"split": split, "source": r.source, "name": r.name, "path": str(r.path), "status": "missing"}
            if r.path.is_file():
                try:
                    cache = open_cache(r.path, r.kind)
                    pairs = r.kind == PAIRS  # a pair is two conversations of its cache, drawn as one
                    count = cache.meta.get("num_pairs") if pairs else cache.meta.get("num_examples")
                    row.update(status="found", tokens=cache.meta["num_tokens"], examples=count)
                    row["unit"] = "pairs" if pairs else "examples"
                    if cache.starts is not None:  # examples longer than a row are cut at T+1 tokens, packed or not
                        row["cut"] = float(np.mean(np.diff(cache.starts) > cfg.seq_len + 1))
                except UserError as e:
                    row.update(status=f"invalid: {e.problems[0]}")
            out.append(row)
    return out


def phase_plan(
    cfg: PhaseConfig,
    paths: Paths,
    processes: int,
    resume: Path | None = None,
    auto_resume: bool = True,
    init: Path | None = None,
    init_pending: str | None = None,
) -> PhasePlan:
    """The plan of one phase. `init_pending`: the earlier phase of a pipeline that writes its start checkpoint and
    has not yet."""
    model = model_shapes(cfg)
    trainable = parameter_counts(model)[0] if cfg.adapter is not None else None
    problems: list[str] = []
    start_step, start, found = 0, "fresh (random weights)", None
    try:  # where the run would resume, by the rule the run uses (training/start.py)
        found = resume_point(cfg, paths, resume, auto_resume, phase_named(cfg.phase).starts_from_a_model)
    except UserError as e:
        problems += e.problems
    if found is not None:
        try:
            loaded = check_start_checkpoint(found, cfg)
            start_step, start = loaded.step, f"resume from {found} at step {loaded.step}"
        except UserError as e:
            problems += e.problems
    initial = None
    if found is None and init is not None:
        later = f", once the {init_pending} phase has written it" if init_pending else ""
        start = f"initialise from {init} (weights only{later})"
        if not init_pending:
            try:
                loaded = initial = check_start_checkpoint(init, cfg, with_optimizer=False)
                start = (
                    f"initialise from {init} (weights only; step {loaded.step}, run "
                    f"{loaded.meta.get('run_id') or 'not recorded'})"
                )
            except UserError as e:
                problems += e.problems
    plan = PhasePlan(
        cfg=cfg,
        processes=processes,
        parameters=model.num_params(),
        checkpoint_bytes=checkpoint_bytes(model),
        trainable=trainable,
        start_step=start_step,
        start=start,
        caches=_describe_caches(cfg, paths),
    )
    try:
        inputs = check_phase_inputs(cfg, paths)
        plan.data_fingerprint = inputs.data_info()["data_fingerprint"]
        problems += same_tokenizer(initial, inputs.tokenizer)
    except UserError as e:
        problems += e.problems
    owner = in_use(paths, cfg.phase)
    plan.problems = list(dict.fromkeys(problems + ([owner] if owner else [])))
    return plan


def load_configs(phase: str, config: Path, overrides: list) -> list[PhaseConfig]:
    """The phase configs a `run --phase PHASE --config CONFIG` command trains, in order."""
    if phase == PIPELINE:
        return load_pipeline(config, overrides).phases
    return [load_config(config, phase, overrides)]


def command_plans(
    phase: str,
    configs: list[PhaseConfig],
    paths: Paths,
    processes: int,
    resume: Path | None = None,
    auto_resume: bool = True,
) -> list[PhasePlan]:
    """The plan of each phase of one `run` command, starting where that command would start it."""
    plans = []
    for i, cfg in enumerate(configs):
        explicit = (
            resume if resume is not None and (phase != PIPELINE or checkpoint_phase(resume) == cfg.phase) else None
        )
        init, pending = None, None
        if phase == PIPELINE and i > 0:  # a later phase starts from what the one before leaves in best/
            before = configs[i - 1]
            init = paths.phase_dir(before.phase) / "best"
            done = init.exists() and phase_finished(paths.phase_dir(before.phase), before.train.total_steps)
            pending = None if done else before.phase
        elif cfg.init_from:
            init = paths.config_checkpoint(cfg.init_from)
        plans.append(phase_plan(cfg, paths, processes, explicit, auto_resume, init, pending))
    return plans


def _value(resolved: dict, dotted: str) -> Any:
    node: Any = resolved
    for k in dotted.split("."):
        node = node.get(k) if isinstance(node, dict) else None
    return node


def _si(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def format_phase_plan(
    plan: PhasePlan, paths: Paths, precision: str = "no", rate: tuple[float | None, str] = (None, "")
) -> str:
    cfg, t = plan.cfg, plan.cfg.train
    resolved = cfg.resolved()
    lines = [
        f"== {cfg.phase}: {cfg.path}" + (f"  (--set {' '.join(cfg.overrides)})" if cfg.overrides else ""),
        "config (value, origin):",
    ]
    for key, origin in cfg.provenance.items():
        value = str(_value(resolved, key))
        lines.append(f"  {key:<32} {value if len(value) <= 40 else value[:37] + '...':<40} {origin}")
    kept = t.keep_last_n + 1  # step dirs kept, plus best/ when it is an older step (latest/ is a hard link)
    written = math.ceil(plan.steps_to_run / t.ckpt_every) if plan.steps_to_run else 0
    probe = paths.checkpoints
    while not probe.exists():
        probe = probe.parent
    lines += [
        f"model: {plan.parameters:,} parameters (V={cfg.model.V} T={cfg.model.T} C={cfg.model.C} L={cfg.model.L} "
        f"H={cfg.model.H} d_ff={cfg.model.d_ff}; {architecture(cfg.model)})",
        *(
            [
                f"adapter: {plan.trainable:,} trainable parameters ({plan.trainable / plan.parameters:.2%}), LoRA r="
                f"{cfg.adapter.r} alpha={cfg.adapter.alpha:g} on {', '.join(adapter_names(cfg))}; the base frozen"
                + (" in NF4" if cfg.adapter.quantize_base == "nf4" else "")
            ]
            if plan.trainable is not None
            else []
        ),
        f"tokens: {plan.tokens_per_step:,} per step (B={t.B} x accum_steps={t.accum_steps} x "
        f"processes={plan.processes} "
        f"x T={cfg.seq_len}); {plan.steps_to_run:,} steps to run = {_si(plan.tokens_per_step * plan.steps_to_run)} "
        "tokens",
        f"compute: {_si(plan.flops_per_step)}FLOP per step, {_si(plan.flops_per_step * plan.steps_to_run)}FLOP to run",
        "time: "
        + (
            f"about {plan.flops_per_step / rate[0]:.3g} s per step, "
            f"{_duration(plan.flops_per_step * plan.steps_to_run / rate[0])} "
            f"to run, at an assumed {rate[1]}"
            if rate[0]
            else f"no estimate ({rate[1] or 'no FLOP/s given'})"
        ),
        "memory: about {total} per process, a rough upper estimate ({parts})".format(
            total=_bytes(plan.memory_bytes(precision)["total"]),
            parts=", ".join(f"{k} {_bytes(v)}" for k, v in plan.memory_bytes(precision).items() if k != "total"),
        ),
        "passes over the training caches: "
        + (", ".join(f"{s} {n:,.0f}" if n >= 10 else f"{s} {n:.2g}" for s, n in plan.passes().items()) or "-"),
        "caches:",
        *(
            f"  {c['split']:<5} {c['name']:<14} {c['status']:<8} {c['path']}"
            + (f"  {c['tokens']:,} tokens" if "tokens" in c else "")
            + (f", {c['examples']:,} {c['unit']}" if c.get("examples") else "")
            + (f", {c['cut']:.0%} longer than T+1={cfg.seq_len + 1} and cut" if c.get("cut") else "")
            for c in plan.caches
        ),
        f"  data fingerprint: {plan.data_fingerprint or '- (caches missing or invalid)'}",
        f"checkpoints: {plan.checkpoint_bytes / 2**20:,.1f} MiB each in {paths.phase_dir(cfg.phase)}; {written} to "
        "write "
        f"(every {t.ckpt_every} steps and at the end); at most {kept} kept ({t.keep_last_n} newest step dirs + best), "
        f"{kept * plan.checkpoint_bytes / 2**20:,.1f} MiB; {shutil.disk_usage(probe).free / 2**30:,.1f} GiB free",
        f"start: {plan.start}",
        *(f"warning: {w}" for w in plan.warnings()),
    ]
    return "\n".join(lines)


def adapter_names(cfg: PhaseConfig) -> list[str]:
    return sorted({t.name for t in chosen_targets(cfg.adapter, cfg.model)})


def _bytes(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def plan_problems_text(plans: list[PhasePlan], more: list[str] = ()) -> str:
    problems = [p for plan in plans for p in plan.problems] + list(more)
    if not problems:
        return "plan: ok, nothing found that would stop this run"
    return "plan: this run would stop at once:\n" + "\n".join(f"  - {p}" for p in problems)
