"""Per-token self-certainty of the policy (Intuitor, arXiv 2505.19590) without holding [N, R, V] at once."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pf_jax.data.sequences import SequenceBatch
from pf_jax.losses import self_certainty_from_logits


@functools.partial(jax.jit, static_argnames=("graphdef", "rows_per_chunk"))
def self_certainty(graphdef: nnx.GraphDef, params: nnx.State, seq: SequenceBatch, rows_per_chunk: int = 8) -> jax.Array:
    """KL(U || pi(. | y_<t)) = -log V - (1/V) sum_v log pi(v | y_<t) for every response position, [N, R];
    logits are formed a few rows at a time (lax.map), so memory is [rows_per_chunk, R, V]."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model(seq.tokens, seq.positions, seq.attention_mask)
    P, R = seq.prompt_tokens.shape[1], seq.response_tokens.shape[1]
    h = hidden[:, P - 1 : P - 1 + R]
    n = h.shape[0]
    c = max(1, min(rows_per_chunk, n))
    pad = -(-n // c) * c - n
    h = jnp.pad(h, ((0, pad), (0, 0), (0, 0))).reshape(-1, c, R, h.shape[-1])
    sc = jax.lax.map(lambda x: self_certainty_from_logits(model.logits(x)), h)
    return sc.reshape(-1, R)[:n]
