"""Pure loss functions over per-token arrays: no model, no optimizer, no I/O.

Every loss takes per-token log-probs [B, T] (policy, and as needed behaviour / reference / base model),
a mask [B, T], rewards or advantages, group ids and learned log Z values, and returns (loss, metrics).
Each method of pf_jax.methods names one of them with its default arguments (``make_loss_fn("grpo")``
there binds them).
"""

from pf_jax.losses.advantages import (
    discounted_returns,
    dynamic_sampling_keep,
    gae_advantages,
    group_mean_std,
    grpo_outcome_advantages,
    grpo_process_advantages,
    masked_whiten,
    overlong_penalty,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from pf_jax.losses.aggregation import (
    AGGREGATIONS,
    aggregate_loss,
    masked_mean,
    masked_sum,
    sequence_lengths,
    sequence_mean,
    sequence_sum,
)
from pf_jax.losses.cispo import cispo_loss
from pf_jax.losses.classification import binary_cross_entropy_loss
from pf_jax.losses.gflownet import (
    length_aware_tb_loss,
    power_log_reward,
    powerflow_loss,
    tb_token_loss,
    trajectory_balance_loss,
)
from pf_jax.losses.importance import truncated_importance_weights, weighted_advantages
from pf_jax.losses.internal_rewards import (
    majority_vote_rewards,
    negative_entropy_reward,
    self_certainty_from_logits,
    self_certainty_reward,
    token_entropy_from_logits,
)
from pf_jax.losses.kl import KL_ESTIMATORS, kl_loss, kl_per_token, kl_shaped_token_rewards
from pf_jax.losses.policy_gradient import clipped_value_loss, entropy_bonus_loss, gspo_loss, ppo_clip_loss
from pf_jax.losses.preference import (
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from pf_jax.losses.supervised import nll_loss

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "aggregate_loss",
    "binary_cross_entropy_loss",
    "cispo_loss",
    "clipped_value_loss",
    "discounted_returns",
    "dpo_loss",
    "dynamic_sampling_keep",
    "entropy_bonus_loss",
    "gae_advantages",
    "group_mean_std",
    "grpo_outcome_advantages",
    "grpo_process_advantages",
    "gspo_loss",
    "ipo_loss",
    "kl_loss",
    "kl_per_token",
    "kl_shaped_token_rewards",
    "kto_loss",
    "kto_reference_point",
    "length_aware_tb_loss",
    "majority_vote_rewards",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "negative_entropy_reward",
    "nll_loss",
    "orpo_loss",
    "overlong_penalty",
    "power_log_reward",
    "powerflow_loss",
    "ppo_clip_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "robust_dpo_loss",
    "self_certainty_from_logits",
    "self_certainty_reward",
    "sequence_lengths",
    "sequence_mean",
    "sequence_sum",
    "simpo_loss",
    "tb_token_loss",
    "token_entropy_from_logits",
    "trajectory_balance_loss",
    "truncated_importance_weights",
    "weighted_advantages",
]
