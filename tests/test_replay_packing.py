"""SFT with replay (pretraining text mixed into the rows) and packing (several examples per row, none seeing
another): the mixture as configured, per-example losses as if alone, the answer mask intact, bad configs named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, run_cli, write_config

from trainer_accel.config import ModelConfig
from trainer_accel.data.cache import IGNORE_INDEX, masked_targets
from trainer_accel.data.chat_template import AnswerRule
from trainer_accel.models.gpt import GPT
from trainer_accel.paths import resolve_paths
from trainer_accel.phases.registry import load_config
from trainer_accel.training.inputs import check_phase_inputs


def strategy_of(world, train=None, **top):
    cfg = write_config(world / "sft.json", "sft", train, **top)
    return check_phase_inputs(load_config(cfg, "sft"), resolve_paths()).batches


def test_the_configured_mixture_is_the_realised_one(world):
    """A replay share is a share of the rows: over 300 batches of 16 rows, each source's count of rows lies within
    4 standard deviations of its binomial expectation; a stream row's every target counts, an SFT row's answers."""
    strategy = strategy_of(
        world, {"B": 16, "pack": True}, replay={"wiki": 0.2, "roam": 0.1}, sft_sources={"dolly": 0.5, "oasst1": 0.5}
    )
    names = strategy.train.names
    assert dict(zip(names, strategy.train.probs)) == pytest.approx(
        {"streams/wiki": 0.2, "streams/roam": 0.1, "sft/dolly": 0.35, "sft/oasst1": 0.35}
    )
    rows = np.zeros(len(names))
    for step in range(300):
        batch = strategy.train_batch(step, 0, 0, 1, 1)
        counts = strategy.count_by_source(batch)
        rows += counts[1].numpy()
        stream = np.array([strategy.train.kinds[i] == "stream" for i in batch.row_source.tolist()])
        assert (batch.y_masked[torch.from_numpy(stream)] != IGNORE_INDEX).all()  # every target of a stream row
        assert counts[0].sum() == (batch.y_masked != IGNORE_INDEX).sum()
    n = rows.sum()
    for name, p, got in zip(names, strategy.train.probs, rows):
        assert abs(got - n * p) < 4 * np.sqrt(n * p * (1 - p)), (name, got, n * p)


def test_a_packed_example_scores_as_it_does_alone(world):
    """Per-token losses of each example in a packed row (the last one cut at the row's end) equal those of the same
    example alone in its own row, in fp32; the answer mask and the counted tokens are those of the examples."""
    model_cfg = {**TINY_MODEL, "T": 128}
    strategy = strategy_of(
        world, {"B": 4, "pack": True}, sft_sources={"dolly": 0.5, "primer": 0.5}, model_cfg=model_cfg
    )
    batch = strategy.train_batch(3, 0, 0, 1, 1)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_cfg)).eval()
    packed = F.cross_entropy(model(batch.x, batch.segments).flatten(0, 1), batch.y.flatten(), reduction="none").view(
        batch.y.shape
    )
    s = strategy.train.caches[0].meta["special_tokens"]
    checked = cut = 0
    for r in range(batch.x.shape[0]):
        row = torch.cat([batch.x[r], batch.y[r, -1:]])  # the T+1 tokens of the row
        seg = torch.cat([batch.segments[r], batch.segments[r, -1:]])
        assert seg.max() > 0  # several examples in the row
        for e in range(int(seg.max()) + 1):
            idx = (seg == e).nonzero().flatten()
            a, b = int(idx[0]), int(idx[-1]) + 1
            alone = torch.full((1, len(row)), s["<|endoftext|>"])
            alone[0, : b - a] = row[a:b]
            logits = model(alone[:, :-1])
            losses = F.cross_entropy(logits[0], alone[0, 1:], reduction="none")
            n = min(b, len(row) - 1) - a  # targets of this example inside the packed row (the last one: its cut)
            inner = slice(a, a + n - 1 if b < len(row) else a + n)  # the target after an example is the next's start
            width = inner.stop - inner.start
            assert torch.allclose(packed[r, inner], losses[:width], atol=1e-5), (r, e)
            mask_alone = masked_targets(alone.numpy(), AnswerRule((s["<|assistant|>"],), s["<|eot|>"]))[0, :width]
            assert np.array_equal(batch.y_masked[r, inner].numpy() != IGNORE_INDEX, mask_alone != IGNORE_INDEX)
            checked += 1
            cut += b == len(row)
        assert (
            batch.y_masked[r, (seg[1:] != seg[:-1]).nonzero().flatten()].eq(IGNORE_INDEX).all()
        )  # no cross-example target
    assert checked > 8 and cut >= 1


@pytest.mark.parametrize(
    "top, train, message",
    [
        ({"replay": {"books": 0.1}}, {}, "data/cache/streams/books_train.bin: cache missing"),
        ({"replay": {"wiki": -0.1}}, {}, "replay.wiki: share must be a number >= 0, got -0.1"),
        (
            {"replay": {"wiki": 0.6, "roam": 0.4}},
            {},
            "replay: shares sum to 1; they must leave rows for the SFT sources",
        ),
        ({"sft_sources": {"dolly": 0.0, "oasst1": 0.0}}, {}, "sft_sources: probabilities must sum to 1, they sum to 0"),
        ({}, {"pack": True}, "train_cfg.pack: packing is for SFT"),
    ],
    ids=["unknown source", "negative share", "no rows left", "all-zero weights", "pack on pretrain"],
)
def test_bad_replay_and_packing_configs_are_one_line_each(world, top, train, message):
    phase = "pretrain" if train.get("pack") else "sft"
    cfg = write_config(world / "bad.json", phase, {**train, "total_steps": 2}, **top)
    r = run_cli("run", "--phase", phase, "--config", str(cfg), cwd=world)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert any(message in line for line in errors), r.stderr
    assert len(errors) == (2 if "cache missing" in message else 1), errors  # the cache line comes with the naming rule
