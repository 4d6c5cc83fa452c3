"""Benchmark: prepare's throughput and peak memory against a plain loop over the tokenizer's own batch API.

`python -m trainer_accel.prepare_bench`: its command line and one call into tools/prepare_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from trainer_accel.errors import exit_with
from trainer_accel.tools.prepare_bench import PLAIN_LOOP, PREPARE, run_child, train_tokenizer, write_corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.prepare_bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--gb", type=float, default=2.0, help="size of the large corpus in GB (the small one is 10x smaller)"
    )
    p.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe")
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        sizes = {"small": int(args.gb * 1e9 / 10), "large": int(args.gb * 1e9)}
        corpora = {}
        for name, size in sizes.items():
            t = time.perf_counter()
            docs = write_corpus(work / f"{name}.jsonl", size, seed=len(name))
            corpora[name] = work / f"{name}.jsonl"
            print(
                f"generated {name} corpus: {size / 1e6:,.0f} MB, {docs:,} documents ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
        tok_args, tok_path = [], None
        if args.tokenizer == "bpe":
            tok_path = train_tokenizer(corpora["small"], work / "tokenizer.json")
            tok_args = ["--tokenizer", str(tok_path)]
        from trainer_accel.data.prepare import BATCH_CHARS

        rows = []
        for name in ("large", "small"):
            env = {**os.environ, "TRAINER_DATA_DIR": str(work / f"data_{name}")}
            if name == "large" and tok_path:
                plain = run_child(
                    PLAIN_LOOP, [str(corpora[name]), str(tok_path), str(work / "plain.bin"), str(BATCH_CHARS)], env
                )
                rows.append(("plain loop, tokenizer batch API", name, plain))
                (work / "plain.bin").unlink()
            ours = run_child(PREPARE, ["--stream", f"bench={corpora[name]}", *tok_args], env)
            meta = [
                json.loads((work / f"data_{name}/cache/streams/bench_{s}.bin.meta.json").read_text())
                for s in ("train", "val")
            ]
            ours["tokens"] = sum(m["num_tokens"] for m in meta)
            rows.append(("prepare", name, ours))
            for f in (work / f"data_{name}").rglob("*.bin"):
                f.unlink()
    print(f"\n{'what':34} {'input':>7} {'MB':>8} {'s':>7} {'MB/s':>7} {'Mtok/s':>7} {'peak RSS MB':>12}")
    for what, name, r in rows:
        mb = sizes[name] / 1e6
        print(
            f"{what:34} {name:>7} {mb:8,.0f} {r['seconds']:7.1f} {mb / r['seconds']:7.1f} "
            f"{r['tokens'] / r['seconds'] / 1e6:7.2f} {r['peak_rss_mb']:12,.0f}"
        )
    by = {(w, n): r for w, n, r in rows}
    if tok_path:
        ratio = by[("plain loop, tokenizer batch API", "large")]["seconds"] / by[("prepare", "large")]["seconds"]
        print(f"prepare / plain loop throughput: {ratio:.2f}x (target >= 0.8x)")
    growth = by[("prepare", "large")]["peak_rss_mb"] / by[("prepare", "small")]["peak_rss_mb"]
    print(f"prepare peak memory, large / small input (10x the data): {growth:.2f}x (flat is 1.0)")
    print(f"machine: {os.cpu_count()} cores; tokenizer: {args.tokenizer}")
    return 0


if __name__ == "__main__":
    exit_with(main)
