"""A checkpoint as a Hugging Face transformers directory: `python -m trainer_accel.export --format hf`.

The directory holds config.json and model.safetensors (sharded above 5 GiB, with its index; the family's mapping in
models/), generation_config.json, the tokenizer files
with the chat template (hf/tokenizer.py) and trainer_accel_export.json, the record of where it came from. It is
written under a temporary name and renamed into place, so a kill leaves the old directory or none; an existing
--out is replaced only when it is empty or an earlier export of this trainer.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file

from trainer_accel.checkpoints.layout import model_sha256
from trainer_accel.checkpoints.loading import LoadedCheckpoint, load_checkpoint
from trainer_accel.data.cache import meta_path
from trainer_accel.data.chat_template import find_chat_template
from trainer_accel.data.tokenizer import (
    DOC,
    EOT,
    LEGACY_ADDED,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    tokenizer_from_meta,
)
from trainer_accel.errors import UserError, first_line, raise_if_any
from trainer_accel.faults import fault_point
from trainer_accel.fsio import (
    FILE_MODE,
    TRASH_PREFIX,
    fsync_dir,
    fsync_file,
    held_alone,
    loads,
    now_iso,
    swap_into_place,
    write_atomic,
)
from trainer_accel.hf.directory import EXPORT_RECORD, is_hf_dir
from trainer_accel.hf.tokenizer import (
    CHAT_TEMPLATE,
    model_generation_config,
    model_tokenizer_files,
    tokenizer_files,
)
from trainer_accel.models import families
from trainer_accel.paths import Paths

log = logging.getLogger(__name__)

RECORD = EXPORT_RECORD
RECORD_FORMAT = "trainer_accel.export.hf"
# Every file an export writes, and so every file a re-export may replace; anything else in --out is the user's.
EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "model.safetensors",
        "model.safetensors.index.json",
        RECORD,
    }
)
# what a re-export replaces: what it writes, and a chat_template.jinja, which no export writes and which would override
# the template in tokenizer_config.json for transformers
REPLACED = EXPORT_FILES | {"chat_template.jinja"}
SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")  # the shards of a large export, as transformers names them
BYTES = "bytes"  # --tokenizer bytes: the built-in byte tokenizer, which has no file
SHARD_BYTES = 5 * 2**30  # above this an export is sharded (transformers' own default for save_pretrained)


def find_tokenizer(
    loaded: LoadedCheckpoint,
    given: Path | None,
    paths: Paths,
    way: str = "pass the file the caches were made with as --tokenizer PATH",
) -> Tokenizer:
    """The tokenizer the checkpoint's caches were made with: built in, or its tokenizer.json, found through
    --tokenizer, the path the checkpoint recorded, or a cache of the same tokenizer that records one; a file whose
    identity differs is refused, since its ids would not be the ones the model learnt."""
    identity, recorded = loaded.meta.get("tokenizer"), loaded.meta.get("tokenizer_path")
    if identity is None and given is None:
        raise UserError(
            f"{loaded.source}: records no tokenizer (a .pt without its record, or one exported before "
            "tokenizers were recorded): use its checkpoint directory instead, or "
            + (
                "name the tokenizer it was trained with: --tokenizer MODEL_DIR, or --tokenizer "
                f"{BYTES} for the built-in byte tokenizer"
                if "--tokenizer" in way
                else way
            )
        )
    if given is not None and str(given) == BYTES:
        if identity not in (None, ByteTokenizer.identity):
            raise UserError(
                f"--tokenizer {BYTES}: the checkpoint was trained on {identity}, not the built-in byte tokenizer"
            )
        if identity is None:
            log.warning(
                "%s: records no tokenizer; exported with the built-in byte tokenizer as --tokenizer %s says "
                "(nothing can verify that it is the one it learnt)",
                loaded.source,
                BYTES,
            )
        return ByteTokenizer()
    if given is not None:
        if identity == ByteTokenizer.identity:
            raise UserError(
                f"--tokenizer {given}: the checkpoint was trained on the built-in byte tokenizer; leave --tokenizer out"
            )
        tok = HFTokenizer(given, added=loaded.meta.get("added_tokens", LEGACY_ADDED))
        if identity is None:
            log.warning(
                "%s: records no tokenizer; exported with %s as --tokenizer says (nothing can verify that it "
                "is the one it learnt)",
                loaded.source,
                given,
            )
        elif tok.identity != identity:
            raise UserError(
                f"--tokenizer {given}: tokenizer {tok.identity}, but the checkpoint was trained on "
                f"{identity} (another file, or this one changed)"
            )
        return tok
    own = {
        "tokenizer": identity,
        "tokenizer_path": recorded,
        **({"added_tokens": loaded.meta["added_tokens"]} if "added_tokens" in loaded.meta else {}),
    }
    metas = [own] + [_cache_meta(cache) for _, _, cache in paths.caches()]
    for meta in metas:
        tok = tokenizer_from_meta(meta) if meta.get("tokenizer") == identity else None
        if tok is not None:
            return tok
    raise UserError(
        f"{loaded.source}: its tokenizer.json ({identity}) is not at {recorded or 'a recorded path'}; {way}"
    )


def _cache_meta(cache: Path) -> dict:
    try:
        meta = loads(meta_path(cache).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def generation_config(special: dict[str, int], end: str = EOT, bos: str = DOC, doc: str = DOC) -> dict[str, Any]:
    """Greedy by default; a turn ends at its end-of-turn token (<|eot|>, or the model's own template's) and a
    document at the end-of-text token `doc`, which also pads. No length: a max_length here draws a warning from every
    call that passes max_new_tokens, as pipelines do."""
    ends = list(dict.fromkeys([special[end], special[doc]]))
    return {"bos_token_id": special[bos], "eos_token_id": ends, "pad_token_id": special[doc], "do_sample": False}


def model_token_ids(tok: Tokenizer, eos: int | None) -> dict[str, Any]:
    """config.json's bos, eos and pad ids as the model came with them (the config.json beside its tokenizer), the
    eos made the end-of-turn token where training made it one; {} where there is none to keep."""
    path = getattr(tok, "path", None)
    if not path or not (Path(path).parent / "config.json").is_file():
        return {}
    try:
        own = loads((Path(path).parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(own, dict):
        return {}
    out = {k: own[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in own}
    if eos is not None:
        ids = own.get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
        out["eos_token_id"] = eos if not ids or ids == [eos] else ([eos] + [i for i in ids if i != eos])
    return out


def check_out(out: Path) -> list[str]:
    """--out may be new, empty, or an earlier export of ours (a record we wrote, validated); anything else is the
    user's and stays. Returns the names in an earlier export that no export writes (a README.md, lm-eval's
    eval_results/): they are carried into the new export, untouched."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a directory")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return []
    listed = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
    if RECORD not in present:
        raise UserError(
            f"--out {out}: a directory with other files in it ({listed}), not an earlier export (no "
            f"{RECORD}); nothing was written: choose a new or empty directory"
        )
    problem = record_problem(out / RECORD)
    if problem:
        raise UserError(
            f"--out {out}: {RECORD} {problem}, so this is not an earlier export of this trainer and "
            f"its files ({listed}) are not ours to replace; nothing was written: choose a new or empty "
            "directory"
        )
    return [name for name in present if name not in REPLACED and not SHARD.match(name)]


def record_problem(path: Path) -> str | None:
    """What makes a file not an export record of ours (None: it is one)."""
    try:
        record = loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"cannot be read as JSON ({type(e).__name__})"
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return f'has no "format": "{RECORD_FORMAT}"'
    wrong = [
        k
        for k, kind in (("step", int), ("model_cfg", dict), ("exported_at", str), ("source", str))
        if not isinstance(record.get(k), kind) or isinstance(record.get(k), bool)
    ]
    return f"lacks what an export records ({', '.join(wrong)})" if wrong else None


def carry_over(names: list[str], earlier: Path, into: Path) -> None:
    """The user's files of an earlier export, into the new one as hard links (copies across filesystems): the
    earlier directory keeps them until the new one has replaced it, so a kill at any moment loses none."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for name in names:
        src, dst = earlier / name, into / name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=link)
        elif src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            link(str(src), str(dst))


def export_hf(
    source: Path,
    out: Path,
    paths: Paths,
    tokenizer: Path | None = None,
    verdict: Callable[[dict], str | None] = lambda meta: None,
    approved: str | None = None,
    *,
    chat_model: Callable[[dict], bool],
    load: Callable[[Path, str | None], LoadedCheckpoint] | None = None,
) -> dict[str, Any]:
    """Write the Hugging Face directory of a checkpoint directory or exported .pt; returns its record. One export
    at a time per --out: a second one's sweep would delete the first one's temporary directory. `verdict` gives
    the promotion verdict of the weights loaded from their sidecar (latest/ may have moved on since the command
    started); `approved`, the only weights a check made before the load allows; `chat_model`, whether the sidecar's
    phase makes a chat model (phases/registry.is_chat_model), which ends its turns with the end-of-turn token;
    `load(path, approved)`, how the weights are read (training/start.py's merges an adapter into its base)."""
    if Path(out).is_symlink():
        raise UserError(
            f"--out {out}: a symbolic link (to {os.readlink(out)}); an export replaces its directory "
            "whole, so name the directory itself"
        )
    if Path(out).name in ("", ".", ".."):  # --out . is the directory itself, with its lock beside it, not inside
        out = Path(os.path.abspath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: its folder cannot be made ({e.strerror or type(e).__name__})") from None
    with held_alone(
        out.parent / f".{out.name}.export.lock",
        f"--out {out}: another export is writing there; wait for it",
        remove=True,
    ):
        return _export_hf(source, out, paths, tokenizer, verdict, approved, chat_model, load)


def _export_hf(
    source: Path,
    out: Path,
    paths: Paths,
    tokenizer: Path | None,
    verdict: Callable[[dict], str | None],
    approved: str | None,
    chat_model: Callable[[dict], bool],
    load: Callable[[Path, str | None], LoadedCheckpoint] | None,
) -> dict[str, Any]:
    sweep_leftovers(out)  # first: an export set aside by a kill goes back in place, and its user files with it
    kept = check_out(out)
    if is_hf_dir(source):
        raise UserError(f"{source}: already a Hugging Face directory; nothing to export")
    loaded = load(source, approved) if load else load_checkpoint(source, with_optimizer=False, approved=approved)
    cfg = loaded.meta["model_cfg"]
    mapping = families.writing(cfg)
    raise_if_any(
        [
            f"{source}: {p}; not exported (an approximation would compute something else)"
            for p in mapping.unrepresentable(cfg)
        ]
    )
    tok = find_tokenizer(loaded, tokenizer, paths)
    if tok.vocab_size > cfg["V"]:
        raise UserError(f"{source}: the tokenizer has {tok.vocab_size} tokens, the model's V is {cfg['V']}")
    chat = loaded.meta.get("chat")  # the model's own chat template, when SFT used one (chat_template.py)
    sft = chat_model(loaded.meta)
    if "tokenizer" not in loaded.meta or loaded.meta.get("phase") is None:
        log.warning(
            "%s: records neither its phase nor the chat template it was trained in (a .pt without its "
            "record): exported as a pretrained model with the built-in template; if it was fine-tuned in a "
            "model's own template, export its checkpoint directory instead",
            source,
        )
    doc = tok.decode([tok.special[DOC]]) if isinstance(tok, HFTokenizer) else DOC
    special = {doc: tok.special[DOC], **({EOT: tok.special[EOT]} if EOT in tok.special else {})}
    bos = tok.decode(list(tok.bos_ids[:1])) if tok.bos_ids else doc
    end = EOT if EOT in tok.special else doc
    if chat:  # its end-of-turn token ends what the model writes; its bos is what the template writes first
        end, bos = tok.decode([chat["answer_end"]]), chat.get("bos_token") or bos
        special[end] = chat["answer_end"]
    if bos not in special:
        own = tok.token_id(bos) if isinstance(tok, HFTokenizer) else None
        special[bos] = own if own is not None else tok.bos_ids[0] if tok.bos_ids else tok.special[DOC]
    eos = end if sft else doc
    # the template it was trained in; a pretrained model keeps the one it came with (None), or gets ours
    template = chat["template"] if chat else CHAT_TEMPLATE if sft else None
    changes: list[str] = []
    carried = (
        model_tokenizer_files(tok, eos if sft else None, template, changes) if isinstance(tok, HFTokenizer) else None
    )
    stops = [special[eos]] + ([tok.special[DOC]] if sft else [])
    gen = model_generation_config(tok, stops, changes) or generation_config(special, end, bos, doc)
    config = {**mapping.hf_config(cfg, special, eos, doc), "bos_token_id": special[bos]}
    config.update(model_token_ids(tok, special[eos] if sft else None))
    files = {
        "config.json": json.dumps(config, indent=2) + "\n",
        "generation_config.json": json.dumps(gen, indent=2) + "\n",
        **(carried or tokenizer_files(tok, cfg["T"], eos, bos, chat["template"] if chat else None)),
    }
    carries = "the one the model came with" if carried else "the built-in one"
    template_said = (
        f"none trained (a pretrained model); it carries {carries}"
        if not sft
        else f"the model's own, as trained ({chat['template_source']})"
        if chat
        else "the built-in <|user|> ... <|eot|> format the SFT data used"
    )
    log.info("chat template in the export: %s", template_said)
    if sft and not chat and isinstance(tok, HFTokenizer) and find_chat_template(Path(tok.path)) is not None:
        log.warning(
            "%s: trained in the built-in chat format, so the export carries it, not the template the model "
            "came with (%s)",
            source,
            find_chat_template(Path(tok.path)).source,
        )
    if chat and chat.get("template_args"):
        log.warning(
            "the model was trained with template arguments %s: pass them to apply_chat_template too",
            json.dumps(chat["template_args"]),
        )
    for change in changes:
        log.info("changed from what the model came with: %s", change)
    record = {
        "format": RECORD_FORMAT,
        "out": str(out.resolve()),
        "exported_at": now_iso(),
        "source": str(loaded.origin or Path(source).resolve()),
        "phase": loaded.meta.get("phase"),
        "run_id": loaded.meta.get("run_id"),
        "step": loaded.step,
        "best_val_loss": loaded.best_val_loss,
        "model_sha256": model_sha256(loaded.meta),
        "verdict": verdict(loaded.meta),
        "tokenizer": tok.identity,
        "model_cfg": cfg,
        "chat_template": template_said,
        **({"template_args": chat["template_args"]} if chat and chat.get("template_args") else {}),
        "tokenizer_files": "carried over from " + str(Path(tok.path).parent) if carried else "written",
        "changed": changes,
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        weights = write_weights(mapping.state_to_hf(loaded.model_state, cfg), tmp)
        for name, text in {**files, RECORD: json.dumps(record, indent=2) + "\n"}.items():
            write_atomic(tmp / name, text.encode())
        carry_over(kept, out, tmp)
        fault_point("hf_export", partial=tmp / weights[0])
        fsync_dir(tmp)
        swap_into_place(tmp, out)
    except (OSError, SafetensorError) as e:  # a full disk, a quota: the earlier export was never touched
        raise UserError(
            f"--out {out}: the export could not be written ({first_line(e)}); nothing there was changed"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if kept:
        log.info("%s: kept %s (not written by an export)", out, ", ".join(kept))
    return record


def write_weights(state: dict[str, Any], folder: Path) -> list[str]:
    """model.safetensors, or above SHARD_BYTES the shards and model.safetensors.index.json that transformers
    writes and reads (tensors in order, a shard closed before it would pass the limit); returns the files."""
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, part in zip(names, shards):
        save_file(part, str(folder / name), metadata={"format": "pt"})
        os.chmod(folder / name, FILE_MODE)  # safetensors writes 0600; a served model is read by others
        fsync_file(folder / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, part in zip(names, shards) for k in part},
        }
        write_atomic(folder / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
    return names


def sweep_leftovers(out: Path) -> None:
    """What a killed export left beside --out: its temporary directory, or the earlier export it had set aside
    (complete, so it goes back in place when --out is missing)."""
    name = glob.escape(out.name)  # an --out named hf[12] must not match another export's .hf1.tmp-*
    for tmp in out.parent.glob(f".{name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(out.parent.glob(f"{TRASH_PREFIX}{name}-*"), reverse=True):
        if not out.exists() and (old / RECORD).is_file():
            os.rename(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
