"""An enumerable tabular autoregressive model: the reference on which power sampling is checked exactly.

The model is a table cond_logits[t, prefix_index(y_<t), v] = logit of y_t = v after the prefix y_<t,
prefix_index(y_<t) = sum_{i<t} y_i V^i; shape [L, V^(L-1), V] (rows past the prefixes that exist at
position t are unused). With an ``eos_token`` a sequence ends at its first EOS (EOS included), else at
length L, so p(y) = prod_{t < |y|} p(y_t | y_<t) sums to 1 over all such sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pf_jax.sampling.power_math import ChainState, ProposeSuffix, tempered_log_probs


def prefix_indices(tokens: jax.Array, vocab_size: int) -> jax.Array:
    """int[L] tokens -> int[L] prefix_index(y_<t) for each t."""
    powers = vocab_size ** jnp.arange(tokens.shape[0])
    return jnp.concatenate([jnp.zeros((1,), tokens.dtype), jnp.cumsum(tokens * powers)[:-1]])


def tabular_token_log_probs(cond_logits: jax.Array, tokens: jax.Array, alpha: float | jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
    """Per-position log p(y_t | y_<t) and log q(y_t | y_<t) (q at T = 1/alpha). tokens int[L] -> ([L], [L])."""
    rows = cond_logits[jnp.arange(tokens.shape[0]), prefix_indices(tokens, cond_logits.shape[-1])]  # [L, V]
    pick = lambda table: jnp.take_along_axis(table, tokens[:, None], axis=-1)[:, 0]
    return pick(jax.nn.log_softmax(rows, axis=-1)), pick(tempered_log_probs(rows, alpha))


def tabular_suffix_proposer(cond_logits: jax.Array, alpha: float, eos_token: int | None = None) -> ProposeSuffix:
    """The ``ProposeSuffix`` of the tabular model (see power_math.ProposeSuffix), batched over chains."""
    vocab_size = cond_logits.shape[-1]
    length = cond_logits.shape[0]

    def propose_one(key, tokens, logp, logq, mask, start, end):
        keys = jax.random.split(key, length)

        def body(t, carry):
            tokens, logp, logq, mask, alive = carry
            row = cond_logits[t, prefix_indices(tokens, vocab_size)[t]]
            drawn = jax.random.categorical(keys[t], tempered_log_probs(row, alpha)).astype(tokens.dtype)
            resample = t >= start
            token = jnp.where(resample, drawn, tokens[t])
            exists = jnp.where(resample, alive & (t < end), mask[t])
            token = jnp.where(exists, token, 0)
            logp_t = jnp.where(resample, jax.nn.log_softmax(row)[token], logp[t])
            logq_t = jnp.where(resample, tempered_log_probs(row, alpha)[token], logq[t])
            logp_t, logq_t = jnp.where(exists, logp_t, 0.0), jnp.where(exists, logq_t, 0.0)
            ended = exists & (token == eos_token) if eos_token is not None else jnp.bool_(False)
            return (tokens.at[t].set(token), logp.at[t].set(logp_t), logq.at[t].set(logq_t),
                    mask.at[t].set(exists), alive & exists & ~ended)

        carry = jax.lax.fori_loop(0, length, body, (tokens, logp, logq, mask, jnp.bool_(True)))
        return carry[:4]

    def propose(key: jax.Array, state: ChainState, start: jax.Array, end: jax.Array) -> ChainState:
        keys = jax.random.split(key, state.tokens.shape[0])
        out = jax.vmap(propose_one, in_axes=(0, 0, 0, 0, 0, 0, None))(
            keys, state.tokens, state.logp, state.logq, state.mask, start, end)
        return ChainState(*out)

    return propose
