"""CISPO, clipped importance-sampling-weight policy optimisation (MiniMax-M1, arXiv 2506.13585, Eq. 4-5).

Where PPO clips the ratio inside a min() and so drops the gradient of every token whose ratio left the
trust region, CISPO clips the importance-sampling weight itself, detaches it, and keeps the REINFORCE
gradient of every token:

    r_t   = pi(y_t | ...) / pi_old(y_t | ...)
    w_t   = sg( clip(r_t, min_weight, max_weight) )                    (MiniMax-M1: no lower bound)
    L     = agg_t( -w_t A_t log pi(y_t | ...) ) + kl_coef * agg_t( k(logp, ref_logp) )

so the gradient coefficient of log pi(y_t) is -w_t A_t for every token, never 0. With the default token
mean, agg is MiniMax-M1's 1 / sum_i |o_i| over the batch's tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pf_jax.losses.aggregation import Aggregation, aggregate_loss, as_token_array, masked_mean, zero_padding
from pf_jax.losses.kl import KLEstimator, kl_per_token
from pf_jax.losses.policy_gradient import LOG_RATIO_CLAMP

Array = jax.Array
sg = jax.lax.stop_gradient


def cispo_loss(
    logp: Array,  # [B, T] log pi_theta(y_t | ...)
    old_logp: Array,  # [B, T] behaviour policy, detached
    advantages: Array,  # [B] or [B, T], detached
    mask: Array,  # [B, T]
    max_weight: float = 5.0,
    min_weight: float | None = None,
    aggregation: Aggregation = "token_mean",
    norm_constant: float | None = None,
    ref_logp: Array | None = None,  # [B, T], detached; needed when kl_coef > 0
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> tuple[Array, dict[str, Array]]:
    """The CISPO surrogate (see the module doc); metrics: the weight's mean and the clipped fraction."""
    if min_weight is not None and not 0.0 <= min_weight < max_weight:
        raise ValueError(f"cispo_loss needs 0 <= min_weight < max_weight, got {min_weight}, {max_weight}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("cispo_loss: kl_coef != 0 needs ref_logp [B, T]")
    logp, old_logp = zero_padding(logp, mask), zero_padding(old_logp, mask)
    adv = sg(zero_padding(as_token_array(advantages, mask), mask))
    ratio = jnp.exp(jnp.clip(sg(logp - old_logp), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    weight = sg(jnp.clip(ratio, min_weight, max_weight))
    loss = aggregate_loss(-weight * adv * logp, mask, aggregation, norm_constant)
    m = mask.astype(bool)
    metrics = {"pg_loss": sg(loss), "is_weight_mean": masked_mean(weight, m),
               "is_weight_clip_fraction": masked_mean((weight != ratio).astype(jnp.float32), m)}
    if ref_logp is not None:
        kl = kl_per_token(logp, zero_padding(ref_logp, mask), kl_estimator)
        metrics["kl"] = sg(masked_mean(kl, m))
        loss = loss + kl_coef * aggregate_loss(kl, mask, aggregation, norm_constant)
    return loss, metrics
