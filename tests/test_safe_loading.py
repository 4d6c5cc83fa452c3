"""No file the trainer reads can run code: planted pickle payloads are refused and never executed."""

from __future__ import annotations

import hashlib

import torch
from conftest import edit_sidecar, run_cli, write_config


class Payload:
    """Unpickling this creates the file named in `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_are_refused_everywhere(world):
    marker = world / "PWNED"
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # must not be able to turn the safe loads off
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0

    # 1. optimizer.pt of a checkpoint, with its sidecar checksums updated so only the unpickler can object
    ck = world / "checkpoints/pretrain/step_0000002"
    opt = ck / "optimizer.pt"
    opt.unlink()  # break the hard link shared with latest/
    torch.save({"state": {}, "param_groups": [], "evil": Payload(marker)}, opt)
    edit_sidecar(
        ck,
        lambda meta: meta["files"].update(
            {"optimizer.pt": {"size": opt.stat().st_size, "sha256": hashlib.sha256(opt.read_bytes()).hexdigest()}}
        ),
    )
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--resume", str(ck), cwd=world, env=env)
    assert r.returncode == 2 and "optimizer.pt: cannot load optimizer state safely" in r.stderr, r.stderr
    r = run_cli("export", "--checkpoint", str(ck), "--out", "x.pt", cwd=world, env=env)
    assert r.returncode == 2 and "cannot load optimizer state safely" in r.stderr

    # 2. an exported .pt given to --resume and to export
    blob = torch.load(world / "checkpoints/best.pt", weights_only=True)
    blob["step"] = Payload(marker)
    torch.save(blob, world / "evil.pt")
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--resume", "evil.pt", cwd=world, env=env)
    assert r.returncode == 2 and "evil.pt: not a loadable best.pt" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", "--checkpoint", "evil.pt", "--out", "y.pt", cwd=world, env=env)
    assert r.returncode == 2 and "evil.pt: not a loadable best.pt" in r.stderr

    # 3. an SFT phase initialised from it
    sft = write_config(world / "sft.json", "sft", init_from="evil.pt")
    r = run_cli("run", "--phase", "sft", "--config", str(sft), cwd=world, env=env)
    assert r.returncode == 2 and "evil.pt: not a loadable best.pt" in r.stderr

    assert not marker.exists()
    assert not (world / "x.pt").exists() and not (world / "y.pt").exists()
