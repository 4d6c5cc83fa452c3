"""Checkpoint directories: round trip with tied weights, canonical keys, corruption, export to best.pt."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import TINY_MODEL, run_cli, write_config

from trainer_accel.checkpoints import discovery, layout, loading, writing
from trainer_accel.checkpoints.full_state import tied_aliases
from trainer_accel.config import ModelConfig
from trainer_accel.errors import UserError
from trainer_accel.models.gpt import GPT


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**TINY_MODEL))


def save(model: GPT, path, step=3, state=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    meta = {
        "phase": "pretrain",
        "run_id": "r1",
        "step": step,
        "best_val_loss": 1.5,
        "model_cfg": model.cfg.to_dict(),
        "train_cfg": {"B": 4},
    }
    state = state if state is not None else model.state_dict()
    return writing.write_checkpoint(path, state, tied_aliases(model), opt.state_dict(), meta), opt


def test_round_trip_keeps_tied_weights_tied(tmp_path):
    model = tiny_model()
    out, _ = save(model, tmp_path / "step_0000003")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.safetensors", "optimizer.pt"]
    assert not list(tmp_path.glob(".tmp-*"))
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in stored and "tok_emb.weight" in stored  # stored once
    meta = layout.read_meta(out)
    assert meta["tied"] == {"lm_head.weight": "tok_emb.weight"}
    assert meta["format_version"] == layout.FORMAT_VERSION and set(meta["files"]) == {
        "model.safetensors",
        "optimizer.pt",
    }

    fresh = tiny_model(seed=1)
    fresh.load_state_dict(loading.load_checkpoint(out).model_state, strict=True)
    assert fresh.lm_head.weight.data_ptr() == fresh.tok_emb.weight.data_ptr()  # still one tensor
    x = torch.randint(0, 260, (2, 16))
    assert torch.equal(fresh(x), model(x))


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = tiny_model()
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    out, _ = save(model, tmp_path / "ck", state=wrapped)
    keys = set(loading.load_checkpoint(out).model_state)
    assert keys == set(model.state_dict())


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "bad_json", "no_meta"])
def test_damaged_checkpoint_is_skipped_for_the_older_one(tmp_path, damage, caplog):
    model = tiny_model()
    save(model, tmp_path / "step_0000003", step=3)
    newer, _ = save(model, tmp_path / "step_0000006", step=6)
    target = newer / "model.safetensors"
    if damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "bad_json":
        (newer / "meta.json").write_text("{")
    else:
        (newer / "meta.json").unlink()
    assert discovery.find_resume_checkpoint(tmp_path) == tmp_path / "step_0000003"
    assert "skipping checkpoint" in caplog.text and "step_0000006" in caplog.text


def test_interrupted_swap_is_undone(tmp_path):
    model = tiny_model()
    save(model, tmp_path / "latest", step=3)
    (tmp_path / "latest").rename(tmp_path / ".trash-latest-1-2")  # killed between the two renames
    (tmp_path / ".tmp-latest-1-3").mkdir()  # and a half-written new one
    writing.sweep_leftovers(tmp_path)
    assert layout.read_meta(tmp_path / "latest")["step"] == 3
    assert not list(tmp_path.glob(".t*"))


def test_pruning_keeps_newest_and_nothing_else_touched(tmp_path):
    model = tiny_model()
    for step in (1, 2, 3, 4):
        save(model, tmp_path / layout.step_dir_name(step), step=step)
    (tmp_path / "my_notes").mkdir()
    removed = writing.prune_step_dirs(tmp_path, keep_last_n=2)
    assert [p.name for p in removed] == ["step_0000001", "step_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_notes", "step_0000003", "step_0000004"]


def test_export_cli_gives_the_six_keys_and_identical_logits(world):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 4})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    r = run_cli("export", "--checkpoint", "checkpoints/pretrain/latest", "--out", "exported/model.pt", cwd=world)
    assert r.returncode == 0, r.stderr
    blob = torch.load(world / "exported" / "model.pt", weights_only=True)
    assert sorted(blob) == sorted(["model_cfg", "train_cfg", "model_state", "optimizer_state", "step", "best_val_loss"])
    assert blob["step"] == 4 and blob["model_cfg"] == ModelConfig(**TINY_MODEL).to_dict()  # every option recorded
    assert {
        k: blob["model_cfg"][k]
        for k in ("dropout", "bias", "tie_embeddings", "activation", "ln_eps", "position", "norm", "mlp", "n_kv_heads")
    } == {
        "dropout": 0.0,
        "bias": False,
        "tie_embeddings": True,
        "activation": "gelu",
        "ln_eps": 1e-5,
        "position": "learned",
        "norm": "layernorm",
        "mlp": "plain",
        "n_kv_heads": None,
    }
    assert blob["train_cfg"]["total_steps"] == 4 and isinstance(blob["best_val_loss"], float)
    assert set(blob["optimizer_state"]) == {"state", "param_groups"}

    model = GPT(ModelConfig(**blob["model_cfg"]))
    model.load_state_dict(blob["model_state"], strict=True)
    reference = GPT(ModelConfig(**blob["model_cfg"]))
    reference.load_state_dict(loading.load_checkpoint(world / "checkpoints/pretrain/latest").model_state, strict=True)
    x = torch.randint(0, 260, (2, 32))
    assert torch.equal(model(x), reference(x))

    # default source: the newest best/, default destination: checkpoints/best.pt
    (world / "checkpoints" / "best.pt").unlink()
    assert run_cli("export", cwd=world).returncode == 0
    assert (
        torch.load(world / "checkpoints" / "best.pt", weights_only=True)["step"]
        == json.loads((world / "checkpoints/pretrain/best/meta.json").read_text())["step"]
    )
    # the records name the step directory the moving best/ and latest/ pointers stood for
    best_step = json.loads((world / "checkpoints/pretrain/best/meta.json").read_text())["step"]
    record = json.loads((world / "checkpoints/best.pt.json").read_text())
    assert record["source"] == str((world / f"checkpoints/pretrain/{layout.step_dir_name(best_step)}").resolve())
    assert json.loads((world / "exported/model.pt.json").read_text())["source"] == str(
        (world / "checkpoints/pretrain/step_0000004").resolve()
    )
    assert (
        run_cli(
            "export", "--format", "hf", "--checkpoint", "checkpoints/pretrain/latest", "--out", "hf", cwd=world
        ).returncode
        == 0
    )
    assert json.loads((world / "hf/trainer_accel_export.json").read_text())["source"] == str(
        (world / "checkpoints/pretrain/step_0000004").resolve()
    )


def test_export_overwrites_only_an_earlier_export_of_its_own(world):
    """`export --out configs/pretrain.json` used to turn a config into a zip; `--out configs/pretrain` would have
    replaced configs/pretrain.json with its record."""
    cfg = write_config(world / "configs/pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    config_text = cfg.read_text()
    for out in ("configs/pre.json", "configs/pre"):
        r = run_cli("export", "--checkpoint", "checkpoints/pretrain/latest", "--out", out, cwd=world)
        assert r.returncode == 2 and f"--out {out}: " in r.stderr and "nothing was written" in r.stderr, r.stderr
        assert cfg.read_text() == config_text and not (world / "configs/pre").exists()

    args = ("export", "--checkpoint", "checkpoints/pretrain/latest", "--out", "model.pt")
    assert run_cli(*args, cwd=world).returncode == 0
    assert run_cli(*args, cwd=world).returncode == 0  # an earlier export of ours, with its record: replaced
    record = json.loads((world / "model.pt.json").read_text())
    assert record["best_pt_sha256"] == hashlib.sha256((world / "model.pt").read_bytes()).hexdigest()

    tampered = bytearray((world / "model.pt").read_bytes())
    tampered[-100] ^= 1  # the same size: only the sha256 tells
    (world / "model.pt").write_bytes(bytes(tampered))
    r = run_cli(*args, cwd=world)
    assert r.returncode == 2 and "--out model.pt: changed since it was exported" in r.stderr, r.stderr
    assert (world / "model.pt").read_bytes() == bytes(tampered)


@pytest.mark.parametrize("damage", ["wrong shape", "extra tensor", "missing tensor"])
def test_export_vouches_for_no_damaged_or_unrecorded_pt(world, damage):
    """A .pt with a wrong-shaped or extra tensor used to export with exit 0 and a record carrying its sha256, after
    which nothing warned that it was never verified (and --resume crashed)."""
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    blob = torch.load(world / "checkpoints/best.pt", weights_only=True)
    torch.save(blob, world / "bare.pt")  # good weights, no record
    state = blob["model_state"]
    name = sorted(state)[0]
    if damage == "wrong shape":
        state[name] = torch.zeros(3, 3)
    elif damage == "extra tensor":
        state["h.9.extra"] = torch.zeros(2)
    else:
        del state[name]
    torch.save(blob, world / "bad.pt")
    r = run_cli("export", "--checkpoint", "bad.pt", "--out", "out.pt", cwd=world)
    assert r.returncode == 2 and "bad.pt: its weights do not fit its model_cfg" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (world / "out.pt").exists() and not (world / "out.pt.json").exists()

    r = run_cli("export", "--checkpoint", "bare.pt", "--out", "out.pt", cwd=world)
    assert r.returncode == 0 and "bare.pt came without a record" in r.stderr, r.stderr
    assert (world / "out.pt").is_file() and not (world / "out.pt.json").exists()
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--resume", "out.pt", "--plan", cwd=world)
    assert "nothing could verify this file" in r.stderr, r.stderr


def test_export_refuses_bad_input(world):
    r = run_cli("export", "--checkpoint", "nowhere", cwd=world)
    assert r.returncode == 2 and "nowhere: checkpoint not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", cwd=world)
    assert r.returncode == 2 and "no best checkpoint to export" in r.stderr
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    before = cfg.read_bytes()
    for fmt, out, needle in (
        ("pt", "pre.json/x.pt", "pre.json: cannot write --out here (pre.json is a file)"),
        ("hf", "pre.json/hf", "pre.json: cannot write --out here (pre.json is a file)"),
        ("hf", "pre.json", "--out pre.json: is a file; give a directory"),
    ):
        r = run_cli("export", "--format", fmt, "--out", out, cwd=world)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert cfg.read_bytes() == before and not list(world.glob(".hf*")) and not list(world.glob(".pre*"))


def test_start_up_checks_hash_each_file_once(tmp_path, monkeypatch):
    """latest/ shares the step directory's files (hard links); repeated checks must not re-read them."""
    model = tiny_model()
    step, _ = save(model, tmp_path / "step_0000003")
    writing.link_pointer(step, tmp_path / "latest")
    calls = []
    real = layout.sha256_of
    monkeypatch.setattr(layout, "sha256_of", lambda f: calls.append(f.name) or real(f))
    for _ in range(3):
        layout.read_meta(step)
        layout.read_meta(tmp_path / "latest")
    assert len(calls) == 2  # model.safetensors and optimizer.pt, once each
    (tmp_path / "latest" / "optimizer.pt").unlink()  # a changed file is a new file: hashed again
    (tmp_path / "latest" / "optimizer.pt").write_bytes((step / "optimizer.pt").read_bytes())
    layout.read_meta(tmp_path / "latest")
    assert len(calls) == 3


def test_a_reader_of_latest_beside_a_saving_run_gets_one_whole_save(tmp_path, monkeypatch):
    """A run replaced latest/ between export's read of the sidecar and of the weights: export called the sound
    checkpoint corrupt (CI, once). The read is done again until latest/ held the same files before and after it;
    a check made before the load (a verdict) holds only for the weights it checked."""
    first, _ = save(tiny_model(seed=0), tmp_path / "step_0000003", step=3)
    second, _ = save(tiny_model(seed=1), tmp_path / "step_0000006", step=6)
    latest = tmp_path / "latest"
    writing.link_pointer(first, latest)
    real_hash, real_load = layout.file_sha256, loading.load_file
    moves = []

    def hash_then_save(path):  # the run's next save lands while the reader checks step 3's sidecar
        if not moves:
            moves.append(writing.link_pointer(second, latest))
        return real_hash(path)

    monkeypatch.setattr(layout, "file_sha256", hash_then_save)
    loaded = loading.load_checkpoint(latest)
    assert moves and loaded.step == 6 and loaded.meta["files"] == layout.read_meta(second)["files"]
    assert all(torch.equal(loaded.model_state[k], v) for k, v in loading.load_checkpoint(second).model_state.items())

    monkeypatch.setattr(layout, "file_sha256", real_hash)
    writing.link_pointer(first, latest)
    approved = layout.model_sha256(layout.read_meta(first))
    monkeypatch.setattr(loading, "load_file", lambda p: writing.link_pointer(second, latest) or real_load(p))
    with pytest.raises(UserError, match="moved on to step 6 after it was checked"):
        loading.load_checkpoint(latest, approved=approved)

    monkeypatch.setattr(loading, "load_file", real_load)
    assert loading.load_checkpoint(latest).origin == second.resolve()  # what a record names: the step latest/ was
    (second / "model.safetensors").unlink()
    (second / "model.safetensors").write_bytes(
        (latest / "model.safetensors").read_bytes()
    )  # a copy: not the same files
    assert loading.load_checkpoint(latest).origin == latest.resolve()
    assert loading.load_checkpoint(first).origin == first.resolve()


def test_an_exported_pt_is_checked_like_a_checkpoint_directory(world):
    """A .pt used to resume without the checks a folder gets: any phase, any data, any bytes (re-exporting then
    hid the damage). Its record (best.pt.json) now says its phase, caches and sha256; without one, a warning."""
    import shutil

    from trainer_accel import prepare

    pre = write_config(world / "pre.json", "pretrain", {"total_steps": 4})
    assert run_cli("run", "--phase", "pretrain", "--config", str(pre), cwd=world).returncode == 0
    best = world / "checkpoints/best.pt"
    sft = write_config(world / "sft.json", "sft", {"total_steps": 4})
    r = run_cli("run", "--phase", "sft", "--config", str(sft), "--resume", str(best), cwd=world)
    assert r.returncode == 2 and "a pretrain checkpoint cannot resume the sft phase" in r.stderr, r.stderr

    unverified = world / "copy.pt"  # no record beside it: accepted, said
    shutil.copy(best, unverified)
    longer = write_config(world / "pre8.json", "pretrain", {"total_steps": 8})
    r = run_cli(
        "run",
        "--phase",
        "pretrain",
        "--config",
        str(longer),
        "--resume",
        str(unverified),
        cwd=world,
        env={"TRAINER_ARTIFACTS_DIR": "other"},
    )
    assert r.returncode == 0 and "copy.pt: no copy.pt.json beside it, so nothing could verify this file" in r.stderr

    (world / "more.txt").write_text("\n\n".join(f"Paragraph {i} of some other text entirely." for i in range(20)))
    data = world / "data"
    shutil.copytree(data, world / "data_before")
    assert prepare.main(["--stream", "roam=more.txt"]) == 0
    r = run_cli(
        "run",
        "--phase",
        "pretrain",
        "--config",
        str(longer),
        "--resume",
        str(best),
        cwd=world,
        env={"TRAINER_ARTIFACTS_DIR": "third"},
    )
    assert r.returncode == 2 and "the caches differ from those this checkpoint was trained on" in r.stderr, r.stderr
    shutil.rmtree(data)
    shutil.move(world / "data_before", data)

    raw = bytearray(best.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the weights, same size
    best.write_bytes(bytes(raw))
    for args in (
        ("run", "--phase", "pretrain", "--config", str(longer), "--resume", str(best)),
        ("export", "--checkpoint", str(best), "--out", "again.pt"),
    ):
        r = run_cli(*args, cwd=world, env={"TRAINER_ARTIFACTS_DIR": "fourth"})
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1, r.stderr
        assert "best.pt: sha256" in errors[0] and "the file is damaged or was replaced without its record" in errors[0]
    assert not (world / "fourth/again.pt").exists() and not (world / "again.pt").exists()


def test_an_empty_pt_or_pytorch_model_bin_is_one_line_not_a_traceback(world, tmp_path):
    """torch.load's EOFError on an empty file has no message, and the handler's str(e).splitlines()[0] raised."""
    from trainer_accel.errors import UserError
    from trainer_accel.training.start import load_start

    (world / "empty.pt").write_bytes(b"")
    r = run_cli("export", "--checkpoint", "empty.pt", "--out", "out.pt", cwd=world)
    assert r.returncode == 2 and "empty.pt: not a loadable best.pt (EOFError)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (world / "out.pt").exists()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps(
            {"model_type": "gpt2", "vocab_size": 260, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2}
        )
    )
    (hf / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"pytorch_model.bin: cannot be loaded safely \(EOFError\)|unreadable weights"):
        load_start(hf, None, with_optimizer=False)
