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

import json
import random
import subprocess
import sys
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
