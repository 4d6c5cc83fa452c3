"""No command removes or overwrites a file it did not write: user files planted in every place the trainer writes
survive prepare, runs (a fresh --no-resume one too), both exports, generate and the run registry's commands."""

from __future__ import annotations

import hashlib

from conftest import run_cli, write_config

PLANTED = [  # every folder a command writes into, and a file of the user's in each
    "checkpoints/NOTES.md", "checkpoints/pretrain/why-this-run.txt", "checkpoints/sft/keep.txt",
    "runs/README.md", "metrics/my_plot.py", "samples/pretrain/hand-picked.json", "data/cache/streams/NOTES.md",
    "data/cache/sft/NOTES.md", "data/raw/demo/extra-notes.txt", "exported/model-card.md", "hf/README.md",
    "generated/keep.jsonl", "notes.txt",
]


def fingerprint(world) -> dict[str, str]:
    """sha256 of every planted file's content -> where it is now (a --no-resume run moves a phase's folder aside,
    with the user's file inside it, and deletes nothing)."""
    found = {}
    for path in world.rglob("*"):
        if path.is_file() and path.name in {p.rsplit("/", 1)[-1] for p in PLANTED}:
            found[hashlib.sha256(path.read_bytes()).hexdigest()] = str(path.relative_to(world))
    return found


def test_user_files_in_every_output_location_survive_every_command(world):
    (world / "hf").mkdir()
    for i, rel in enumerate(PLANTED):
        (world / rel).parent.mkdir(parents=True, exist_ok=True)
        (world / rel).write_text(f"the user's own file {i}: {rel}\n")
    planted = {hashlib.sha256((world / rel).read_bytes()).hexdigest(): rel for rel in PLANTED}

    (world / "more.txt").write_text("More text of the user's own.\n" * 50)
    steps = [
        ("prepare", "--stream", "mine=more.txt"),
        ("run", "--phase", "pretrain", "--config", "pre.json"),
        ("run", "--phase", "sft", "--config", "sft.json"),
        ("run", "--phase", "pretrain", "--config", "pre.json", "--no-resume"),
        ("export", "--checkpoint", "checkpoints/sft/best", "--out", "exported/model.pt"),
        ("export", "--format", "hf", "--out", "hf2"),
        ("generate", "--prompt", "The", "--max-new-tokens", "4", "--out", "generated/out.jsonl"),
        ("runs", "list"),
    ]
    write_config(world / "pre.json", "pretrain", {"total_steps": 4})
    write_config(world / "sft.json", "sft", {"total_steps": 4}, init_from="checkpoints/pretrain/best")
    for step in steps:
        r = run_cli(*step, cwd=world)
        assert r.returncode == 0, (step, r.stderr[-2000:])
        now = fingerprint(world)
        lost = {rel for digest, rel in planted.items() if digest not in now}
        assert not lost, (step, lost)
    moved = {rel: now[d] for d, rel in planted.items() if now[d] != rel}
    assert moved == {"checkpoints/pretrain/why-this-run.txt": moved.get("checkpoints/pretrain/why-this-run.txt")}
    assert moved["checkpoints/pretrain/why-this-run.txt"].startswith("checkpoints/pretrain.replaced-")
    # an export into a folder that holds only the user's files is refused, and the files stay
    r = run_cli("export", "--format", "hf", "--out", "hf", cwd=world)
    assert r.returncode == 2 and "not an earlier export" in r.stderr
    assert (world / "hf/README.md").read_text().startswith("the user's own file")
