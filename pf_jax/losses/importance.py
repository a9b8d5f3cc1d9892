"""Truncated importance sampling (TIS) for rollouts sampled by an older policy than the one being updated.

With asynchronous rollouts (rollout.mode=async) a batch is sampled by the behaviour policy mu (the sampler,
max_staleness updates old) but the loss's ratio is taken against pi_before, the policy at the start of this
step's update (the decoupled PPO objective of AReaL, Fu et al. 2025, arXiv 2505.24298; verl's and Tunix's
rollout importance sampling). The gap between the two is corrected by a weight on each term of the loss,
truncated at C so that one unlikely token cannot dominate the batch (Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training"):

    token       w_{i,t} = min( exp(log pi_before(y_t) - log mu(y_t)), C )
    sequence    w_i     = min( exp(sum_t [log pi_before(y_t) - log mu(y_t)]), C )      (PowerFlow's weight)
    geometric   w_i     = min( exp(mean_t [log pi_before(y_t) - log mu(y_t)]), C )     (GSPO's ratio)

The weights are detached: they scale a loss term, they are not differentiated. A policy-gradient term is
linear in its advantage, so weighting the term equals weighting the advantage (weighted_advantages).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pf_jax.losses.aggregation import as_token_array, masked_mean, sequence_lengths

Array = jax.Array
Level = Literal["token", "sequence", "geometric"]
LEVELS: tuple[str, ...] = ("token", "sequence", "geometric")
LOG_RATIO_CLAMP = 20.0


def truncated_importance_weights(
    proximal_logp: Array,  # [B, T] log pi_before (the policy at the start of the update)
    behaviour_logp: Array,  # [B, T] log mu (the sampler that drew the tokens)
    mask: Array,  # [B, T]
    cap: float,
    level: Level = "token",
) -> tuple[Array, dict[str, Array]]:
    """The TIS weights ([B, T] for `token`, [B] otherwise) and their metrics (mean, truncated fraction,
    the largest raw weight), all detached."""
    if level not in LEVELS:
        raise ValueError(f"importance level {level!r}: expected one of {', '.join(LEVELS)}")
    if not cap > 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    m = mask.astype(bool)
    log_ratio = jax.lax.stop_gradient(jnp.where(m, proximal_logp - behaviour_logp, 0.0))
    if level == "sequence":
        log_ratio = jnp.sum(log_ratio, axis=-1)
    elif level == "geometric":
        log_ratio = jnp.sum(log_ratio, axis=-1) / jnp.maximum(sequence_lengths(mask), 1.0)
    raw = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    weights = jnp.minimum(raw, cap)
    valid = m if level == "token" else sequence_lengths(mask) > 0
    metrics = {"tis_weight_mean": masked_mean(weights, valid),
               "tis_truncated_fraction": masked_mean((raw > cap).astype(jnp.float32), valid),
               "tis_raw_max": jnp.max(jnp.where(valid, raw, 0.0))}
    return weights, metrics


def weighted_advantages(advantages: Array, weights: Array, mask: Array) -> Array:
    """Advantages [B] or [B, T] scaled by TIS weights: token weights [B, T] give [B, T]; sequence weights
    [B] keep the advantages' shape."""
    if weights.ndim == 2:
        return as_token_array(advantages, mask) * weights
    return advantages * (weights if advantages.ndim == 1 else weights[:, None])
