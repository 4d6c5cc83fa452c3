"""What an adapter saves, measured: LoRA against full fine-tuning of the same model in this trainer, and against
PEFT with transformers' `Trainer` on the same model, rows and adapter settings.

    python -m trainer_accel.tools.adapter_bench --config configs/demo_lora/sft.json [--steps 20]
    python -m trainer_accel.tools.adapter_bench --config configs/demo_lora/sft.json --model configs/llama/model.json

Each way runs in a fresh process, one after another, on random weights drawn from the config's seed (the same
for all three; PEFT's model gets them through our Hugging Face mapping): the trainer's own loop (`Trainer.fit`,
with its logging) once with the config's adapter and once training every weight, and PEFT's `get_peft_model` with
transformers' `Trainer` on the same rows (SFT's rows, unpacked: transformers has no block-diagonal packing, so
`pack` is turned off for all three). Step time is the median of the timed steps after `--warmup`, measured around
each optimizer step (the trainer's `_train_step`, the Trainer's `on_step_begin` to `on_step_end`); peak memory is
the process's resident set, sampled every 10 ms while it trains; checkpoint size is what each writes for one
checkpoint (ours: weights + optimizer state; PEFT's: `save_pretrained` + the optimizer state its Trainer saves).
Figures only: no threshold here (shared machines are noisy), and they go to docs/adapters.md with the machine.
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


def _config(args: argparse.Namespace, workdir: Path, adapter: bool) -> Path:
    """The bench's config: the given one (its model from --model), unpacked, no samples, no eval or checkpoint
    inside the timed steps; with or without its adapter section."""
    cfg = json.loads(Path(args.config).read_text())
    if args.model:
        cfg.pop("model_cfg", None)
        cfg["model_cfg_path"] = str(Path(args.model).resolve())
    if "model_cfg_path" in cfg and not Path(cfg["model_cfg_path"]).is_absolute():
        cfg["model_cfg_path"] = str((Path(args.config).parent / cfg["model_cfg_path"]).resolve())
    if "adapter" not in cfg and adapter:
        raise UserError(f"{args.config}: no adapter section to measure")
    if not adapter:
        cfg.pop("adapter", None)
    steps = args.warmup + args.steps
    cfg["train_cfg"] = {
        **cfg.get("train_cfg", {}),
        "pack": False,
        "total_steps": steps,
        "eval_every": steps,
        "ckpt_every": steps,
        "eval_batches": 1,
        "log_every": steps,
        "warmup_steps": min(cfg.get("train_cfg", {}).get("warmup_steps", 1), steps),
        **({"B": args.B} if args.B else {}),
    }
    cfg.update(init_from=str(workdir / "base"), sample_prompts=[], tracking={"log_with": []})
    path = workdir / ("lora.json" if adapter else "full.json")
    path.write_text(json.dumps(cfg))
    return path


def ours(config: Path, workdir: Path, warmup: int, queue) -> None:
    """The trainer's own run of `config`, its optimizer steps timed."""
    from trainer_accel.experiments import runner
    from trainer_accel.training import loop

    times, step = [], loop.Trainer._train_step

    def timed(self, s):
        start = time.perf_counter()
        out = step(self, s)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        times.append(time.perf_counter() - start)
        return out

    loop.Trainer._train_step = timed
    os.environ["TRAINER_ARTIFACTS_DIR"] = str(workdir / config.stem)
    os.environ["TRAINER_CHECKPOINTS_DIR"] = str(workdir / config.stem / "checkpoints")
    with PeakMemory(torch.device("cpu")) as peak:
        flags = {"resume": None, "no_resume": False, "sets": [], "plan": False, "result_json": None, "verbose": False}
        code = runner.run(argparse.Namespace(phase="sft", config=config, device="cpu", **flags))  # `run`'s flags
    saved = workdir / config.stem / "checkpoints" / "sft" / "latest"
    queue.put(
        {
            "exit": code,
            "step_s": statistics.median(times[warmup:]),
            "peak_rss": peak.peak,
            "checkpoint_bytes": sum(f.stat().st_size for f in saved.iterdir() if f.name != "meta.json"),
        }
    )


def peft_trainer(config: Path, workdir: Path, warmup: int, queue) -> None:
    """PEFT's LoRA of the same settings on the same weights, trained by transformers' Trainer on the same rows."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from trainer_accel.config import load_phase_config
    from trainer_accel.phases.registry import phase_named
    from trainer_accel.training.inputs import check_phase_inputs

    phase = phase_named("sft")
    cfg = load_phase_config(config, "sft", phase.keys)
    t = cfg.train
    batches = check_phase_inputs(cfg, resolve_paths()).batches
    rows = []
    for s in range(t.total_steps):
        b = batches.train_batch(s, 0, 0, 1, 1)
        labels = torch.cat([torch.full_like(b.y_masked[:, :1], -100), b.y_masked[:, :-1]], dim=1)  # HF shifts them
        rows += [{"input_ids": i, "labels": lab} for i, lab in zip(b.x, labels)]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(workdir / "hf_base", dtype=torch.float32), peft_lora(cfg)
    )
    times: list[float] = []

    out = workdir / "peft_run"
    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.B,
        gradient_accumulation_steps=t.accum_steps,
        max_steps=t.total_steps,
        learning_rate=t.base_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.beta1,
        adam_beta2=t.beta2,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=t.grad_clip or 1e9,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=t.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[step_clock(times)])
    with PeakMemory(torch.device("cpu")) as peak:
        trainer.train()
    model.save_pretrained(out / "adapter")
    torch.save(trainer.optimizer.state_dict(), out / "adapter" / "optimizer.pt")
    size = sum(f.stat().st_size for f in (out / "adapter").iterdir() if f.suffix in (".safetensors", ".pt"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    queue.put(
        {
            "exit": 0,
            "step_s": statistics.median(times[warmup:]),
            "peak_rss": peak.peak,
            "checkpoint_bytes": size,
            "trainable": trainable,
        }  # fmt: skip
    )


def _base(lora: Path, workdir: Path) -> tuple[dict, int, int]:
    """The random weights all three start from, as our checkpoint (.pt) and as a Hugging Face directory."""
    from trainer_accel.config import load_phase_config
    from trainer_accel.models.build import build_model
    from trainer_accel.models.lora import is_adapter_name, lora_converter, parameter_counts
    from trainer_accel.phases.registry import phase_named

    cfg = load_phase_config(lora, "sft", phase_named("sft").keys)
    model = start_weights(cfg, workdir)
    adapted = build_model(cfg.model, "meta", converters=[lora_converter(cfg.adapter, cfg.model)])
    trainable = sum(p.numel() for n, p in adapted.named_parameters() if is_adapter_name(n))
    return cfg.model.to_dict(), trainable, parameter_counts(model)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.tools.adapter_bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="an SFT config with an adapter section")
    p.add_argument("--model", help="a model_cfg file to use instead of the config's (configs/llama/model.json)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--B", type=int, help="rows per step instead of the config's")
    args = p.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            lora, full = _config(args, workdir, True), _config(args, workdir, False)
            model_cfg, trainable, total = _base(lora, workdir)
            results = {
                "ours, LoRA": fresh(ours, lora, workdir, args.warmup),
                "ours, full fine-tuning": fresh(ours, full, workdir, args.warmup),
                "PEFT + transformers Trainer": fresh(peft_trainer, lora, workdir, args.warmup),
            }
    except UserError as e:
        return report(e)
    results["ours, LoRA"]["trainable"] = trainable
    results["ours, full fine-tuning"]["trainable"] = total
    peft = results["PEFT + transformers Trainer"]
    print(f"model: {total:,} parameters ({json.dumps(model_cfg)}); {torch.get_num_threads()} CPU threads")
    print(f"{'':<30}{'trainable':>12}{'step (s)':>10}{'vs PEFT':>9}{'peak RSS':>12}{'vs PEFT':>9}{'checkpoint':>13}")
    for name, r in results.items():
        print(
            f"{name:<30}{r['trainable']:>12,}{r['step_s']:>10.4f}{r['step_s'] / peft['step_s']:>8.2f}x"
            f"{r['peak_rss'] / MIB:>9,.0f} MiB{r['peak_rss'] / peft['peak_rss']:>8.2f}x"
            f"{r['checkpoint_bytes'] / MIB:>9,.2f} MiB"
        )
    return 0


if __name__ == "__main__":
    exit_with(main)
