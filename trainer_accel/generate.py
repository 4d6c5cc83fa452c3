"""Complete prompts with a trained model, as JSONL: `python -m trainer_accel.generate`.

    python -m trainer_accel.generate --prompt "The zordax is" [--prompt ...] [--model PATH] [--out FILE]
    python -m trainer_accel.generate --prompts questions.jsonl --chat --temperature 0.7 --top-p 0.9 --seed 1

--model takes a checkpoint directory, an exported .pt or a Hugging Face directory (default: checkpoints/
best.deployable.pt, else best.pt). --prompts: a text file (one prompt a line) or JSONL ({"prompt": ...} or
{"messages": [...]}, the latter in the model's chat template). Each output line: prompt, completion,
prompt_tokens, completion_tokens, finish_reason (stop or length), tokens_per_s of its batch. Prompts are batched,
left-padded; a prompt's completion is the same alone or in a batch, and the same for the same --seed.
Exit codes: 0 done, 2 bad input, 141 output pipe closed, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer_accel.data.chat_template import template_args
from trainer_accel.errors import UserError, exit_with, raise_if_any, report
from trainer_accel.hf.directory import is_hf_dir
from trainer_accel.inference.bench import bench, print_table
from trainer_accel.inference.complete import (
    Prompt,
    complete,
    inputs_named_as_out,
    read_prompts,
    write_jsonl,
    write_out,
)
from trainer_accel.inference.load import load_model
from trainer_accel.inference.options import sampling_args, sampling_of
from trainer_accel.paths import output_file_problem, resolve_paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.generate", description=__doc__.split("\n")[0])
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a file of prompts: text lines, or JSONL with prompt or messages")
    p.add_argument("--chat", action="store_true", help="wrap plain prompts in the model's chat template")
    p.add_argument("--stop", action="append", default=[], help="also stop where the completion writes this text")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--out", type=Path, help="write the JSONL here (default: standard output)")
    p.add_argument(
        "--bench",
        action="store_true",
        help="print tokens/s with and without the KV cache (and "
        "transformers' own generate, for a Hugging Face --model) instead of completing prompts",
    )
    sampling_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    try:
        sampling = sampling_of(args)
        if args.bench:
            lm = load_model(
                args.model,
                resolve_paths(),
                args.device,
                args.dtype,
                args.chat_template,
                template_args(args.template_arg),
            )
            print_table(bench(lm, lm.source if is_hf_dir(lm.source) else None), sys.stdout)
            return 0
        if bool(args.prompt) == bool(args.prompts):
            raise UserError("give --prompt TEXT (repeatable) or --prompts FILE")
        if args.batch_size <= 0:
            raise UserError(f"--batch-size: must be positive, got {args.batch_size}")
        raise_if_any(output_file_problem("--out", args.out) + inputs_named_as_out(args.out, args.model, args.prompts))
        prompts = read_prompts(args.prompts) if args.prompts else [Prompt(t, chat=False) for t in args.prompt]
        if args.chat:
            prompts = [Prompt(x.text, True, x.history, x.system) for x in prompts]
        lm = load_model(
            args.model, resolve_paths(), args.device, args.dtype, args.chat_template, template_args(args.template_arg)
        )
        records = complete(lm, prompts, args.max_new_tokens, sampling, args.seed, args.stop, args.batch_size)
        if args.out is None:
            write_jsonl(records, sys.stdout)
        else:
            write_out(records, args.out)
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    exit_with(main)
