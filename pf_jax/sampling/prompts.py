"""Prompt batches for the compiled sampler: lengths bucketed to powers of two (pf_jax.data.sequences'
bucket_length), rows left-padded so that every prompt ends at the same slot and the whole batch decodes
at one cache index."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pf_jax.data.sequences import bucket_length

__all__ = ["bucket_length", "left_pad"]


def left_pad(prompts: Sequence[Sequence[int]], *, length: int, pad_token_id: int,
             vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-align each prompt in a [B, length] array.

    prompts: B token-id sequences, each non-empty, at most `length` long and (when vocab_size is given)
    with ids in [0, vocab_size) -> (tokens int32 [B, length] with pad_token_id on the left, mask bool
    [B, length], True on real tokens). An id outside the vocabulary would be read as some other row of
    the embedding table without an error, so it is one here.
    """
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got an empty batch")
    tokens = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        ids = np.asarray(prompt, np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError(f"prompt {row} is empty; every prompt needs at least one token (e.g. BOS)")
        if ids.size > length:
            raise ValueError(f"prompt {row} has {ids.size} tokens, more than the padded length {length}")
        if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = sorted({int(i) for i in ids if not 0 <= i < vocab_size})
            raise ValueError(f"prompt {row} has token ids outside the model's vocabulary [0, {vocab_size}): "
                             f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")
        tokens[row, length - ids.size :] = ids
        mask[row, length - ids.size :] = True
    return tokens, mask
