"""The tokenizer files of a Hugging Face export, with the ids our caches hold and the chat template SFT used.

tokenizer.json is the tokenizer the caches were made with: a tokenizer.json as we read it (the special tokens we
added to it included), or for the built-in byte tokenizer an equivalent `tokenizers` tokenizer: a byte-level BPE
with no merges, so every UTF-8 byte b is token b, and the four special tokens take 256-259 as ours do.
tokenizer_config.json carries the chat template, which renders `<|user|>` prompt `<|assistant|>` answer `<|eot|>`
exactly as tokenizer.encode_chat does, and names the end-of-text and padding tokens, and as the beginning of a text
the <|endoftext|> that config.json names too (nothing adds it to an encoding; lm-eval starts its rolling windows
with it, which is what a document boundary looks like in our pretraining streams).

One difference is Hugging Face's, and every chat model there shares it: AutoTokenizer reads a special token
typed in text (a literal "<|user|>") as that token, since its chat template renders to text first. Our caches
keep such text as text; `tokenizer(text, split_special_tokens=True)` encodes it as we do.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer_accel.data.chat_template import read_config
from trainer_accel.data.tokenizer import (
    ASST,
    DOC,
    EOT,
    SPECIAL_TOKENS,
    USER,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    tokenizer_file,
)
from trainer_accel.errors import UserError

# A leading system message is written at the start of the first user message, as SFT wrote it (the format has no
# system role); a system message anywhere else is refused.
CHAT_TEMPLATE = (
    "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\n\n' if has_system and messages[0]['content'] else '' -%}"
    "{%- for message in (messages[1:] if has_system else messages) -%}"
    f"{{%- if message['role'] == 'user' -%}}{USER}{{{{ (system if loop.first else '') + message['content'] }}}}"
    f"{{%- elif message['role'] == 'assistant' -%}}{ASST}{{{{ message['content'] }}}}{EOT}"
    "{%- else -%}{{ raise_exception('this model was trained on user and assistant turns (after one system "
    "message) only, not ' + message['role'] + ' messages there') }}"
    "{%- endif -%}{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{ASST}{{%- endif -%}}"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of the `tokenizers` ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("export --format hf needs the 'tokenizers' package (pip install 'trainer_accel[hf]')") from None
    return tokenizers


def byte_level_equivalent():
    """A `tokenizers.Tokenizer` that gives ByteTokenizer's ids for every text, and decodes them alike."""
    tk = _tokenizers()
    chars = byte_to_unicode()
    tok = tk.Tokenizer(tk.models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ours = ByteTokenizer().special
    got = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if got != ours:  # a tokenizers release that numbered added tokens otherwise would break every id after 255
        raise UserError(f"the 'tokenizers' package gave the special tokens ids {got}, the byte tokenizer's are {ours}")
    return tok


def tokenizer_json(tok: Tokenizer) -> str:
    if isinstance(tok, ByteTokenizer):
        return byte_level_equivalent().to_str(pretty=True)
    if isinstance(tok, HFTokenizer):
        return tok.hf_json()
    raise UserError(f"tokenizer {tok.identity}: no Hugging Face form known")


def tokenizer_files(
    tok: Tokenizer, context: int, eos: str, bos: str = DOC, template: str | None = None
) -> dict[str, str]:
    """File name -> text of the tokenizer part of an export written from nothing (the built-in byte tokenizer, or a
    tokenizer.json with no tokenizer_config.json beside it). `eos`: the token that ends what the model writes
    (<|eot|> or the model's own template's end-of-turn token after SFT, <|endoftext|> for a pretrained model);
    `template`: the model's own chat template SFT used (None: the built-in one)."""
    pad = tok.decode([tok.special[DOC]]) if isinstance(tok, HFTokenizer) else DOC
    chat_tokens = [t for t in (USER, ASST, EOT) if t in tok.special]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context,
        "eos_token": eos,
        "pad_token": pad,
        "bos_token": bos,
        "unk_token": None,
        "add_bos_token": bool(tok.bos_ids),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": template or CHAT_TEMPLATE,
    }
    return {
        "tokenizer.json": tokenizer_json(tok),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(
            {"eos_token": eos, "pad_token": pad, "bos_token": bos, "additional_special_tokens": chat_tokens}, indent=2
        )
        + "\n",
    }


def model_tokenizer_files(
    tok: HFTokenizer, eos: str | None, template: str | None, changes: list[str]
) -> dict[str, str] | None:
    """The tokenizer files the model came with (the folder of the tokenizer.json its caches were made with),
    carried into an export: tokenizer.json byte for byte when prepare added nothing, tokenizer_config.json with
    every setting kept (special tokens, bos null, add_bos_token, tokenizer_class, model_max_length) but the chat
    template the model was trained in, the tokens prepare added and an end-of-turn token training changed (`eos`:
    the token SFT trained answers to end with; None after pretraining, which changes no end of turn; each change
    appended to `changes`), and special_tokens_map.json as it was. None where the folder has no
    tokenizer_config.json: the export writes its own (tokenizer_files)."""
    folder = Path(tok.path).parent
    source = folder / "tokenizer_config.json"
    if not source.is_file():
        return None
    config = read_config(source)
    out: dict[str, str] = {}
    jinja = folder / "chat_template.jinja"
    own = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
    if template is None:  # not fine-tuned on conversations: the template it came with, if any
        template = own
    elif template != own:
        changes.append("chat_template: the template the model was trained in, not the one it came with")
    if template is not None:
        config["chat_template"] = template
    if tok.added:
        decoder = config.setdefault("added_tokens_decoder", {})
        if isinstance(decoder, dict):
            for t in tok.added:
                decoder[str(tok.token_id(t))] = {
                    "content": t,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
        changes.append(f"added tokens {', '.join(tok.added)} (prepare added them)")
    own_eos = config.get("eos_token")
    own_eos = own_eos.get("content") if isinstance(own_eos, dict) else own_eos
    if eos is not None and own_eos != eos:
        changes.append(f"eos_token {own_eos!r} -> {eos!r} (the token that ends what the model was trained to write)")
        config["eos_token"] = eos
    out["tokenizer.json"] = (
        tokenizer_file(Path(tok.path)).read_text(encoding="utf-8") if not tok.added else tok.hf_json()
    )
    out["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    tokens_map = folder / "special_tokens_map.json"
    if tokens_map.is_file():
        mapped = read_config(tokens_map)
        if eos is not None and own_eos != eos and "eos_token" in mapped:
            mapped["eos_token"] = eos
        out["special_tokens_map.json"] = json.dumps(mapped, indent=2, ensure_ascii=False) + "\n"
    return out


def model_generation_config(tok: Tokenizer, stops: list[int], changes: list[str]) -> dict | None:
    """The generation_config.json the model came with (its recommended sampling: Qwen3's temperature 0.6, top_p
    0.95, top_k 20; its stop ids), with each id in `stops` that training made an end added to its eos_token_id;
    None where the tokenizer's folder has none."""
    if not getattr(tok, "path", None) or not (Path(tok.path).parent / "generation_config.json").is_file():
        return None
    path = Path(tok.path).parent / "generation_config.json"
    config = read_config(path)
    own = config.get("eos_token_id")
    ids = list(own) if isinstance(own, list) else [own] if own is not None else []
    missing = [i for i in stops if i not in ids]
    if missing:
        config["eos_token_id"] = ids + missing
        changes.append(f"generation_config eos_token_id {own} -> {config['eos_token_id']}")
    return config
