"""Byte-level BPE tokenizer rebuilt from the vocabulary and merges stored in a GGUF file."""

from __future__ import annotations

from typing import Any


def bpe_from_gguf_fields(tokens: list[str], merges: list[str], pre: str = "gpt2") -> Any:
    """A ``tokenizers.Tokenizer`` equal to the model's own: BPE over bytes, GPT-2 byte-level pre-tokenizer;
    SmolLM's ``pre`` ("smollm") also splits digits one by one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in tokens if t.startswith("<|") and t.endswith("|>")]
    if specials:
        tok.add_special_tokens(specials)
    return tok
