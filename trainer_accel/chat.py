"""Talk to a fine-tuned model in the terminal: `python -m trainer_accel.chat [--model PATH]`.

Its command line and one call: the conversation is inference/chat.py's. Exit codes: 0, 2 bad input (no model, a
model without a chat template, input that is not UTF-8 text).
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer_accel.data.chat_template import template_args
from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.inference.chat import converse
from trainer_accel.inference.load import load_model
from trainer_accel.inference.options import sampling_args, sampling_of
from trainer_accel.paths import resolve_paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.chat", description=__doc__.split("\n")[0])
    sampling_args(p)
    p.add_argument(
        "--system",
        default="",
        metavar="TEXT",
        help="the conversation's system message (in the template's system role; the built-in template, "
        "which has none, writes it at the start of the first message)",
    )
    p.set_defaults(max_new_tokens=256)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    try:
        sampling = sampling_of(args)
        lm = load_model(
            args.model, resolve_paths(), args.device, args.dtype, args.chat_template, template_args(args.template_arg)
        )
        if lm.chat is None:
            raise UserError(
                f"{lm.source}: this model has no chat template (phase {lm.phase or 'unknown'}: it was not "
                "fine-tuned on conversations); chat with an SFT model, or use python -m "
                "trainer_accel.generate for completions"
            )
        lm.chat.prompt("Hello", [], args.system)  # a template that refuses the system message says so now, once
    except UserError as e:
        return report(e)
    return converse(lm, args.system, sampling, args.seed, args.max_new_tokens)


if __name__ == "__main__":
    exit_with(main)
