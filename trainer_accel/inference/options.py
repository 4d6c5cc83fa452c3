"""The flags of the commands that generate (generate, chat): which model, on what, and how tokens are chosen."""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

from trainer_accel.errors import UserError
from trainer_accel.inference.load import DTYPES
from trainer_accel.models.generation import Sampling


def sampling_args(p: argparse.ArgumentParser) -> None:
    """The decoding flags `generate` and `chat` share."""
    p.add_argument(
        "--model",
        type=Path,
        help="checkpoint directory, .pt or Hugging Face directory "
        "(default: checkpoints/best.deployable.pt, else best.pt)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens whose probability reaches p")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", choices=("cpu", "mps", "cuda"), help="default: CUDA, else MPS, else CPU")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="bf16 / fp16 on a GPU (default fp32)")
    p.add_argument(
        "--chat-template",
        default="model",
        metavar="model|builtin|PATH",
        help="the template of chat prompts: the one the model was trained in or came with (default), the "
        "built-in one, or a template file of yours (.jinja, or a tokenizer_config.json with one)",
    )
    p.add_argument(
        "--template-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable the chat template reads, e.g. enable_thinking=false (repeatable)",
    )


MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes


def sampling_of(args) -> Sampling:
    """The decoding flags checked: finite numbers in range (NaN passes every comparison, so each check says what
    it wants, not what it refuses), a seed torch takes, stop texts that are not empty."""
    problems = []
    if args.max_new_tokens <= 0:
        problems.append(f"--max-new-tokens: must be positive, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature: must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        problems.append(f"--top-k: must be positive, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append(f"--top-p: must be in (0, 1], got {args.top_p}")
    if not (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0):
        problems.append(f"--repetition-penalty: must be a finite number > 0, got {args.repetition_penalty}")
    if not 0 <= args.seed <= MAX_SEED:
        problems.append(f"--seed: must be from 0 to {MAX_SEED}, got {args.seed}")
    if any(s == "" for s in getattr(args, "stop", None) or []):
        problems.append("--stop: an empty text would stop every completion before its first token")
    if problems:
        raise UserError(problems)
    return Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of one prompt: its own for every (seed, prompt), below 2**63 for any seed torch takes,
    so a prompt's completion does not depend on the batch it is in."""
    digest = hashlib.blake2b(f"{seed}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
