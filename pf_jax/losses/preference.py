"""Offline preference losses: DPO (sigmoid), conservative DPO, robust DPO, IPO, SimPO, ORPO, KTO.

Inputs are per-token log-probs [B, T] with masks, so sequence sums and length-normalised means come from
the same arrays (and padding never matters). Chosen and rejected may have different T. Reference
log-probs are detached. With sums  lp(y) = sum_t log pi(y_t)  and the DPO "implicit reward margin"

    h = (lp_pi(y_w) - lp_ref(y_w)) - (lp_pi(y_l) - lp_ref(y_l)),

the GC of DPO is +-beta sigma(-beta h) on the chosen / rejected tokens (unified-rl.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pf_jax.losses.aggregation import masked_mean, sequence_mean, sequence_sum

Array = jax.Array
sg = jax.lax.stop_gradient


def _margin(pc: Array, pr: Array, rc: Array, rr: Array, cm: Array, rm: Array) -> tuple[Array, Array]:
    chosen_reward = sequence_sum(pc, cm) - sequence_sum(sg(rc), cm)
    rejected_reward = sequence_sum(pr, rm) - sequence_sum(sg(rr), rm)
    return chosen_reward, rejected_reward


def _pair_metrics(chosen_reward: Array, rejected_reward: Array, beta: float) -> dict[str, Array]:
    c, r = sg(beta * chosen_reward), sg(beta * rejected_reward)
    return {
        "rewards_chosen": jnp.mean(c),
        "rewards_rejected": jnp.mean(r),
        "reward_margin": jnp.mean(c - r),
        "reward_accuracy": jnp.mean((c > r).astype(jnp.float32)),
    }


def _scaled_margin(
    name: str, pc: Array, pr: Array, rc: Array, rr: Array, cm: Array, rm: Array, beta: float, label_smoothing: float
) -> tuple[Array, dict[str, Array]]:
    """(beta h per pair, the pair metrics) of the DPO family with label smoothing eps in [0, 0.5)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{name} label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_reward, rejected_reward = _margin(pc, pr, rc, rr, cm, rm)
    return beta * (chosen_reward - rejected_reward), _pair_metrics(chosen_reward, rejected_reward, beta)


def dpo_loss(
    policy_chosen_logp: Array,  # [B, Tc]
    policy_rejected_logp: Array,  # [B, Tr]
    ref_chosen_logp: Array,  # [B, Tc]
    ref_rejected_logp: Array,  # [B, Tr]
    chosen_mask: Array,  # [B, Tc]
    rejected_mask: Array,  # [B, Tr]
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290); label_smoothing eps > 0 gives conservative DPO (cDPO,
    Mitchell 2023), which assumes labels flip with probability eps:

        L = mean_i [ -(1 - eps) log sigma(beta h_i) - eps log sigma(-beta h_i) ]

    At pi = pi_ref (h = 0) and eps = 0 the loss is log 2.
    """
    z, metrics = _scaled_margin("dpo_loss", policy_chosen_logp, policy_rejected_logp, ref_chosen_logp,
                                ref_rejected_logp, chosen_mask, rejected_mask, beta, label_smoothing)
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    return jnp.mean(losses), metrics


def robust_dpo_loss(
    policy_chosen_logp: Array,
    policy_rejected_logp: Array,
    ref_chosen_logp: Array,
    ref_rejected_logp: Array,
    chosen_mask: Array,
    rejected_mask: Array,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), unbiased under label-flip rate eps:

    L = mean_i [ -(1 - eps) log sigma(beta h_i) + eps log sigma(-beta h_i) ] / (1 - 2 eps)
    """
    z, metrics = _scaled_margin("robust_dpo_loss", policy_chosen_logp, policy_rejected_logp, ref_chosen_logp,
                                ref_rejected_logp, chosen_mask, rejected_mask, beta, label_smoothing)
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)) / (
        1.0 - 2.0 * label_smoothing
    )
    return jnp.mean(losses), metrics


def ipo_loss(
    policy_chosen_logp: Array,
    policy_rejected_logp: Array,
    ref_chosen_logp: Array,
    ref_rejected_logp: Array,
    chosen_mask: Array,
    rejected_mask: Array,
    tau: float = 0.1,
    length_normalize: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """IPO (Azar et al. 2023, arXiv 2310.12036):  L = mean_i ( h_i - 1/(2 tau) )^2.

    length_normalize=True uses per-token mean log-probs in h (as TRL's loss_type="ipo" does).
    """
    if length_normalize:
        cr = sequence_mean(policy_chosen_logp, chosen_mask) - sequence_mean(sg(ref_chosen_logp), chosen_mask)
        rr = sequence_mean(policy_rejected_logp, rejected_mask) - sequence_mean(
            sg(ref_rejected_logp), rejected_mask
        )
    else:
        cr, rr = _margin(
            policy_chosen_logp,
            policy_rejected_logp,
            ref_chosen_logp,
            ref_rejected_logp,
            chosen_mask,
            rejected_mask,
        )
    losses = (cr - rr - 1.0 / (2.0 * tau)) ** 2
    return jnp.mean(losses), _pair_metrics(cr, rr, tau)


def simpo_loss(
    policy_chosen_logp: Array,  # [B, Tc]
    policy_rejected_logp: Array,  # [B, Tr]
    chosen_mask: Array,
    rejected_mask: Array,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[Array, dict[str, Array]]:
    """SimPO (Meng et al. 2024, arXiv 2405.14734), reference-free, length-normalised, margin gamma:

    L = mean_i -log sigma( beta/|y_w| lp(y_w) - beta/|y_l| lp(y_l) - gamma )
    """
    c = sequence_mean(policy_chosen_logp, chosen_mask)
    r = sequence_mean(policy_rejected_logp, rejected_mask)
    losses = -jax.nn.log_sigmoid(beta * (c - r) - gamma)
    return jnp.mean(losses), _pair_metrics(c, r, beta)


def orpo_loss(
    policy_chosen_logp: Array,  # [B, Tc]
    policy_rejected_logp: Array,  # [B, Tr]
    chosen_mask: Array,
    rejected_mask: Array,
    lam: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """ORPO (Hong et al. 2024, arXiv 2403.07691), reference-free. With P(y) = exp(mean_t log pi(y_t)) and
    odds(y) = P / (1 - P):

        L = NLL(y_w) - lam * mean_i log sigma( log odds(y_w) - log odds(y_l) ),
        NLL(y_w) = -(token mean over the batch of chosen log-probs)
    """
    c = sequence_mean(policy_chosen_logp, chosen_mask)
    r = sequence_mean(policy_rejected_logp, rejected_mask)
    # log(1 - e^x) = log(-expm1(x)); x < 0 strictly, or the odds are infinite.
    c_safe, r_safe = jnp.minimum(c, -1e-7), jnp.minimum(r, -1e-7)
    log_odds = (c - r) - (jnp.log(-jnp.expm1(c_safe)) - jnp.log(-jnp.expm1(r_safe)))
    ratio_term = jax.nn.log_sigmoid(log_odds)
    nll = -masked_mean(policy_chosen_logp, chosen_mask)
    loss = nll - lam * jnp.mean(ratio_term)
    metrics = _pair_metrics(c, r, 1.0)
    metrics.update({"nll": sg(nll), "log_odds_ratio": jnp.mean(sg(log_odds))})
    return loss, metrics


def kto_reference_point(
    policy_logp: Array,  # [B, T] on mismatched (prompt, completion) pairs
    ref_logp: Array,  # [B, T]
    mask: Array,
) -> Array:
    """KTO reference point z0 = max(0, mean_i [lp_pi(y_i) - lp_ref(y_i)]), detached (estimated in TRL
    from mismatched prompt/completion pairs of the batch)."""
    return sg(jnp.maximum(jnp.mean(sequence_sum(policy_logp, mask) - sequence_sum(ref_logp, mask)), 0.0))


def kto_loss(
    policy_logp: Array,  # [B, T]
    ref_logp: Array,  # [B, T]
    mask: Array,  # [B, T]
    desirable: Array,  # [B] bool
    reference_point: Array | float,  # z0, detached
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306), unpaired, prospect-theory value. r = lp_pi - lp_ref:

    desirable:    lambda_D (1 - sigma(beta (r - z0)))
    undesirable:  lambda_U (1 - sigma(beta (z0 - r)))
    L = mean over the batch
    """
    r = sequence_sum(policy_logp, mask) - sequence_sum(sg(ref_logp), mask)
    z0 = sg(jnp.asarray(reference_point, r.dtype))
    d = desirable.astype(bool)
    losses = jnp.where(
        d,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z0))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - r))),
    )
    rs = sg(beta * r)
    metrics = {
        "rewards_desirable": jnp.sum(jnp.where(d, rs, 0.0)) / jnp.maximum(jnp.sum(d), 1),
        "rewards_undesirable": jnp.sum(jnp.where(d, 0.0, rs)) / jnp.maximum(jnp.sum(~d), 1),
        "kl_reference_point": z0,
    }
    return jnp.mean(losses), metrics
