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

from trainer_accel.data.tokenizer import (
    ASST,
    DOC,
    EOT,
    SPECIAL_TOKENS,
    USER,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
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


def tokenizer_files(tok: Tokenizer, context: int, eos: str, bos: str = DOC, template: str | None = None) -> dict[str, str]:
    """File name -> text of the tokenizer part of an export. `eos`: the token that ends what the model writes
    (<|eot|> or the model's own template's end-of-turn token after SFT, <|endoftext|> for a pretrained model);
    `template`: the model's own chat template SFT used (None: the built-in one)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context, "eos_token": eos,
        "pad_token": DOC, "bos_token": bos, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "chat_template": template or CHAT_TEMPLATE,
    }
    return {"tokenizer.json": tokenizer_json(tok),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps({"eos_token": eos, "pad_token": DOC,
                                                   "bos_token": bos, "additional_special_tokens": [USER, ASST, EOT]}, indent=2) + "\n"}
