"""The one layout every training step sees: left-padded prompts next to right-padded responses.

    prompt_tokens   [B, P]  left-padded, so every prompt ends at column P-1
    response_tokens [B, R]  right-padded, so every response starts at column P of the joint sequence

With that layout the log-prob of response token r is read off the hidden state at joint position P-1+r,
for every row at once, and losses get `[B, R]` arrays aligned with the response tokens.

Optional fields, None unless a batch needs them:
    target_mask     [B, R]  the response tokens a likelihood loss trains on, where that is not all of
                            them (a conversation's assistant turns; `loss_mask` combines both masks)
    segment_ids     [B, L]  packed rows: 1, 2, ... per example, 0 on padding; a token attends only to
                            earlier tokens of its own segment
    segment_positions [B, L]  packed rows: RoPE positions restarting at 0 in each segment
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Int


@struct.dataclass
class SequenceBatch:
    prompt_tokens: Int[Array, "B P"]
    prompt_mask: Bool[Array, "B P"]
    response_tokens: Int[Array, "B R"]
    response_mask: Bool[Array, "B R"]
    target_mask: Bool[Array, "B R"] | None = None
    segment_ids: Int[Array, "B L"] | None = None
    segment_positions: Int[Array, "B L"] | None = None

    @property
    def loss_mask(self) -> Bool[Array, "B R"]:
        """The response tokens a likelihood loss trains on."""
        return self.response_mask if self.target_mask is None else self.response_mask & self.target_mask

    @property
    def tokens(self) -> Int[Array, "B L"]:
        return jnp.concatenate([self.prompt_tokens, self.response_tokens], axis=1)

    @property
    def attention_mask(self) -> Bool[Array, "B L"]:
        return jnp.concatenate([self.prompt_mask, self.response_mask], axis=1)

    @property
    def positions(self) -> Int[Array, "B L"]:
        """RoPE positions: 0 at each row's first real token, whatever its left padding (packed rows: at
        each segment's first token)."""
        if self.segment_positions is not None:
            return self.segment_positions
        return jnp.maximum(jnp.cumsum(self.attention_mask.astype(jnp.int32), axis=1) - 1, 0)

    @property
    def response_lengths(self) -> Int[Array, " B"]:
        return self.response_mask.sum(axis=1)


def bucket_length(length: int, *, minimum: int = 8) -> int:
    """Smallest power of two >= max(length, minimum): the padded length a run compiles for.

    Bucketing bounds the number of distinct shapes (hence compilations) to log2 of the longest length;
    the cost is at most 2x padding. The sampler's prompts, the training batches' prompts and responses
    and the agentic step rows are all bucketed by this one rule.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if minimum < 1:
        raise ValueError(f"minimum bucket must be >= 1, got {minimum}")
    return 1 << (max(length, minimum) - 1).bit_length()


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    prompt_len: int | None = None,
    response_len: int | None = None,
    targets: Sequence[Sequence[bool]] | None = None,
) -> SequenceBatch:
    """Lay token lists out as a SequenceBatch; lengths default to the power-of-two bucket of the longest.
    targets: per response token, whether a likelihood loss trains on it (the batch's target_mask).

    Raises ValueError naming the row when a prompt is empty or a row does not fit the given lengths.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"pack_sequences: {len(prompts)} prompts but {len(responses)} responses")
    P = prompt_len or bucket_length(max(len(p) for p in prompts))
    R = response_len or bucket_length(max(len(r) for r in responses))
    B = len(prompts)
    pt = np.full((B, P), pad_id, np.int32)
    pm = np.zeros((B, P), bool)
    rt = np.full((B, R), pad_id, np.int32)
    rm = np.zeros((B, R), bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not p:
            raise ValueError(f"pack_sequences: row {i} has an empty prompt")
        if len(p) > P or len(r) > R:
            raise ValueError(
                f"pack_sequences: row {i} has prompt/response lengths {len(p)}/{len(r)}, "
                f"more than the {P}/{R} tokens allowed"
            )
        pt[i, P - len(p) :] = p
        pm[i, P - len(p) :] = True
        rt[i, : len(r)] = r
        rm[i, : len(r)] = True
    target = None
    if targets is not None:
        target = np.zeros((B, R), bool)
        for i, t in enumerate(targets):
            target[i, : len(t)] = t
        target = jnp.asarray(target)
    return SequenceBatch(jnp.asarray(pt), jnp.asarray(pm), jnp.asarray(rt), jnp.asarray(rm), target)
