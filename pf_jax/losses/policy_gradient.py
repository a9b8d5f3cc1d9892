"""Policy-gradient surrogates: PPO clip (asymmetric and dual clip) with an optional KL loss term, the
clipped value loss, GSPO (sequence-level ratio and its token variant), and the entropy bonus.

GRPO, Dr.GRPO, DAPO, RLOO and REINFORCE++ are all ``ppo_clip_loss`` with their own advantages,
clip ranges, KL term and aggregation: see pf_jax.methods.registry. Old/reference log-probs and advantages
are detached inside every function, so callers cannot leak gradients into them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pf_jax.losses.aggregation import Aggregation, aggregate_loss, as_token_array, masked_mean, zero_padding
from pf_jax.losses.kl import KLEstimator, kl_per_token

Array = jax.Array
sg = jax.lax.stop_gradient
# verl clamps log(pi/pi_old) to +-20 before exp so a stale token cannot overflow the ratio.
LOG_RATIO_CLAMP = 20.0


def _ratio_metrics(log_ratio: Array, mask: Array) -> dict[str, Array]:
    log_ratio = sg(log_ratio)
    ratio = jnp.exp(log_ratio)
    m = mask.astype(bool)
    return {
        "ratio_mean": masked_mean(ratio, m),
        "ratio_max": jnp.max(jnp.where(m, ratio, -jnp.inf)),
        "ratio_min": jnp.min(jnp.where(m, ratio, jnp.inf)),
        # k3 estimate of KL(pi_old || pi) on the behaviour samples.
        "approx_kl": masked_mean(jnp.exp(-log_ratio) - 1.0 + log_ratio, m),
    }


def ppo_clip_loss(
    logp: Array,  # [B, T] log pi_theta(y_t | ...)
    old_logp: Array,  # [B, T] log pi_old (behaviour policy), detached
    advantages: Array,  # [B] or [B, T], detached
    mask: Array,  # [B, T]
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: Aggregation = "token_mean",
    norm_constant: float | None = None,
    ref_logp: Array | None = None,  # [B, T], detached; needed when kl_coef > 0
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> tuple[Array, dict[str, Array]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347) with the RL-for-LLM extensions:

        rho = exp(logp - old_logp)
        l   = max( -A rho, -A clip(rho, 1 - clip_low, 1 + clip_high) )            (clip_high: DAPO clip-higher)
        l   = min( l, -A c )  where A < 0, if dual_clip = c is set                 (dual-clip PPO, Ye et al. 2020)
        L   = agg(l) + kl_coef * agg( k(logp, ref_logp) )                         (GRPO's KL loss term)

    Gradient coefficient w.r.t. logp_t: -A rho where unclipped, 0 where a clip is active, plus
    kl_coef (1 - pi_ref/pi) for k3; times the aggregation weight.
    """
    clip_high = clip_low if clip_high is None else clip_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (verl default 3.0), got {dual_clip}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("ppo_clip_loss: kl_coef != 0 needs ref_logp [B, T]")
    logp, old_logp = zero_padding(logp, mask), zero_padding(old_logp, mask)
    adv = sg(zero_padding(as_token_array(advantages, mask), mask))
    log_ratio = jnp.clip(logp - sg(old_logp), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)
    m = mask.astype(bool)
    metrics = _ratio_metrics(log_ratio, m)
    metrics["clip_fraction"] = masked_mean((clipped > unclipped).astype(jnp.float32), m)
    if dual_clip is not None:
        dual = -adv * dual_clip
        dual_active = (adv < 0) & (dual < per_token)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, dual), per_token)
        metrics["dual_clip_fraction"] = masked_mean(dual_active.astype(jnp.float32), m)
    loss = aggregate_loss(per_token, mask, aggregation, norm_constant)
    metrics["pg_loss"] = sg(loss)
    if ref_logp is not None:
        kl = kl_per_token(logp, zero_padding(ref_logp, mask), kl_estimator)
        kl_term = aggregate_loss(kl, mask, aggregation, norm_constant)
        metrics["kl"] = sg(masked_mean(kl, m))
        loss = loss + kl_coef * kl_term
    return loss, metrics


def clipped_value_loss(
    values: Array,  # [B, T] current value predictions
    old_values: Array,  # [B, T] values at rollout time, detached
    returns: Array,  # [B, T] value targets, detached
    mask: Array,  # [B, T]
    clip_range: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
    norm_constant: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """PPO clipped value loss (as in TRL / verl):

    V_clip = old_V + clip(V - old_V, -clip_range, clip_range)
    L_V    = 0.5 agg( max( (V - R)^2, (V_clip - R)^2 ) )       (clip_range=None: 0.5 agg((V - R)^2))
    """
    values = zero_padding(values, mask)
    returns = sg(zero_padding(returns, mask))
    old_values = sg(zero_padding(old_values, mask))
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token = unclipped
        clip_frac = jnp.zeros(())
    else:
        v_clip = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
        clipped = (v_clip - returns) ** 2
        per_token = jnp.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).astype(jnp.float32), mask)
    loss = 0.5 * aggregate_loss(per_token, mask, aggregation, norm_constant)
    return loss, {
        "vf_loss": sg(loss),
        "vf_clip_fraction": clip_frac,
        "value_mean": masked_mean(sg(values), mask),
    }


def gspo_loss(
    logp: Array,  # [B, T]
    old_logp: Array,  # [B, T], detached
    advantages: Array,  # [B] (sequence variant) or [B] / [B, T] (token variant)
    mask: Array,  # [B, T]
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    token_level: bool = False,
    aggregation: Aggregation = "seq_mean_token_mean",
    norm_constant: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Group Sequence Policy Optimisation (Zheng et al. 2025, arXiv 2507.18071):

        s_i = (pi(y_i) / pi_old(y_i))^{1/|y_i|} = exp( (1/|y_i|) sum_t (logp - old_logp) )
        L   = -(1/G) sum_i min( s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i )

    GSPO-token (token_level=True): s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], so each token may carry its
    own advantage A_{i,t}; with A_{i,t} = A_i its value and gradient equal GSPO's.
    """
    if not token_level and advantages.ndim != 1:
        raise ValueError(f"gspo_loss (sequence level) needs advantages of shape [B], got {advantages.shape}")
    m = mask.astype(bool)
    logp, old_logp = zero_padding(logp, mask), zero_padding(old_logp, mask)
    adv = sg(zero_padding(as_token_array(advantages, mask), mask))
    lengths = jnp.maximum(jnp.sum(m, axis=-1), 1)
    token_log_ratio = jnp.where(m, logp - sg(old_logp), 0.0)
    seq_log_ratio = jnp.clip(jnp.sum(token_log_ratio, axis=-1) / lengths, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if token_level:
        log_s = sg(seq_log_ratio)[:, None] + logp - sg(logp)
    else:
        log_s = jnp.broadcast_to(seq_log_ratio[:, None], mask.shape)
    s = jnp.exp(log_s)
    unclipped = -adv * s
    clipped = -adv * jnp.clip(s, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)
    loss = aggregate_loss(per_token, mask, aggregation, norm_constant)
    seq_ratio = jnp.exp(sg(seq_log_ratio))
    valid_rows = jnp.sum(m, axis=-1) > 0
    metrics = {
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), m),
        "seq_ratio_mean": masked_mean(seq_ratio, valid_rows),
        "seq_ratio_max": jnp.max(jnp.where(valid_rows, seq_ratio, -jnp.inf)),
        "seq_ratio_min": jnp.min(jnp.where(valid_rows, seq_ratio, jnp.inf)),
        "pg_loss": sg(loss),
    }
    return loss, metrics


def entropy_bonus_loss(
    entropy: Array,  # [B, T] per-token entropy H(pi(.|y_<t)), differentiable
    mask: Array,  # [B, T]
    coef: float = 1e-3,
    aggregation: Aggregation = "token_mean",
    norm_constant: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Entropy bonus as a loss term: L_H = -coef * agg(H_t). Compute H_t with
    pf_jax.losses.internal_rewards.token_entropy_from_logits."""
    entropy = zero_padding(entropy, mask)
    ent = aggregate_loss(entropy, mask, aggregation, norm_constant)
    return -coef * ent, {"entropy": masked_mean(sg(entropy), mask)}
