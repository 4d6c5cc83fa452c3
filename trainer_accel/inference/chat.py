"""A conversation with a model in the terminal, kept and written in the template it was trained in (the built-in
one, or the model's own: ChatML, Llama 3, ...), until it no longer fits the context: then the oldest turns are
dropped, with a line saying so. Answers are streamed as they come. /reset starts over, /quit (or end of input)
leaves, Ctrl-C stops the answer being written, not the conversation. On a pipe it reads one message a line and
writes one answer a line, so it can be scripted and tested.
"""

from __future__ import annotations

import sys

import torch

from trainer_accel.errors import UserError, report
from trainer_accel.inference.load import LoadedModel
from trainer_accel.models.generation import Sampling, generate_ids


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


def converse(lm: LoadedModel, system: str, sampling: Sampling, seed: int, max_new_tokens: int) -> int:
    """Read messages from standard input and answer each on standard output until /quit or end of input; the exit
    code (2 when the input is not UTF-8 text)."""
    interactive = sys.stdin.isatty()
    T, history = lm.model.cfg.T, []
    gen = torch.Generator().manual_seed(seed)
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
            ids = lm.chat.prompt(message, history, system)
            while len(ids) >= T - 1 and history:  # room for at least a short answer
                history.pop(0)
                ids = lm.chat.prompt(message, history, system)
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
            generate_ids(lm.model, [ids], max_new_tokens, sampling, [gen], on_token=stream)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append((message, lm.tok.decode(stream.ids)))
