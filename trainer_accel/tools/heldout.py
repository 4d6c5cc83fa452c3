"""How many held-out SFT questions a model answers exactly, greedily: the figure the README quotes for the demo,
measured rather than remembered.

    python -m trainer_accel.tools.heldout [--model PATH] [--source dolly] [--min N]

Every example of data/cache/sft/{source}_val.bin (never trained on: prepare's split) is asked in the template it
was written in, and the model's greedy answer is compared with the example's answer token for token. --min N exits
1 when fewer than N are exact: after README command 1, `--min 9` is the demo's floor (it answers 9 of 9).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer_accel.data.cache import answer_rule, open_cache
from trainer_accel.data.chat_template import answer_positions
from trainer_accel.errors import UserError, exit_with, report
from trainer_accel.inference.load import load_model
from trainer_accel.models.generation import generate_ids
from trainer_accel.paths import EXAMPLES, resolve_paths


def score(model_path: Path | None, source: str, out=sys.stdout) -> tuple[int, int]:
    paths = resolve_paths()
    lm = load_model(model_path, paths)
    cache = open_cache(paths.sft_cache(source, "val"), EXAMPLES)
    rule, tokens = answer_rule(cache.meta), cache.tokens
    exact = too_long = 0
    for i in range(cache.num_examples):
        example = tokens[cache.starts[i] : cache.starts[i + 1]].tolist()
        inside = answer_positions(example, rule)
        first = next((j for j, x in enumerate(inside) if x), None)
        if first is None:
            continue
        end = next(j for j in range(first, len(example)) if example[j] == rule.end)
        prompt, answer = example[:first], example[first:end]
        if len(prompt) >= lm.model.cfg.T:  # it cannot be asked: counted, and counted as not answered
            too_long += 1
            out.write(
                f"long   {lm.tok.decode(prompt)!r}: {len(prompt)} tokens, the model's context T is {lm.model.cfg.T}\n"
            )
            continue
        got = generate_ids(lm.model, [prompt], len(answer) + 1, stop_ids=frozenset({rule.end}))[0]
        ok = got == answer + [rule.end]
        exact += ok
        out.write(f"{'exact' if ok else 'wrong'}  {lm.tok.decode(prompt)!r} -> {lm.tok.decode(got)!r}\n")
    longer = f", {too_long} of them longer than the context and not asked" if too_long else ""
    out.write(f"held-out {source} answers exact: {exact}/{cache.num_examples} ({lm.source}{longer})\n")
    return exact, cache.num_examples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.tools.heldout", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="default: checkpoints/best.deployable.pt, else best.pt")
    p.add_argument("--source", default="dolly", help="the SFT source whose val cache is asked (default dolly)")
    p.add_argument("--min", type=int, default=0, help="exit 1 when fewer answers than this are exact")
    args = p.parse_args(argv)
    try:
        exact, _ = score(args.model, args.source)
    except UserError as e:
        return report(e)
    return 0 if exact >= args.min else 1


if __name__ == "__main__":
    exit_with(main)
