"""No command removes or overwrites a file it did not write: user files planted in every place the trainer writes
survive prepare, runs (a fresh --no-resume one too), both exports, generate and the run registry's commands."""

from __future__ import annotations

import hashlib

from conftest import run_cli, write_config

PLANTED = [  # every folder a command writes into, and a file of the user's in each
    "checkpoints/NOTES.md",
    "checkpoints/pretrain/why-this-run.txt",
    "checkpoints/sft/keep.txt",
    "runs/README.md",
    "metrics/my_plot.py",
    "samples/pretrain/hand-picked.json",
    "data/cache/streams/NOTES.md",
    "data/cache/sft/NOTES.md",
    "data/raw/demo/extra-notes.txt",
    "exported/model-card.md",
    "hf/README.md",
    "generated/keep.jsonl",
    "notes.txt",
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


def test_generate_out_never_replaces_what_it_reads_nor_empties_a_file_on_a_refused_run(world):
    """--out is written beside and renamed over when every completion is written: a refused run (a prompt too long)
    leaves the user's earlier results; --out naming the model or the prompts file is refused before anything."""
    write_config(world / "pre.json", "pretrain", {"total_steps": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", "pre.json", cwd=world).returncode == 0
    (world / "results.jsonl").write_text('{"earlier": "results"}\n')
    (world / "prompts.txt").write_text("The\n" + "x" * 100 + "\n")  # the second is longer than T=32
    model = world / "checkpoints" / "best.pt"
    before = {p: p.read_bytes() for p in (world / "results.jsonl", world / "prompts.txt", model)}
    r = run_cli("generate", "--prompts", "prompts.txt", "--out", "results.jsonl", cwd=world)
    assert r.returncode == 2 and "prompt 2 is" in r.stderr
    for flag, target in (("--model", model), ("--prompts", world / "prompts.txt")):
        r = run_cli("generate", "--prompts", "prompts.txt", "--model", str(model), "--out", str(target), cwd=world)
        assert r.returncode == 2 and f"--out {target}: is the {flag} file; nothing was written" in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".results")) == []  # no temporary left
    r = run_cli("generate", "--prompt", "The", "--max-new-tokens", "2", "--out", "results.jsonl", cwd=world)
    assert r.returncode == 0 and (world / "results.jsonl").read_text().startswith('{"prompt": "The"')


def test_an_hf_export_killed_between_its_renames_keeps_the_users_files_on_the_next_export(tmp_path):
    """Killed between setting the earlier export aside and renaming the new one in, the next export first puts
    the earlier one back, so the user's files in it (a README, lm-eval's results) are carried, not deleted."""
    from conftest import TINY_MODEL
    from test_huggingface import write_tiny_checkpoint

    from trainer_accel.models.config import ModelConfig
    from trainer_accel.models.gpt import GPT

    write_tiny_checkpoint(tmp_path / "ck", GPT(ModelConfig(**TINY_MODEL)))
    args = ("export", "--format", "hf", "--checkpoint", "ck", "--out", "hf")
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    (tmp_path / "hf" / "README.md").write_text("the user's model card\n")
    (tmp_path / "hf" / "eval_results").mkdir()
    (tmp_path / "hf" / "eval_results" / "lambada.json").write_text("{}\n")
    assert run_cli(*args, cwd=tmp_path, env={"TRAINER_FAULT": "mid_swap"}).returncode == -9
    assert not (tmp_path / "hf").exists()  # set aside, the new one not yet in place
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    assert (tmp_path / "hf" / "README.md").read_text() == "the user's model card\n"
    assert (tmp_path / "hf" / "eval_results" / "lambada.json").is_file()


def test_an_hf_export_sweeps_only_its_own_leftovers(tmp_path):
    """--out hf[12] is a name, not a pattern: another export's temporary directory .hf1.tmp-* is left alone."""
    from conftest import TINY_MODEL
    from test_huggingface import write_tiny_checkpoint

    from trainer_accel.models.config import ModelConfig
    from trainer_accel.models.gpt import GPT

    write_tiny_checkpoint(tmp_path / "ck", GPT(ModelConfig(**TINY_MODEL)))
    other = tmp_path / ".hf1.tmp-12345"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert run_cli("export", "--format", "hf", "--checkpoint", "ck", "--out", "hf[12]", cwd=tmp_path).returncode == 0
    assert (other / "config.json").is_file() and (tmp_path / "hf[12]" / "config.json").is_file()
