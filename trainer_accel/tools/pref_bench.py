"""Preference tuning measured against TRL's `DPOTrainer`: pairs per second and peak memory, on the same model,
the same pairs and the same DPO settings, each way in a fresh process, one after another.

    python -m trainer_accel.tools.pref_bench --config configs/demo_pref/preference.json [--steps 20]
    python -m trainer_accel.tools.pref_bench --config configs/demo_pref/preference.json --model configs/llama/model.json

Five ways: full training (ours with the reference precomputed before the first step, as the phase does without an
adapter; TRL with its reference precomputed too, `precompute_ref_log_probs`, the like-for-like row, and with its
default, a frozen copy of the model run live) and a LoRA
adapter (the config's `adapter` section, or r 16 / alpha 32 / all-linear; ours with the adapter off as the live
reference, TRL with PEFT's `disable_adapter`, as both do by default). All start from the same random weights (TRL's
model gets them through our Hugging Face mapping) and see the same pairs: our batches by address, handed to TRL as
the same token ids (in its own shuffled order; a one-word-per-id tokenizer, so TRL's tokenization is the identity
and its padding, completion masks and end-of-turn tokens are its own). Step time is the median of the timed
optimizer steps after `--warmup`; pairs/s is the pairs of a step over it. Peak memory is the process's resident
set, sampled every 10 ms while it trains; the time ours spends computing the reference log-probabilities once is
printed apart (not a per-step cost; the bench works on a copy of the caches, so a reference kept beside them is
neither read nor replaced). Activation checkpointing is on for all five (every block), as TRL's configs default
to `gradient_checkpointing=True`. Figures only: no threshold here (shared machines are noisy); they go to
docs/preference.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.paths import resolve_paths
from trainer_accel.tools.against import fresh, peft_lora, start_weights, step_clock
from trainer_accel.tools.bench import MIB, PeakMemory

DEFAULT_ADAPTER = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def _config(args: argparse.Namespace, workdir: Path, adapter: bool) -> Path:
    cfg = json.loads(Path(args.config).read_text())
    if args.model:
        cfg.pop("model_cfg", None)
        cfg["model_cfg_path"] = str(Path(args.model).resolve())
    steps = args.warmup + args.steps
    cfg["train_cfg"] = {
        **cfg.get("train_cfg", {}),
        "total_steps": steps,
        "eval_every": steps,
        "ckpt_every": steps,
        "eval_batches": 1,
        "log_every": steps,
        "accum_steps": 1,
        "warmup_steps": 1,
        "activation_checkpointing": 1,  # TRL's default (its configs turn gradient_checkpointing on): the same setting
        **({"B": args.B} if args.B else {}),
    }
    cfg["preference"] = {"loss": "dpo", "beta": cfg.get("preference", {}).get("beta", 0.1)}
    if adapter:
        cfg["adapter"] = {**(cfg.get("adapter") or DEFAULT_ADAPTER), "dropout": 0.0}
    else:
        cfg.pop("adapter", None)
    cfg.update(init_from=str(workdir / "base"), sample_prompts=[], tracking={"log_with": []})
    path = workdir / ("lora.json" if adapter else "full.json")
    path.write_text(json.dumps(cfg))
    return path


def ours(config: Path, workdir: Path, warmup: int, queue) -> None:
    from trainer_accel.experiments import runner
    from trainer_accel.training import loop, reference

    times, step, attach = [], loop.Trainer._train_step, reference.attach_reference
    spent = {"reference_s": 0.0}

    def timed(self, s):
        start = time.perf_counter()
        out = step(self, s)
        times.append(time.perf_counter() - start)
        return out

    def timed_reference(trainer, start):
        t0 = time.perf_counter()
        attach(trainer, start)
        spent["reference_s"] = time.perf_counter() - t0

    loop.Trainer._train_step = timed
    reference.attach_reference = timed_reference
    from trainer_accel.phases import preference

    preference.attach_reference = timed_reference
    os.environ["TRAINER_ARTIFACTS_DIR"] = str(workdir / config.stem)
    os.environ["TRAINER_CHECKPOINTS_DIR"] = str(workdir / config.stem / "checkpoints")
    with PeakMemory(torch.device("cpu")) as peak:
        flags = {"resume": None, "no_resume": False, "sets": [], "plan": False, "result_json": None, "verbose": False}
        code = runner.run(argparse.Namespace(phase="preference", config=config, device="cpu", **flags))
    queue.put({"exit": code, "step_s": statistics.median(times[warmup:]), "peak_rss": peak.peak, **spent})


def _pairs(config: Path) -> tuple[list[dict], int]:
    """Our training pairs of every step, as TRL reads them: words t{id}, the prompt and each answer."""
    from trainer_accel.config import load_phase_config
    from trainer_accel.phases.registry import phase_named
    from trainer_accel.training.inputs import check_phase_inputs

    cfg = load_phase_config(config, "preference", phase_named("preference").keys)
    batches = check_phase_inputs(cfg, resolve_paths()).batches
    rows = []
    for s in range(cfg.train.total_steps):
        b = batches.train_batch(s, 0, 0, 1, 1)
        k = b.x.shape[0] // 2
        tokens = torch.cat([b.x, b.y[:, -1:]], dim=1)
        for i in range(k):
            parts = []
            for r in (i, i + k):
                scored = (b.y_masked[r] != -100).nonzero().flatten()
                first, last = int(scored[0]) + 1, int(scored[-1]) + 2  # answer tokens in the row
                parts.append((tokens[r, :first].tolist(), tokens[r, first:last].tolist()))
            words = lambda ids: " ".join(f"t{t}" for t in ids)  # noqa: E731
            rows.append({"prompt": words(parts[0][0]), "chosen": " " + words(parts[0][1]),
                         "rejected": " " + words(parts[1][1])})  # fmt: skip
    return rows, cfg.train.B


def trl(config: Path, workdir: Path, warmup: int, queue, precompute: bool = False) -> None:
    """TRL's DPOTrainer on the same weights and pairs, with PEFT's LoRA when the config has an adapter; its
    reference precomputed before training (`precompute_ref_log_probs`) or, by default, run live."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from trainer_accel.config import load_phase_config
    from trainer_accel.phases.registry import phase_named

    cfg = load_phase_config(config, "preference", phase_named("preference").keys)
    rows, B = _pairs(config)
    t = cfg.train
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.model.V)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # every answer already ends with its end-of-turn token: TRL's eos, so it adds none
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t256", eos_token=rows[0]["chosen"].split()[-1])
    model = AutoModelForCausalLM.from_pretrained(workdir / "hf_base", dtype=torch.float32)
    times: list[float] = []

    args = DPOConfig(
        output_dir=str(workdir / "trl_run"),
        per_device_train_batch_size=B,
        max_steps=t.total_steps,
        learning_rate=t.base_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.beta1,
        adam_beta2=t.beta2,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=t.grad_clip or 1e9,
        beta=cfg.settings.beta,
        max_length=cfg.seq_len + 1,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        seed=t.seed,
        disable_tqdm=True,
        precompute_ref_log_probs=precompute,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_lora(cfg) if cfg.adapter is not None else None,
        callbacks=[step_clock(times)],
    )
    with PeakMemory(torch.device("cpu")) as peak:
        trainer.train()
    # TRL's own reference pass runs where it chooses (its dataset and dataloader set-up): not measured apart
    queue.put({"exit": 0, "step_s": statistics.median(times[warmup:]), "peak_rss": peak.peak, "reference_s": None})


def _base(config: Path, workdir: Path) -> dict:
    """The random weights every way starts from."""
    from trainer_accel.config import load_phase_config
    from trainer_accel.phases.registry import phase_named

    cfg = load_phase_config(config, "preference", phase_named("preference").keys)
    model = start_weights(cfg, workdir)
    return {"parameters": model.num_params(), "model_cfg": cfg.model.to_dict(), "B": cfg.train.B}


def trl_precomputed(config: Path, workdir: Path, warmup: int, queue) -> None:
    trl(config, workdir, warmup, queue, precompute=True)


def _copy_caches(config: str, workdir: Path) -> None:
    """The config's pair caches, copied for the bench's processes: a reference kept beside the user's caches by an
    earlier run is neither read (its one-off cost is measured) nor replaced."""
    import shutil

    data = resolve_paths().data
    sources = json.loads(Path(config).read_text()).get("pref_sources", {})
    for source in sources:
        for split in ("train", "val"):
            cache = data / "cache" / "pref" / f"{source}_{split}.bin"
            for f in (cache, cache.with_name(cache.name + ".idx"), cache.with_name(cache.name + ".meta.json")):
                if not f.is_file():
                    raise UserError(f"{f}: missing; prepare the config's pairs first (prepare --pref {source}=FILE)")
                (workdir / "data/cache/pref").mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, workdir / "data/cache/pref" / f.name)
    os.environ["TRAINER_DATA_DIR"] = str(workdir / "data")  # the bench's fresh processes inherit it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.tools.pref_bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a preference config (its pref_sources' caches prepared)")
    p.add_argument("--model", help="a model_cfg file to use instead of the config's (configs/llama/model.json)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--B", type=int, help="pairs per step instead of the config's")
    args = p.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            _copy_caches(args.config, workdir)
            full, lora = _config(args, workdir, False), _config(args, workdir, True)
            facts = _base(full, workdir)
            results = {
                "ours, full (precomputed ref)": fresh(ours, full, workdir, args.warmup),
                "TRL DPOTrainer, full (precomputed ref)": fresh(trl_precomputed, full, workdir, args.warmup),
                "TRL DPOTrainer, full (ref copy, live)": fresh(trl, full, workdir, args.warmup),
                "ours, LoRA (adapter-off ref)": fresh(ours, lora, workdir, args.warmup),
                "TRL DPOTrainer + PEFT LoRA": fresh(trl, lora, workdir, args.warmup),
            }
    except UserError as e:
        return report(e)
    print(
        f"model: {facts['parameters']:,} parameters ({json.dumps(facts['model_cfg'])}); {facts['B']} pairs a step; "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{'':<40}{'step (s)':>10}{'pairs/s':>9}{'vs TRL':>8}{'peak RSS':>12}{'vs TRL':>8}{'reference once':>16}")
    against = {  # each row against TRL with the same reference (a TRL row against itself)
        "ours, full (precomputed ref)": "TRL DPOTrainer, full (precomputed ref)",
        "ours, LoRA (adapter-off ref)": "TRL DPOTrainer + PEFT LoRA",
    }
    for name, r in results.items():
        theirs = results[against.get(name, name)]
        print(
            f"{name:<40}{r['step_s']:>10.4f}{facts['B'] / r['step_s']:>9.1f}{theirs['step_s'] / r['step_s']:>7.2f}x"
            f"{r['peak_rss'] / MIB:>8,.0f} MiB{r['peak_rss'] / theirs['peak_rss']:>7.2f}x"
            + (f"{r['reference_s']:>15.1f}s" if r["reference_s"] is not None else f"{'-':>16}")
        )
    return 0


if __name__ == "__main__":
    exit_with(main)
