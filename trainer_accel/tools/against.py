"""What the benchmarks against another tool share (adapter_bench: PEFT + transformers' Trainer; pref_bench: TRL):
each way in a fresh process, the same random start weights for every way (ours as a .pt, theirs as a Hugging Face
directory through our mapping), PEFT's LoRA of an adapter section, and a step clock inside transformers' Trainer.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import traceback
from pathlib import Path

import torch


def _guarded(fn, args, queue) -> None:
    try:
        fn(*args, queue)
    except BaseException as e:  # the parent waits for a result: it gets the failure instead
        queue.put({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def fresh(fn, *args) -> dict:
    """fn(*args, queue) in a fresh spawned process; what it puts on the queue (its failure raised here)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_guarded, args=(fn, args, queue))
    p.start()
    result = queue.get()
    p.join()
    if "error" in result:
        raise RuntimeError(f"{fn.__name__} failed: {result['error']}\n{result['traceback']}")
    return result


def start_weights(cfg, workdir: Path) -> torch.nn.Module:
    """The config's model drawn from its seed, written as our .pt (`workdir/base`) and as a Hugging Face directory
    (`workdir/hf_base`) for the other tool; returns the model."""
    from safetensors.torch import save_file

    from trainer_accel.models import families
    from trainer_accel.models.build import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    blob = {"model_cfg": cfg.model.to_dict(), "train_cfg": cfg.train.to_dict(), "model_state": model.state_dict(),
            "optimizer_state": None, "step": 0, "best_val_loss": None}  # fmt: skip
    torch.save(blob, workdir / "base")
    mapping = families.writing(cfg.model.to_dict())
    hf = workdir / "hf_base"
    hf.mkdir()
    special = {"<|endoftext|>": 256}
    (hf / "config.json").write_text(json.dumps(mapping.hf_config(cfg.model.to_dict(), special, *["<|endoftext|>"] * 2)))
    save_file(mapping.state_to_hf(model.state_dict(), cfg.model.to_dict()), str(hf / "model.safetensors"))
    return model


def peft_lora(cfg):
    """PEFT's LoraConfig of the phase config's adapter section: the same targets, rank, alpha and dropout."""
    from peft import LoraConfig

    from trainer_accel.models.lora import chosen_targets

    a = cfg.adapter
    return LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        use_rslora=a.rslora,
        target_modules=sorted({x.name for x in chosen_targets(a, cfg.model)}),
        task_type="CAUSAL_LM",
    )


def step_clock(times: list[float]):
    """A transformers TrainerCallback that appends each optimizer step's seconds to `times`."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    return Clock()
