"""Benchmark: prepare's throughput and peak memory against a plain loop over the tokenizer's own batch API.

    python -m trainer_accel.prepare_bench --gb 2          # a generated 2 GB JSONL corpus, and one 10x smaller
    python -m trainer_accel.prepare_bench --gb 0.05 --tokenizer byte

The corpus is generated (no download): documents of 1-4 KB cut from a fixed text at random places, each with its
own first line, so the hash split sees distinct documents. The tokenizer is a byte-level BPE (vocabulary 8,192)
trained here on a sample of it, the kind of tokenizer users bring; `--tokenizer byte` uses the built-in one.
Each measurement runs in its own process, so its peak resident memory (ru_maxrss) is its own; the plain loop and
prepare read the same file one after the other, so their ratio is measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by it at from his an were are which this be or has had not "
    "first one their its new after who they two her she been other when there all during into school time may "
    "years more most only over city some world would where later up such used many can state about national "
    "out known university united then made"
).split()
PLAIN_LOOP = r"""
import json, resource, sys, time
import numpy as np
from tokenizers import Tokenizer
corpus, tok_path, out, batch_chars = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = Tokenizer.from_file(tok_path)
start, tokens, batch, chars = time.perf_counter(), 0, [], 0
with open(corpus, "rb") as f, open(out, "wb") as o:
    def flush():
        global tokens
        for e in tok.encode_batch_fast(batch, add_special_tokens=False):
            ids = np.array(e.ids, dtype=np.uint16)
            o.write(ids.tobytes())
            tokens += len(ids)
    for line in f:
        text = json.loads(line)["text"]
        batch.append(text)
        chars += len(text)
        if chars >= batch_chars:
            flush()
            batch, chars = [], 0
    flush()
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
PREPARE = r"""
import json, resource, sys, time
from trainer_accel import prepare
start = time.perf_counter()
assert prepare.main(sys.argv[1:]) == 0
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> int:
    """JSONL rows {"text": ...} up to size_bytes; returns the number of documents."""
    rng = random.Random(seed)
    base = " ".join(rng.choices(WORDS, k=400_000))
    base = ".\n".join(base[i : i + 300] for i in range(0, len(base), 300))  # sentences, and lines within documents
    n, written = 0, 0
    with open(path, "w") as f:
        while written < size_bytes:
            start, length = rng.randrange(len(base) - 4096), rng.randrange(1024, 4096)
            line = (
                json.dumps(
                    {"text": f"Document {n}: {rng.choice(WORDS)} {rng.random():.6f}\n{base[start : start + length]}"}
                )
                + "\n"
            )
            f.write(line)
            written += len(line)
            n += 1
    return n


def train_tokenizer(corpus: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with open(corpus) as f:
        sample = [json.loads(next(f))["text"] for _ in range(2000)]
    tok.train_from_iterator(
        sample,
        trainers.BpeTrainer(vocab_size=8192, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.save(str(out))
    return out


def run_child(code: str, args: list[str], env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"benchmark child failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


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
    sys.exit(main())
