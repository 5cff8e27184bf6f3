"""The allowed-token bitmask as it travels with a step: int32 words, bit j of word i allows token 32 * i + j
(llguidance's and xgrammar's layout; little-endian hosts). ceil(vocab / 32) words a row: 6 KiB for a vocabulary
of 49152 tokens."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def pack_allowed(token_ids: Iterable[int], vocab_size: int) -> np.ndarray:
    """The bitmask [words] int32 that allows exactly `token_ids`."""
    allowed = np.zeros(bitmask_words(vocab_size) * 32, dtype=bool)
    allowed[list(token_ids)] = True
    return np.packbits(allowed, bitorder="little").view(np.int32)


def unpack_allowed(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """[rows, words] int32 -> [rows, vocab_size] bool. Tokens past the mask's width are not allowed (a mask built
    for the tokenizer's vocabulary, narrower than the logits, allows none of the padding)."""
    words = np.ascontiguousarray(words, dtype=np.int32).reshape(len(words), -1)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").view(bool)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return np.pad(bits, ((0, 0), (0, vocab_size - bits.shape[1])))
