"""Config dataclasses, JSON loading and validation.

The dataclasses are the config reference: each field carries its meaning in a comment (the model's options are
in models/config.py, beside the families; a model_cfg_path names a file that holds them). Validation collects every
problem (unknown key with the nearest known name, wrong type, impossible value, missing file) and raises them
together as one UserError, so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer_accel import overrides as ov
from trainer_accel.errors import UserError, raise_if_any, unknown_key_message
from trainer_accel.fsio import UnreadableJSON, loads
from trainer_accel.models import families
from trainer_accel.models.config import (  # noqa: F401 (the model's config, read through here by the floors above)
    MODEL_FUNCTION_KEYS,
    MODEL_SHAPE_KEYS,
    ModelConfig,
    complete_model_cfg,
    model_cfg_problems,
    model_problems,
    resolved_model_cfg,
)
from trainer_accel.models.lora import ALL_LINEAR, AdapterConfig, adapter_problems
from trainer_accel.paths import KIND_FOLDERS, STREAM, source_name_problem
from trainer_accel.schema import build_dataclass, type_ok

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How one phase trains. A "step" is one optimizer update; a "micro-step" one forward/backward."""

    seed: int = 42  # addresses every batch and dropout mask: same seed, same run
    total_steps: int = 20000  # optimizer steps in this phase
    B: int = 32  # sequences per micro-step per process; a step sees B * accum_steps * processes
    T: int | None = None  # training sequence length; null means the model's T
    accum_steps: int = 1  # micro-steps accumulated into one optimizer step
    base_lr: float = 3e-4  # peak learning rate, reached after warmup
    warmup_steps: int = 200  # linear warmup from base_lr / warmup_steps to base_lr
    min_lr: float = 3e-5  # cosine decay ends here at total_steps
    weight_decay: float = 0.1  # AdamW decay on matrices (not on biases, norms)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 turns clipping off
    eval_every: int = 200  # steps between validation passes
    eval_batches: int = 50  # fixed validation batches of B rows per pass, the same whatever the process count
    ckpt_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_last_n: int = 3  # step checkpoints kept; best/ and latest/ are never pruned
    log_every: int = 50  # steps between progress lines (at most 50)
    mixed_precision: str | None = None  # "no", "bf16" or "fp16"; null leaves it to the accelerate launcher
    compile: bool = False  # torch.compile the model (faster steps on GPU after a compile of tens of seconds)
    # recompute blocks' activations in the backward pass instead of keeping them (memory for compute): 0 off,
    # 1 every block, k every k-th block (selective); the same gradients, dropout masks and checkpoint names
    activation_checkpointing: int = 0
    tf32: bool = True  # CUDA: TF32 tensor cores for float32 matmuls (about 1e-3 relative precision, much faster)
    on_nonfinite: str = "stop"  # a NaN/inf loss or grad norm: "stop" with an error, or "skip" that update
    max_nonfinite_skips: int = 10  # with "skip": stop after this many skipped updates in a row
    allow_data_change: bool = False  # resume even if the caches differ from the checkpoint's (logged loudly)
    verify_cache_hash: bool = False  # re-hash every cache against its meta at start (slow on big caches)
    forgetting_tolerance: float = 0.1  # SFT promotion gate: how much any pretrain val loss may rise (nats/token)
    # SFT promotion gate: how much each SFT val loss must fall (nats/token) to count as an improvement; the fall
    # must also exceed twice the standard error of its per-batch differences, so noise never passes
    min_improvement: float = 0.001
    pack: bool = False  # SFT: fill each training row with examples back to back, each attending only to itself
    pack_val: bool = False  # SFT: pack validation rows too (off: val losses compare with unpacked runs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SamplePrompt:
    """A prompt the model completes at every checkpoint (see samples.py)."""

    prompt: str  # the text the model continues (or answers, for task "chat")
    seed: int | None = None  # sampling seed; null uses the config's sample_seed
    max_new_tokens: int = 64  # tokens generated at most
    temperature: float = 0.8  # 0 is greedy
    top_k: int | None = 50  # sample from the k most likely tokens; null for all
    task: str = "completion"  # "completion" or "chat" (wrapped in the SFT template)
    system: str = ""  # task "chat": the conversation's system message ("": none)

    def to_dict(self) -> dict[str, Any]:
        """As recorded; `system` only when set, so configs written before it keep their fingerprint."""
        out = dataclasses.asdict(self)
        if not self.system:
            del out["system"]
        return out


TRACKERS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are tracked besides metrics/events.jsonl and metrics.csv (always on)."""

    log_with: tuple[str, ...] = TRACKERS  # Accelerate trackers: any of "tensorboard", "wandb"; [] for none
    project: str = "trainer_accel"  # wandb project
    group: str | None = None  # wandb group; null: the config file's folder and name (one experiment)
    run_name: str | None = None  # run name; null: "{phase}-{run_id}"
    tags: tuple[str, ...] = ()  # wandb tags; the phase is always added


@dataclass(frozen=True)
class PhaseKeys:
    """What a phase's config holds besides the keys every phase shares: declared by the phase (phases/), read here.

    A phase's sources name caches of one kind; a phase with `replay` mixes stream rows in beside them."""

    sources_key: str  # the object of source -> probability: "sources", "sft_sources"
    sources_kind: str  # the kind of cache its sources name (paths.STREAM or paths.EXAMPLES)
    example: str  # a source name for messages: {"wiki": 1.0}
    default_sources: dict[str, float] | None = None  # used when the key is absent; None: the key is required
    missing: str = ""  # what the message for an absent key suggests
    replay: bool = False  # a `replay` object: stream caches mixed in, each a share of the rows
    packs: bool = False  # train_cfg.pack and pack_val mean something here
    no_packing: str = ""  # why not, when they do not
    settings_key: str = ""  # the phase's own config section ("preference"), if it has one
    # (the section's JSON or None, where, problems, the whole config) -> its settings object (PhaseConfig.settings)
    settings: Callable[[Any, str, list[str], dict], Any] | None = None
    settings_fields: frozenset[str] = frozenset()  # the section's keys, for --set


@dataclass(frozen=True)
class PhaseConfig:
    """One phase as the loop needs it, plus the JSON as the user gave it (stored verbatim in checkpoints)."""

    phase: str  # the phase's name (phases/: the registry)
    model: ModelConfig
    train: TrainConfig
    sources: dict[str, float]  # training caches to mix and their probabilities
    val_source: str  # stream cache evaluated (SFT prefers its own val caches when they exist)
    init_from: str | None  # weights to start from, optimizer fresh: a checkpoint dir, an exported .pt or a Hugging Face
    # GPT-2 directory (config.json + model.safetensors or pytorch_model.bin); a pipeline's SFT takes the pretrain best
    path: Path  # the config file
    raw: dict = field(repr=False)  # the JSON as given, with the --set overrides applied
    keys: PhaseKeys = field(repr=False)  # what the phase's own part of the config is
    sample_prompts: list[SamplePrompt] = field(default_factory=list)  # completions written at every checkpoint
    sample_seed: int = 1234  # sampling seed of prompts that name none
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    overrides: tuple[str, ...] = ()  # the --set KEY=VALUE texts that reached this phase, in order
    provenance: dict[str, str] = field(default_factory=dict, repr=False)  # dotted key -> default | file | override
    replay: dict[str, float] = field(default_factory=dict)  # stream caches mixed in, each a share of the rows
    adapter: AdapterConfig | None = None  # LoRA adapters on a frozen base (models/lora.py); null: every weight trains
    settings: Any = None  # the phase's own section, as its PhaseKeys.settings read it (None: it has none)

    def mixture(self) -> dict[str, float]:
        """Each training cache's share of the rows ("streams/wiki", "sft/dolly"): the replay streams take their
        shares and the phase's sources split the rest by their weights (all of it without replay)."""
        folder = KIND_FOLDERS[self.keys.sources_kind]
        total = sum(self.sources.values())
        rest = 1.0 - sum(self.replay.values())  # exactly 1.0 without replay, so the shares are p / total
        return {f"{KIND_FOLDERS[STREAM]}/{s}": p for s, p in self.replay.items() if p > 0} | {
            f"{folder}/{s}": rest * p / total for s, p in self.sources.items() if p > 0
        }

    @property
    def seq_len(self) -> int:
        return self.train.T or self.model.T

    def resolved(self) -> dict[str, Any]:
        """Every setting as the run uses it, defaults filled in: what manifests and trackers record."""
        return {
            "phase": self.phase,
            "model_cfg": self.model.to_dict(),
            "train_cfg": self.train.to_dict(),
            self.keys.sources_key: dict(self.sources),
            **({"replay": dict(self.replay)} if self.keys.replay else {}),
            "mixture": self.mixture(),
            **({"model_cfg_path": self.raw["model_cfg_path"]} if "model_cfg_path" in self.raw else {}),
            "val_source": self.val_source,
            "init_from": self.init_from,
            **({"adapter": self.adapter.to_dict()} if self.adapter is not None else {}),
            **({self.keys.settings_key: self.settings.to_dict()} if self.keys.settings_key else {}),
            "sample_prompts": [p.to_dict() for p in self.sample_prompts],
            "sample_seed": self.sample_seed,
            "tracking": dataclasses.asdict(self.tracking),
        }

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.resolved())


def fingerprint(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys, no whitespace): equal settings, equal fingerprint."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


SECTIONS = {"model_cfg": ModelConfig, "train_cfg": TrainConfig}  # where each option of a phase config lives


# ---------------------------------------------------------------------------------------------------------------
# Generic dataclass validation


def _train_problems(t: TrainConfig, model: ModelConfig | None, where: str) -> list[str]:
    out = []
    for k in ("total_steps", "B", "accum_steps", "eval_every", "eval_batches", "ckpt_every", "log_every"):
        if getattr(t, k) <= 0:
            out.append(f"{where}.{k}: must be a positive integer, got {getattr(t, k)}")
    if t.log_every > 50:
        out.append(f"{where}.log_every: at most 50 (a progress line at least every 50 steps), got {t.log_every}")
    if t.T is not None and t.T <= 0:
        out.append(f"{where}.T: must be a positive integer or null, got {t.T}")
    if t.T is not None and model is not None and t.T > model.T:
        out.append(f"{where}.T: {t.T} is longer than the model context model_cfg.T={model.T}")
    if t.base_lr <= 0:
        out.append(f"{where}.base_lr: must be positive, got {t.base_lr}")
    if t.min_lr < 0:
        out.append(f"{where}.min_lr: must be >= 0, got {t.min_lr}")
    if t.min_lr > t.base_lr:
        out.append(f"{where}.min_lr: {t.min_lr} is above base_lr {t.base_lr}")
    if t.seed < 0:
        out.append(f"{where}.seed: must be >= 0 (it addresses every batch), got {t.seed}")
    if t.warmup_steps < 0:
        out.append(f"{where}.warmup_steps: must be >= 0, got {t.warmup_steps}")
    elif t.total_steps > 0 and t.warmup_steps > t.total_steps:
        out.append(f"{where}.warmup_steps: {t.warmup_steps} is past total_steps {t.total_steps}")
    if t.weight_decay < 0:
        out.append(f"{where}.weight_decay: must be >= 0, got {t.weight_decay}")
    for k in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, k) < 1.0:
            out.append(f"{where}.{k}: must be in [0, 1), got {getattr(t, k)}")
    if t.grad_clip < 0:
        out.append(f"{where}.grad_clip: must be >= 0 (0 turns clipping off), got {t.grad_clip}")
    if t.forgetting_tolerance < 0:
        out.append(f"{where}.forgetting_tolerance: must be >= 0, got {t.forgetting_tolerance}")
    if not t.min_improvement >= 0:
        out.append(f"{where}.min_improvement: must be >= 0 (nats/token), got {t.min_improvement}")
    if t.keep_last_n < 2:
        out.append(f"{where}.keep_last_n: must be at least 2, got {t.keep_last_n}")
    if t.on_nonfinite not in ("stop", "skip"):
        out.append(f'{where}.on_nonfinite: expected "stop" or "skip", got {json.dumps(t.on_nonfinite)}')
    if t.activation_checkpointing < 0:
        out.append(
            f"{where}.activation_checkpointing: 0 (off), 1 (every block) or k (every k-th block), got "
            f"{t.activation_checkpointing}"
        )
    if t.max_nonfinite_skips <= 0:
        out.append(f"{where}.max_nonfinite_skips: must be a positive integer, got {t.max_nonfinite_skips}")
    if t.mixed_precision not in (None, "no", "bf16", "fp16"):
        out.append(
            f'{where}.mixed_precision: expected "no", "bf16", "fp16" or null, got {json.dumps(t.mixed_precision)}'
        )
    return out


def _entry_problems(weights: dict, where: str, noun: str) -> list[str]:
    """Each entry of a source -> weight object: a valid source name, a number >= 0."""
    out = []
    for name, p in weights.items():
        if problem := source_name_problem(name):
            out.append(f"{where}.{name}: {problem}")
        if not type_ok(p, float) or p < 0:
            out.append(f"{where}.{name}: {noun} must be a number >= 0, got {json.dumps(p)}")
    return out


def _sources_problems(sources: Any, example: str, where: str) -> list[str]:
    if not isinstance(sources, dict) or not sources:
        return [f'{where}: expected a non-empty object of source -> probability, e.g. {{"{example}": 1.0}}']
    out = _entry_problems(sources, where, "probability")
    if not out and abs(sum(sources.values()) - 1.0) > 1e-6:
        out.append(f"{where}: probabilities must sum to 1, they sum to {sum(sources.values()):.6g}")
    if not out and all(p == 0 for p in sources.values()):
        out.append(f"{where}: at least one probability must be positive")
    return out


def _replay_problems(replay: Any, where: str) -> list[str]:
    """SFT replay: {stream source: share of the training rows}; the SFT sources fill the rest of the rows."""
    if not isinstance(replay, dict):
        return [f'{where}: expected an object of stream source -> share of the rows, e.g. {{"wiki": 0.1}}']
    out = _entry_problems(replay, where, "share")
    if not out and sum(replay.values()) >= 1.0:
        out.append(f"{where}: shares sum to {sum(replay.values()):.6g}; they must leave rows for the SFT sources (< 1)")
    return out


TASKS = ("completion", "chat")


def parse_sample_prompts(value: object, where: str, problems: list[str]) -> list[SamplePrompt]:
    """`sample_prompts`: strings or SamplePrompt objects; problems are appended, like every config check."""
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list of prompts (strings or objects)")
        return []
    out = []
    for i, item in enumerate(value):
        spec = build_dataclass(
            SamplePrompt, {"prompt": item} if isinstance(item, str) else item, f"{where}[{i}]", problems
        )
        if spec is None:
            continue
        if spec.task not in TASKS:
            problems.append(f'{where}[{i}].task: expected "completion" or "chat", got {json.dumps(spec.task)}')
        if spec.system and spec.task != "chat":
            problems.append(f'{where}[{i}].system: only for task "chat" (a completion has no conversation)')
        if spec.max_new_tokens <= 0 or spec.temperature < 0 or (spec.top_k is not None and spec.top_k <= 0):
            problems.append(f"{where}[{i}]: max_new_tokens and top_k must be positive, temperature >= 0")
        out.append(spec)
    return out


def parse_adapter(value: Any, model: ModelConfig | None, where: str, problems: list[str]) -> AdapterConfig | None:
    """The `adapter` section: null or absent for full training; an object (`{}` for PEFT's defaults) for LoRA."""
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(f'{where}: expected an object like {{"r": 16, "alpha": 32, "target_modules": "{ALL_LINEAR}"}}')
        return None
    tm = value.get("target_modules")
    if not (tm is None or tm == ALL_LINEAR or isinstance(tm, list) and all(isinstance(n, str) for n in tm)):
        problems.append(f'{where}.target_modules: expected a list of module names, "{ALL_LINEAR}" or null, got '
                        f"{json.dumps(tm)}")  # fmt: skip
        tm = None
    rest = {k: v for k, v in value.items() if k != "target_modules"}
    built = build_dataclass(AdapterConfig, rest, where, problems)
    if built is None:
        return None
    adapter = dataclasses.replace(built, target_modules=tuple(tm) if isinstance(tm, list) else tm)
    problems += adapter_problems(adapter, model, where)
    return adapter


def parse_tracking(value: Any, where: str, problems: list[str]) -> TrackingConfig:
    if not isinstance(value, dict):
        problems.append(f'{where}: expected an object like {{"log_with": ["tensorboard", "wandb"]}}')
        return TrackingConfig()
    lists = {}
    for key in ("log_with", "tags"):
        items = value.get(key, list(getattr(TrackingConfig, key)))
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            problems.append(f"{where}.{key}: expected a list of strings, got {json.dumps(items)}")
            items = []
        lists[key] = tuple(items)
    for name in lists["log_with"]:
        if name not in TRACKERS:
            problems.append(f"{where}.log_with: unknown tracker {json.dumps(name)} (expected {', '.join(TRACKERS)})")
    rest = {k: v for k, v in value.items() if k not in lists}
    built = build_dataclass(TrackingConfig, rest, where, problems)
    return dataclasses.replace(built or TrackingConfig(), **lists)


# ---------------------------------------------------------------------------------------------------------------
# Loading

SAMPLE_KEYS = {"sample_prompts", "sample_seed", "tracking"}
COMMON_KEYS = {"model_cfg", "model_cfg_path", "train_cfg", "val_source", "init_from", "adapter"} | SAMPLE_KEYS
LONG_DEFAULT_T = 8192  # a model's maximum above this, taken as the run's T because none was given, is said
RUN_MODEL_KEYS = ("T", "dropout")  # what a model_cfg file leaves to the run: the context it trains at, its dropout


def phase_keys(keys: PhaseKeys) -> set[str]:
    """The top-level keys a phase's config may hold."""
    own = {keys.sources_key} | ({"replay"} if keys.replay else set()) | ({keys.settings_key} - {""})
    return COMMON_KEYS | own


def phase_schema(keys: PhaseKeys) -> ov.Schema:
    """The keys a phase config may hold, for checking --set keys: sections list their fields."""
    schema: dict = {key: None for key in phase_keys(keys)}
    sections = (("model_cfg", ModelConfig), ("train_cfg", TrainConfig), ("tracking", TrackingConfig))
    for key, cls in (*sections, ("adapter", AdapterConfig)):
        schema[key] = frozenset(f.name for f in dataclasses.fields(cls))
    for key in (keys.sources_key, "replay"):
        if key in schema:
            schema[key] = ov.MAPPING
    if keys.settings_key:
        schema[keys.settings_key] = keys.settings_fields
    return schema


def read_json(path: Path, what: str) -> Any:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what}: {e.strerror}") from None
    try:
        return loads(text)
    except UnreadableJSON as e:
        raise UserError(f"{path}: {what} is not usable JSON ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: {what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def resolve_config_path(value: str, relative_to: Path) -> Path:
    """A path inside a config: absolute as given, else next to that config, else from the working directory."""
    p = Path(value)
    if p.is_absolute():
        return p
    beside = relative_to.parent / p
    return beside if beside.exists() or not p.exists() else p


def parse_phase_config(
    file_data: Any,
    phase: str,
    keys: PhaseKeys,
    path: Path,
    overrides: list[ov.Override] = (),
    phase_names: typing.Collection[str] = (),
) -> PhaseConfig:
    """The config of phase `phase`, whose own keys are `keys`; `phase_names`: every phase's, which a --set of a
    single phase may not use as a prefix."""
    where = str(path)
    if not isinstance(file_data, dict):
        raise UserError(f"{where}: expected a JSON object at the top level")
    schema = phase_schema(keys)
    data = ov.apply(file_data, list(overrides), schema, phase_names)
    problems: list[str] = []
    known = phase_keys(keys)
    for key in data:
        if key not in known:
            problems.append(unknown_key_message(where, key, known))
    model_data = model_cfg_of(data, path, problems)
    if model_data is None:
        model = None
    else:
        model = build_dataclass(ModelConfig, model_data, f"{where}.model_cfg", problems, SECTIONS)
        if model is not None:
            problems += model_problems(model, f"{where}.model_cfg")
    train = build_dataclass(TrainConfig, data.get("train_cfg", {}), f"{where}.train_cfg", problems, SECTIONS)
    if train is not None:
        problems += _train_problems(train, model, f"{where}.train_cfg")

    if keys.sources_key in data or keys.default_sources is not None:
        sources = data.get(keys.sources_key, keys.default_sources)
        problems += _sources_problems(sources, keys.example, f"{where}.{keys.sources_key}")
    else:
        problems.append(f"{where}.{keys.sources_key}: missing (e.g. {keys.missing})")
        sources = {}
    replay = data.get("replay", {}) if keys.replay else {}
    problems += _replay_problems(replay, f"{where}.replay")
    for key in ("pack", "pack_val"):
        if not keys.packs and train is not None and getattr(train, key):
            problems.append(f"{where}.train_cfg.{key}: {keys.no_packing}")
    val_source = data.get("val_source", "wiki")
    if problem := source_name_problem(val_source):
        problems.append(f"{where}.val_source: {problem}")
    init_from = data.get("init_from")
    if init_from is not None and not isinstance(init_from, str):
        problems.append(f"{where}.init_from: expected a checkpoint path or null, got {json.dumps(init_from)}")
    prompts = parse_sample_prompts(data.get("sample_prompts", []), f"{where}.sample_prompts", problems)
    tracking = parse_tracking(data.get("tracking", {}), f"{where}.tracking", problems)
    adapter = parse_adapter(data.get("adapter"), model, f"{where}.adapter", problems)
    settings = (
        keys.settings(data.get(keys.settings_key), f"{where}.{keys.settings_key}", problems, data)
        if keys.settings is not None
        else None
    )
    sample_seed = data.get("sample_seed", 1234)
    if not type_ok(sample_seed, int):
        problems.append(f"{where}.sample_seed: expected an integer, got {json.dumps(sample_seed)}")
    raise_if_any(ov.blame(problems, where, list(overrides)))
    return PhaseConfig(
        phase=phase,
        model=model,
        train=train,
        sources={k: float(v) for k, v in sources.items()},
        val_source=val_source,
        init_from=init_from,
        path=Path(path),
        raw=data,
        keys=keys,
        sample_prompts=prompts,
        sample_seed=sample_seed,
        tracking=tracking,
        overrides=tuple(o.text for o in overrides),
        replay={k: float(v) for k, v in replay.items()} if isinstance(replay, dict) else {},
        adapter=adapter,
        settings=settings,
        provenance=model_provenance(ov.provenance(file_data, list(overrides), schema), data, model),
    )


def model_provenance(provenance: dict[str, str], data: dict, model: ModelConfig | None) -> dict[str, str]:
    """The model options that a model_cfg_path file gave (not the inline model_cfg beside it) are its."""
    if "model_cfg_path" not in data or model is None:
        return provenance
    inline = data.get("model_cfg") if isinstance(data.get("model_cfg"), dict) else {}
    return {**provenance, **{f"model_cfg.{k}": "model_cfg_path" for k in model.to_dict() if k not in inline}}


def model_cfg_of(data: dict, path: Path, problems: list[str]) -> Any:
    """The phase's model_cfg: inline, or read from `model_cfg_path` (a model_cfg we saved, or a Hugging Face
    config.json, so the architecture is transcribed by no one) with an inline model_cfg beside it holding only what
    the file leaves to the run (RUN_MODEL_KEYS) or values that agree with it."""
    where = str(path)
    inline = data.get("model_cfg")
    if "model_cfg_path" not in data:
        if inline is None:
            problems.append(
                f"{where}.model_cfg: missing (an object with V, T, C, L, H, d_ff, or model_cfg_path: a "
                "file that holds one, such as a Hugging Face config.json)"
            )
        return inline
    value = data["model_cfg_path"]
    if not isinstance(value, str) or not value:
        problems.append(
            f"{where}.model_cfg_path: expected the path of a model_cfg JSON or a Hugging Face "
            f"config.json, got {json.dumps(value)}"
        )
        return None
    file = resolve_config_path(value, path)
    try:
        saved = read_json(file, "model_cfg_path file")
        if isinstance(saved, dict) and "model_type" in saved:
            saved = families.model_cfg_from_hf(saved, str(file))
    except UserError as e:
        problems += [f"{where}.model_cfg_path: {line}" for line in e.problems]
        return None
    if not isinstance(saved, dict):
        problems.append(f"{where}.model_cfg_path: {file} holds {type(saved).__name__}, not a model_cfg object")
        return None
    if (
        (not isinstance(inline, dict) or "T" not in inline)
        and saved.get("position") == "rope"
        and type_ok(saved.get("T"), int)
        and saved["T"] > LONG_DEFAULT_T
    ):
        log.warning(
            "%s: model_cfg.T is %s, the model's max_position_embeddings in %s; set model_cfg.T to the context "
            "you train at (e.g. 2048): every row is T tokens",
            where,
            f"{saved['T']:,}",
            file,
        )
    if inline is None:
        return saved
    if not isinstance(inline, dict):
        problems.append(
            f"{where}.model_cfg: expected an object of what the file leaves to the run "
            f"({', '.join(RUN_MODEL_KEYS)}), got {json.dumps(inline)}"
        )
        return None
    learned = saved.get("position", "learned") == "learned"
    for key, value in inline.items():
        if key in RUN_MODEL_KEYS and not (key == "T" and learned) or value == saved.get(key):
            continue
        if key == "V" and type_ok(value, int) and type_ok(saved.get("V"), int) and value > saved["V"]:
            continue  # room for the tokens prepare adds to the model's tokenizer: the embedding grows (grow_vocab)
        why = (
            f"learned positions are a table of {saved.get('T')} rows there; train shorter rows with train_cfg.T"
            if key == "T"
            else f"the file says {json.dumps(saved.get(key))}; only "
            f"{' and '.join(RUN_MODEL_KEYS)} may be set beside model_cfg_path, and V larger than the file's"
        )
        problems.append(f"{where}.model_cfg.{key}: {json.dumps(value)} contradicts model_cfg_path {file} ({why})")
    return {**saved, **inline}


def load_phase_config(
    path: Path | str,
    phase: str,
    keys: PhaseKeys,
    overrides: list[ov.Override] = (),
    phase_names: typing.Collection[str] = (),
) -> PhaseConfig:
    """Defaults < the JSON file < the --set overrides (phases/registry.py names the phase's keys)."""
    path = Path(path)
    return parse_phase_config(read_json(path, f"{phase} config"), phase, keys, path, overrides, phase_names)


def shape_diff(a: dict, b: dict, keys: typing.Iterable[str] | None = None) -> str:
    keys = list(keys) if keys is not None else sorted(set(a) | set(b))
    return ", ".join(f"{k}: {json.dumps(a.get(k))} vs {json.dumps(b.get(k))}" for k in keys if a.get(k) != b.get(k))
