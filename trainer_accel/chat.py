"""Talk to a fine-tuned model in the terminal: `python -m trainer_accel.chat [--model PATH]`.

The conversation is kept and written in the template the model was trained in (the built-in one, or the model's
own: ChatML, Llama 3, ...), until it no longer fits the context: then the oldest turns are dropped, with a line
saying so. Answers are streamed as they come. /reset starts over, /quit (or end of input) leaves, Ctrl-C stops
the answer being written, not the program. On a pipe it reads one message a line and writes one answer a line,
so it can be scripted and tested. Exit codes: 0, 2 bad input (no model, a model without a chat template).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from trainer_accel.data.chat_template import template_args
from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.inference.load import load_model
from trainer_accel.inference.options import sampling_args, sampling_of
from trainer_accel.models.generation import generate_ids
from trainer_accel.paths import resolve_paths


class Stream:
    """Writes a row's text as its tokens come: decoded whole each time, only the new characters printed (a
    character can take several tokens)."""

    def __init__(self, lm, stop: frozenset[int], out):
        self.lm, self.stop, self.out, self.ids, self.shown = lm, stop, out, [], ""

    def __call__(self, row: int, token: int) -> bool:
        if token in self.stop:
            return True
        self.ids.append(token)
        text = self.lm.tok.decode(self.ids)
        if not text.endswith("\ufffd"):  # an incomplete character waits for its next bytes
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text
        return False


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
    interactive = sys.stdin.isatty()
    T, history = lm.model.cfg.T, []
    gen = torch.Generator().manual_seed(args.seed)
    if interactive:
        print(
            f"chatting with {lm.source} ({lm.phase or 'Hugging Face'}); /reset, /quit; Ctrl-C stops an answer",
            file=sys.stderr,
        )
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print("\n(/quit to leave)", file=sys.stderr)
            continue
        except UnicodeDecodeError:
            return report(UserError("standard input is not UTF-8 text"))
        try:
            message = line.strip().encode("utf-8").decode("utf-8")  # undecodable bytes arrive as lone surrogates
        except UnicodeError:
            return report(UserError("standard input is not UTF-8 text"))
        if message in ("/quit", "/exit"):
            return 0
        if message == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not message:
            continue
        try:
            ids = lm.chat.prompt(message, history, args.system)
            while len(ids) >= T - 1 and history:  # room for at least a short answer
                history.pop(0)
                ids = lm.chat.prompt(message, history, args.system)
                print(
                    f"(the conversation no longer fits the context of {T} tokens: the oldest turn was dropped)",
                    file=sys.stderr,
                )
        except UserError as e:  # the template refused this message: said, and the conversation goes on
            print(f"error: {e.problems[0]}", file=sys.stderr)
            continue
        if len(ids) >= T - 1:
            print(
                f"(this message is {len(ids)} tokens with the template; the context is {T}: say it shorter)",
                file=sys.stderr,
            )
            continue
        if interactive:
            sys.stdout.write("model> ")
        stream = Stream(lm, lm.stop_ids(chat=True), sys.stdout)
        try:
            generate_ids(lm.model, [ids], args.max_new_tokens, sampling, [gen], on_token=stream)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append((message, lm.tok.decode(stream.ids)))


if __name__ == "__main__":
    exit_with(main)
