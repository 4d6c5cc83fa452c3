"""CLI: the user's files -> token caches with a train/val split, in bounded memory.

`python -m trainer_accel.prepare`: its command line and one call into data/prepare.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer_accel.data import formats
from trainer_accel.data.chat_template import (
    template_args,
)
from trainer_accel.data.prepare import MAX_SEED_DIGITS, Source, Split, parse_sources, prepare
from trainer_accel.errors import CTRL_C_EXIT, UserError, exit_with, raise_if_any, report
from trainer_accel.paths import EXAMPLES, PAIRS, STREAM, resolve_paths, unwritable


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.prepare", description=__doc__.split("\n")[0])
    p.add_argument(
        "--stream",
        action="append",
        default=[],
        metavar="SOURCE=PATH",
        help="pretraining text: a text/Markdown file, JSONL or Parquet with a text field, a saved Hugging "
        "Face dataset, or a folder of them (repeatable; one source may name several paths)",
    )
    p.add_argument(
        "--sft",
        action="append",
        default=[],
        metavar="SOURCE=PATH",
        help="SFT examples: JSONL or Parquet rows (prompt/response, messages, or oasst1 messages), a saved "
        "Hugging Face dataset, or a folder of them (repeatable)",
    )
    p.add_argument(
        "--pref",
        action="append",
        default=[],
        metavar="SOURCE=PATH",
        help="preference pairs: JSONL or Parquet rows of prompt/chosen/rejected (strings or message lists; "
        "UltraFeedback-binarized and Anthropic HH as published), a saved Hugging Face dataset, or a folder of "
        "them (repeatable)",
    )
    p.add_argument(
        "--demo", action="store_true", help="write the built-in synthetic corpus and cache its sources and pairs"
    )
    p.add_argument(
        "--documents",
        default="file",
        metavar="RULE",
        help="what one document of a text file is: file (default), blank-lines, or separator=TEXT "
        "(TEXT may spell \\n); rows are always one document each",
    )
    p.add_argument("--text-field", default="text", help="the field of a stream row that holds its text (default text)")
    p.add_argument(
        "--oasst-paths",
        default="leaves",
        help="oasst1 trees: one conversation per leaf (leaves, default) or only the best-ranked path (best)",
    )
    p.add_argument("--lang", default="", help="oasst1 trees: keep only these languages, e.g. en,de (default all)")
    p.add_argument(
        "--tokenizer", type=Path, help="a Hugging Face model directory or its tokenizer.json (default: built-in bytes)"
    )
    p.add_argument(
        "--chat-template",
        default="model",
        metavar="model|builtin|PATH",
        help="SFT examples in the chat template beside --tokenizer (tokenizer_config.json or "
        "chat_template.jinja; default, when it has one), in the built-in <|user|> ... <|eot|> one, "
        "or in a template file of yours (.jinja, or a tokenizer_config.json that holds one)",
    )
    p.add_argument(
        "--template-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable the chat template reads, e.g. enable_thinking=false (VALUE as JSON where it "
        "parses; repeatable); recorded with the caches, so samples, chat and export use it too",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of documents / examples held out (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="key of the train/val hash")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    paths = resolve_paths()
    try:
        if not 0 < args.val_fraction < 1:
            raise UserError(f"--val-fraction: must be between 0 and 1, got {args.val_fraction}")
        if len(str(args.seed)) > MAX_SEED_DIGITS:  # it keys the split hash, and blake2b takes at most 64 bytes
            raise UserError(f"--seed: at most {MAX_SEED_DIGITS} digits, got {len(str(args.seed))}")
        options = formats.ReadOptions(
            documents=formats.parse_document_rule(args.documents),
            text_field=args.text_field,
            oasst_paths=args.oasst_paths,
            langs=frozenset(x.strip() for x in args.lang.split(",") if x.strip()),
        )
        problems: list[str] = []
        sources = (
            parse_sources(args.stream, STREAM, "--stream", problems)
            + parse_sources(args.sft, EXAMPLES, "--sft", problems)
            + parse_sources(args.pref, PAIRS, "--pref", problems)
        )
        raise_if_any(problems)
        if not sources and not args.demo:
            raise UserError(
                "nothing to prepare: give --stream SOURCE=PATH, --sft SOURCE=PATH, --pref SOURCE=PATH or --demo"
            )
        raise_if_any(
            unwritable(
                [("caches", paths.data / "cache")]
                + ([("the demo corpus", paths.data / "raw" / "demo")] if args.demo else [])
            )
        )
        if args.demo:
            from trainer_accel.data.demo import write_demo_corpus

            streams, sfts, prefs = write_demo_corpus(paths.data / "raw" / "demo")
            given = {(s.kind, s.name) for s in sources}
            sources = (
                [Source(n, STREAM, (f,)) for n, f in streams.items() if (STREAM, n) not in given]
                + [Source(n, EXAMPLES, (f,)) for n, f in sfts.items() if (EXAMPLES, n) not in given]
                + [Source(n, PAIRS, (f,)) for n, f in prefs.items() if (PAIRS, n) not in given]
                + sources
            )
        prepare(
            sources,
            args.tokenizer,
            Split(args.val_fraction, args.seed),
            paths,
            options,
            args.chat_template,
            template_args(args.template_arg),
        )
    except UserError as e:
        return report(e)
    except KeyboardInterrupt:
        print(
            "\nstopped: interrupted (Ctrl-C); the caches are as they were (had it come while they were being "
            "renamed into place, the next prepare finishes that)",
            file=sys.stderr,
        )
        return CTRL_C_EXIT
    return 0


if __name__ == "__main__":
    exit_with(main)
