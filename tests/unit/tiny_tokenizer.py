"""A tiny byte-level BPE tokenizer built in memory, for grammar tests that must know every token.

Special tokens come first (ids 0..len(specials)-1), then one token per piece, then the two
half-character tokens of "é" (so partial UTF-8 pieces exist, as in real byte-level vocabularies).
"""
from __future__ import annotations

from kvyard_plugins.grammar.token_bytes import _byte_level_decoder

PIECES = tuple('{}":,[]0123456789abc') + (" ", '{"', '":', "ab", "12", " 1", "a1", "é")


def byte_level(text: str) -> str:
    spell = {b: c for c, b in _byte_level_decoder().items()}
    return "".join(spell[b] for b in text.encode())


def build_tokenizer(specials: tuple[str, ...], eos: str, bos: str | None = None, pieces=PIECES):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(specials) + [byte_level(p) for p in pieces])}
    spell = {b: c for c, b in _byte_level_decoder().items()}
    for half in "é".encode():
        vocab.setdefault(spell[half], len(vocab))
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token=bos, eos_token=eos)
