"""Packing for SFT (`data.packing`): several examples laid end to end in each row of `packed_length`
tokens, so short examples do not each pay for a row's padding.

A packed row is one SequenceBatch row whose "prompt" is the row's first token and whose "response" is
the rest: segment_ids number the examples (1, 2, ...; 0 = padding), so that attention stays inside each
example (pf_jax.models.decoder), segment_positions restart RoPE at 0 in each, and target_mask marks the
tokens each example trains on (its response, or a conversation's assistant turns). The first token of
an example is predicted from the previous example's last one, and is never a target. The number of
rows is bucketed to a power of two (empty rows are all padding), so a run compiles a handful of times.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from pf_jax.config.errors import ConfigError
from pf_jax.data.examples import Example
from pf_jax.data.sequences import SequenceBatch, bucket_length


def assign_rows(lengths: Sequence[int], length: int) -> list[list[int]]:
    """Example indices per row, first fit in decreasing order of length (the order within a row is the
    examples' order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        if lengths[i] > length:
            raise ConfigError(f"an example of {lengths[i]} tokens is longer than data.packed_length={length}",
                              hint="raise data.packed_length or shorten the rows (data.max_prompt_tokens)")
        r = next((k for k, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(length)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return [sorted(row) for row in rows]


def pack_examples(examples: Sequence[Example], length: int, pad_id: int) -> SequenceBatch:
    """The examples packed into rows of `length` tokens (see the module)."""
    rows = assign_rows([len(e.prompt) + len(e.response) for e in examples], length)
    B = bucket_length(len(rows), minimum=1)
    tokens = np.full((B, length), pad_id, np.int32)
    valid, target = np.zeros((B, length), bool), np.zeros((B, length), bool)
    segments, positions = np.zeros((B, length), np.int32), np.zeros((B, length), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, start=1):
            e = examples[i]
            n, p = len(e.prompt) + len(e.response), len(e.prompt)
            tokens[r, at:at + n] = [*e.prompt, *e.response]
            valid[r, at:at + n] = True
            target[r, at + p:at + n] = e.targets
            segments[r, at:at + n] = s
            positions[r, at:at + n] = np.arange(n)
            at += n
    a = jnp.asarray
    return SequenceBatch(a(tokens[:, :1]), a(valid[:, :1]), a(tokens[:, 1:]), a(valid[:, 1:]), a(target[:, 1:]),
                         a(segments), a(positions))
