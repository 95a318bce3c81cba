"""The raw bytes each token stands for, as a regex-over-bytes grammar engine needs them.

HF tokenizers store tokens in one of three spellings:
  - byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen): each byte is one printable unicode character
    ("Ġ" is the space byte), so a token may hold half of a multi-byte UTF-8 character;
  - SentencePiece with byte fallback (Llama 2, Mistral): "▁" is a space and "<0xAB>" one byte;
  - anything else: the token text as UTF-8.
Decoding each token to a Python str instead would turn partial UTF-8 into U+FFFD and let the
grammar accept characters the model never writes, so we work in bytes throughout.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

_SPIECE_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet: unicode char -> the byte it encodes."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


def vocab_style(tokenizer: Any) -> str:
    """"byte_level", "sentencepiece" or "raw", read from the fast tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "sentencepiece" if hasattr(tokenizer, "sp_model") else "raw"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = _decoder_types(decoder)
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds or "Metaspace" in kinds or _replaces_spiece_space(decoder):
        return "sentencepiece"
    return "raw"


def _decoder_types(decoder: dict) -> set[str]:
    kinds = {decoder.get("type", "")}
    for child in decoder.get("decoders") or ():
        kinds |= _decoder_types(child)
    return kinds


def _replaces_spiece_space(decoder: dict) -> bool:
    steps = decoder.get("decoders") or [decoder]
    return any(s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == _SPIECE_SPACE
               for s in steps)


def token_to_bytes(token: str, style: str) -> bytes:
    if style == "byte_level":
        table = _byte_level_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")  # an added (non byte-level) token
    if style == "sentencepiece":
        match = _BYTE_TOKEN.match(token)
        if match:
            return bytes([int(match.group(1), 16)])
        return token.replace(_SPIECE_SPACE, " ").encode("utf-8")
    return token.encode("utf-8")


def normal_token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """token id -> bytes for every token a grammar may emit: special and control tokens
    (bos, eos, <|im_start|>, ...) are left out; end tokens are handled by the matchers."""
    style = vocab_style(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(token_id)
    out = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        data = token_to_bytes(token, style)
        if data:
            out[token_id] = data
    return out
