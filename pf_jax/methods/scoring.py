"""Teacher-forced scores of responses: log-probs (policy, reference, base), entropies, values, and the
internal rewards computed from the policy's own distributions.

The response r of a SequenceBatch is predicted from joint position P-1+r, the same for every row (prompts
are left-padded), so every score is one forward pass and a slice. The scoring passes are jitted once per
batch shape; the same `response_logprobs` runs inside the train step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from jax.sharding import Mesh, NamedSharding

from pf_jax.data.sequences import SequenceBatch
from pf_jax.losses import self_certainty_from_logits
from pf_jax.models.decoder import Decoder
from pf_jax.models.logprobs import token_logprobs
from pf_jax.tasks.rewards import INTERNAL_REWARDS


def response_logprobs(
    model: Decoder, seq: SequenceBatch, *, chunk_size: int = 128, entropy: bool = False
) -> tuple[Array, Array | None, Array]:
    """Teacher-forced log pi(response_t | prompt, response_<t), [B, R]; optionally the per-token entropy
    of the full distribution; and the final hidden states [B, P+R, D] (for heads)."""
    hidden, _ = model(seq.tokens, seq.positions, seq.attention_mask, segment_ids=seq.segment_ids)
    P, R = seq.prompt_tokens.shape[1], seq.response_tokens.shape[1]
    out = token_logprobs(
        hidden[:, P - 1 : P - 1 + R], model.lm_head(), seq.response_tokens, chunk_size=chunk_size,
        softcap=model.cfg.final_logit_softcap, return_entropy=entropy,
    )
    logp, ent = out if entropy else (out, None)
    return logp, ent, hidden


def policy_terms(model: Decoder, seq: SequenceBatch, chunk_size: int) -> tuple[Array, Array, Array, dict[str, Array]]:
    """(log-probs [B, R], entropies [B, R], hidden states, {"entropy": mean over response tokens}) of the
    policy on `seq`: what every objective's loss starts from."""
    logp, ent, hidden = response_logprobs(model, seq, chunk_size=chunk_size, entropy=True)
    mask = seq.response_mask
    return logp, ent, hidden, {"entropy": jnp.sum(jnp.where(mask, ent, 0.0)) / jnp.maximum(mask.sum(), 1)}


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "entropy", "mesh"))
def _score(graphdef: nnx.GraphDef, params: nnx.State, seq: SequenceBatch, chunk_size: int, entropy: bool,
           mesh: Mesh | None = None):
    """mesh: the multi-device mesh of `params` (weights_mesh), for kernels that run per device (splash)."""
    model = nnx.merge(graphdef, params)
    model.ops = model.ops.on_mesh(mesh)
    return response_logprobs(model, seq, chunk_size=chunk_size, entropy=entropy)


def weights_mesh(params: nnx.State) -> Mesh | None:
    """The mesh of the first array of `params` placed on several devices (the sampler layout's), else None."""
    for leaf in jax.tree_util.tree_leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


@functools.partial(jax.jit, static_argnames=("graphdef", "P", "R"))
def _values(graphdef, params, hidden, P: int, R: int):
    head = nnx.merge(graphdef, params)
    return head(hidden[:, P - 1 : P - 1 + R])


@functools.partial(jax.jit, static_argnames=("graphdef", "rows_per_chunk"))
def self_certainty(graphdef: nnx.GraphDef, params: nnx.State, seq: SequenceBatch, rows_per_chunk: int = 8) -> Array:
    """KL(U || pi(. | y_<t)) = -log V - (1/V) sum_v log pi(v | y_<t) for every response position, [N, R]
    (Intuitor, arXiv 2505.19590); logits are formed a few rows at a time (lax.map), so memory is
    [rows_per_chunk, R, V], never [N, R, V]."""
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


@dataclass
class Scorer:
    """Teacher-forced scores of a (frozen or current) model, compiled once per batch shape."""

    graphdef: nnx.GraphDef
    chunk_size: int

    def logprobs(self, params: nnx.State, seq: SequenceBatch, graphdef: nnx.GraphDef | None = None) -> Array:
        """Per-token log-probs [B, R] of `params` (in `graphdef`, default the scorer's: the policy's)."""
        return _score(graphdef or self.graphdef, params, seq, self.chunk_size, False, weights_mesh(params))[0]

    def logprobs_entropy_hidden(self, params: nnx.State, seq: SequenceBatch) -> tuple[Array, Array, Array]:
        return _score(self.graphdef, params, seq, self.chunk_size, True, weights_mesh(params))

    def values(self, params: nnx.State, head_graphdef: nnx.GraphDef, head_params: nnx.State,
               seq: SequenceBatch) -> Array:
        """The value head's V(s_t) over the response positions, [B, R]."""
        _, _, hidden = self.logprobs_entropy_hidden(params, seq)
        return _values(head_graphdef, head_params, hidden, seq.prompt_tokens.shape[1], seq.response_tokens.shape[1])

    def internal_reward(self, name: str, params: nnx.State, seq: SequenceBatch) -> np.ndarray:
        """RLIF rewards from the policy's own distributions, sequence means over the response tokens:
        negative token entropy (EM) or self-certainty (Intuitor)."""
        m = seq.response_mask
        if name == "entropy":
            per_token = -self.logprobs_entropy_hidden(params, seq)[1]
        elif name == "self_certainty":
            per_token = self_certainty(self.graphdef, params, seq)
        else:
            raise ValueError(f"reward {name!r} is not an internal reward; known: {INTERNAL_REWARDS}")
        n = jnp.maximum(m.sum(axis=1), 1)
        return np.asarray(jnp.sum(jnp.where(m, per_token, 0.0), axis=1) / n)
