"""GFlowNet trajectory-balance losses for autoregressive policies, and the PowerFlow objective.

For a token tree the backward policy is 1, so trajectory balance (Malkin et al. 2022, arXiv 2201.13259)
applies to whole responses. PowerFlow (Chen, Chen, Li, Huang, arXiv 2603.18363, ICML 2026) targets
p_alpha(y|q) ∝ p_base(y|q)^alpha with the length-aware variant below. log Z is either a scalar or a
per-prompt value [B] (e.g. from a small MLP on the prompt's hidden states, trained jointly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pf_jax.losses.aggregation import sequence_lengths, sequence_sum

Array = jax.Array
sg = jax.lax.stop_gradient


def _residual_metrics(residual: Array, log_z: Array, valid: Array) -> dict[str, Array]:
    r = sg(residual)
    n = jnp.maximum(jnp.sum(valid), 1)
    mean = jnp.sum(jnp.where(valid, r, 0.0)) / n
    return {
        "log_z_mean": jnp.mean(sg(log_z)),
        "residual_mean": mean,
        "residual_std": jnp.sqrt(jnp.sum(jnp.where(valid, (r - mean) ** 2, 0.0)) / n),
        "residual_abs_max": jnp.max(jnp.where(valid, jnp.abs(r), 0.0)),
    }


def _mean_over_valid(x: Array, valid: Array) -> Array:
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def trajectory_balance_loss(
    logp: Array,  # [B, T] log pi(y_t | q, y_<t)
    mask: Array,  # [B, T]
    log_reward: Array,  # [B] log R(q, y), detached
    log_z: Array,  # [] or [B], learned
) -> tuple[Array, dict[str, Array]]:
    """Trajectory balance (Malkin et al. 2022):

        L_TB = mean_i ( log Z(q_i) + sum_t log pi(y_{i,t}) - log R(q_i, y_i) )^2

    At the optimum pi(y|q) = R(q,y) / Z(q) exactly and log Z is the log partition. TB-traj (PowerFlow's
    ablation) is this loss with log R = alpha * (log p_base(y|q) + psi(y)).
    """
    log_z = jnp.broadcast_to(log_z, log_reward.shape)
    residual = log_z + sequence_sum(logp, mask) - sg(log_reward)
    valid = sequence_lengths(mask) > 0
    loss = _mean_over_valid(residual**2, valid)
    return loss, _residual_metrics(residual, log_z, valid)


def length_aware_tb_loss(
    logp: Array,  # [B, T]
    mask: Array,  # [B, T]
    log_reward: Array,  # [B] log R(q, y), detached
    log_z_prime: Array,  # [] or [B], learned
) -> tuple[Array, dict[str, Array]]:
    """Length-aware TB (PowerFlow): Z(q, y) = Z'(q)^{|y|}, residual divided by |y|:

        L_LA-TB = mean_i ( log Z'(q_i) + (1/|y_i|) log pi(y_i|q_i) - (1/|y_i|) log R(q_i, y_i) )^2

    Fixed point: pi*(y|q) = R(q,y) exp(-lambda_q |y|) with lambda_q = log Z'(q) chosen so pi* sums to 1.
    """
    log_z_prime = jnp.broadcast_to(log_z_prime, log_reward.shape)
    lengths = sequence_lengths(mask)
    residual = log_z_prime + (sequence_sum(logp, mask) - sg(log_reward)) / jnp.maximum(lengths, 1.0)
    valid = lengths > 0
    loss = _mean_over_valid(residual**2, valid)
    return loss, _residual_metrics(residual, log_z_prime, valid)


def tb_token_loss(
    logp: Array,  # [B, T]
    mask: Array,  # [B, T]
    log_reward: Array,  # [B], detached
    log_z: Array,  # [] or [B]
) -> tuple[Array, dict[str, Array]]:
    """TB-token ablation of PowerFlow: per-token averaging of the TB residual *without* Z = Z'^{|y|}:

        L = mean_i ( (log Z(q_i) + log pi(y_i|q_i) - log R(q_i, y_i)) / |y_i| )^2

    (Our reading of the paper's "-token" ablation; the partition term is divided by |y| too, so it no
    longer absorbs a per-token length cost.)
    """
    log_z = jnp.broadcast_to(log_z, log_reward.shape)
    lengths = sequence_lengths(mask)
    residual = (log_z + sequence_sum(logp, mask) - sg(log_reward)) / jnp.maximum(lengths, 1.0)
    valid = lengths > 0
    loss = _mean_over_valid(residual**2, valid)
    return loss, _residual_metrics(residual, log_z, valid)


def power_log_reward(
    base_logp: Array,  # [B, T] frozen base model
    mask: Array,  # [B, T]
    alpha: float,
    format_penalty: Array | None = None,  # [B] psi(y)
    *,
    per_token: bool = False,
) -> Array:
    """PowerFlow's target, the alpha-power of the base model with a per-token format penalty psi:

        log R(q, y) = alpha [ log p_base(y|q) + |y| psi(y) ]                  [B]
        per_token:    alpha [ (1/|y|) log p_base(y|q) + psi(y) ]             (length-aware TB's target)

    detached; |y| is at least 1 (an empty response has target alpha psi or 0).
    """
    lengths = sequence_lengths(mask)
    psi = jnp.zeros_like(lengths) if format_penalty is None else sg(format_penalty).astype(lengths.dtype)
    base = sequence_sum(sg(base_logp), mask)
    if per_token:
        return alpha * (base / jnp.maximum(lengths, 1.0) + psi)
    return alpha * (base + psi * jnp.maximum(lengths, 1.0))


def powerflow_loss(
    logp: Array,  # [B, T] current policy
    old_logp: Array,  # [B, T] rollout policy, detached
    base_logp: Array,  # [B, T] frozen base model, detached
    mask: Array,  # [B, T]
    log_z_prime: Array,  # [] or [B], learned
    *,
    alpha: float,  # the recipe's method.alpha
    format_penalty: Array | None = None,  # [B] psi(y), e.g. -0.5 when the answer format is missing
    clip_eps: float = 0.2,
    behaviour_weight: Array | None = None,  # [B] TIS weight when pi_old is not the sampler (async rollouts)
) -> tuple[Array, dict[str, Array]]:
    """PowerFlow loss (paper Eq. 10):

        w    = sg[ clip( exp( sum_t log pi - sum_t log pi_old ), 1 - eps, 1 + eps ) ]
        r_i  = log Z'(q) + (1/|y|) sum_t log pi(y_t) - alpha [ (1/|y|) sum_t log p_base(y_t) + psi(y) ]
        L_PF = mean_i w_i r_i^2

    With pi_old = pi and psi = 0 this is length-aware TB with log R = alpha log p_base. With
    asynchronous rollouts pi_old is the policy before the update and w is multiplied by
    behaviour_weight = min(pi_old(y) / mu(y), C) to the sampler mu (pf_jax.losses.importance).
    """
    lengths = sequence_lengths(mask)
    safe_len = jnp.maximum(lengths, 1.0)
    valid = lengths > 0
    seq_logp = sequence_sum(logp, mask)
    seq_log_ratio = sg(seq_logp - sequence_sum(old_logp, mask))
    raw_w = jnp.exp(jnp.clip(seq_log_ratio, -20.0, 20.0))
    clipped_w = jnp.clip(raw_w, 1.0 - clip_eps, 1.0 + clip_eps)
    w = clipped_w if behaviour_weight is None else clipped_w * sg(behaviour_weight)
    target = power_log_reward(base_logp, mask, alpha, format_penalty, per_token=True)
    log_z_prime = jnp.broadcast_to(log_z_prime, lengths.shape)
    residual = log_z_prime + seq_logp / safe_len - target
    loss = _mean_over_valid(w * residual**2, valid)
    metrics = _residual_metrics(residual, log_z_prime, valid)
    metrics["weight_clip_fraction"] = _mean_over_valid((raw_w != clipped_w).astype(jnp.float32), valid)
    metrics["weight_mean"] = _mean_over_valid(w, valid)
    metrics["response_length_mean"] = _mean_over_valid(lengths, valid)
    return loss, metrics
