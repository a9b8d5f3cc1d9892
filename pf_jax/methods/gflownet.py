"""The GFlowNet objective (PowerFlow, TB, length-aware TB, TB-token): fine-tune the policy toward
p_base^alpha. The target is the frozen base model's log-probs (the reference copy), no reward is used.

    samples + base log-probs ──► log R = alpha [log p_base(y) + |y| psi(y)] (power_log_reward), psi the
    format penalty ──► GFlowNetBatch ──► trajectory-balance residuals against log Z'(q): the learned head
    (method.log_z=head, started at the first batch's least-squares value) or the prompt's own estimate
    (method.log_z=group)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.losses import power_log_reward, sequence_sum
from pf_jax.methods.batches import BatchShape, GFlowNetBatch, abstract_sequences, f32
from pf_jax.methods.protocols import Completions, Metrics, Needs, ObjectiveDefaults
from pf_jax.methods.scoring import policy_terms
from pf_jax.models.heads import LogPartitionHead

TBArguments = Callable[[GFlowNetBatch, jax.Array, jax.Array], dict[str, jax.Array]]
"""(batch, policy log-probs [B, R], log Z' [B]) -> the keyword arguments of the method's TB loss."""


def trajectory_arguments(partition: str) -> TBArguments:
    """TB-family losses: loss(logp, mask, log_reward, <partition>) with <partition> log_z or log_z_prime."""
    return lambda b, logp, log_z: {"logp": logp, "mask": b.seq.response_mask, "log_reward": b.log_reward,
                                   partition: log_z}


def powerflow_arguments(b: GFlowNetBatch, logp: jax.Array, log_z: jax.Array) -> dict[str, jax.Array]:
    """PowerFlow's loss reads the base model and the behaviour policy (its importance weight) itself."""
    return {"logp": logp, "old_logp": b.old_logp, "base_logp": b.base_logp, "mask": b.seq.response_mask,
            "log_z_prime": log_z, "format_penalty": b.format_penalty, "behaviour_weight": b.behaviour_weight}


def group_log_partition(
    log_reward: jax.Array, old_logp: jax.Array, mask: jax.Array, group_ids: np.ndarray, num_groups: int,
    *, per_token: bool,
) -> jax.Array:
    """Per-sample log Z estimate from the prompt's own samples (detached), [N]:

        per_token (length-aware TB):  log Z'_g = mean_{i in g} (log R_i - log pi_old(y_i)) / |y_i|
        otherwise (TB):               log Z_g  = mean_{i in g} (log R_i - log pi_old(y_i))

    the value minimising the group's squared residuals at pi = pi_old (VarGrad, Richter et al. 2020).
    """
    n = jnp.maximum(mask.sum(axis=1), 1)
    gap = log_reward - jnp.sum(jnp.where(mask, old_logp, 0.0), axis=1)
    gap = gap / n if per_token else gap
    g = jnp.asarray(group_ids, jnp.int32)
    total = jax.ops.segment_sum(gap, g, num_segments=num_groups)
    count = jax.ops.segment_sum(jnp.ones_like(gap), g, num_segments=num_groups)
    return jax.lax.stop_gradient((total / jnp.maximum(count, 1))[g])


@dataclass(frozen=True)
class GFlowNet(ObjectiveDefaults):
    """alpha: the target exponent (method.alpha); per_token: the residual is per token (length-aware TB,
    PowerFlow), which decides how log Z' is estimated from a group; learned_partition: the log Z'(q)
    head (method.log_z=head) rather than the group estimate; format_penalty: psi for a response without
    the task's answer format (reward.format_penalty; 0 = none)."""

    loss_fn: Callable[..., Any]
    arguments: TBArguments
    alpha: float
    per_token: bool
    learned_partition: bool
    head_width: int
    format_penalty: float
    chunk_size: int
    needs: ClassVar[Needs] = Needs(reference_logp=True)

    def heads(self, hidden_size: int, seed: int) -> dict[str, nnx.Module]:
        if not self.learned_partition:
            return {}
        return {"log_z": LogPartitionHead(hidden_size, self.head_width, rngs=nnx.Rngs(seed + 1))}

    def batch(self, r: Completions) -> tuple[GFlowNetBatch, Metrics]:
        mask = r.seq.response_mask
        psi = np.zeros(len(r.group_ids), np.float32)
        if self.format_penalty and r.has_answer is not None:
            psi = np.where(r.has_answer, 0.0, self.format_penalty).astype(np.float32)
        base_sum = sequence_sum(r.ref_logp, mask)
        log_reward = power_log_reward(r.ref_logp, mask, self.alpha, jnp.asarray(psi))
        metrics = {"base_logp_per_token": float(jnp.sum(base_sum) / jnp.maximum(mask.sum(), 1))}
        old_logp = r.behaviour_logp if r.proximal_logp is None else r.proximal_logp  # async: before the update
        log_z_prime = None
        if not self.learned_partition:
            log_z_prime = group_log_partition(log_reward, old_logp, mask, r.group_ids, len(r.rows),
                                              per_token=self.per_token)
        return GFlowNetBatch(r.seq, old_logp, r.ref_logp, log_reward, jnp.asarray(psi), log_z_prime,
                             r.importance_weight), metrics

    def abstract_batch(self, s: BatchShape) -> GFlowNetBatch:
        B, R = s.rows, s.response_len
        return GFlowNetBatch(abstract_sequences(B, s.prompt_len, R), f32(B, R), f32(B, R), f32(B), f32(B),
                             None if self.learned_partition else f32(B))

    def loss(self, modules: Mapping[str, nnx.Module], b: GFlowNetBatch):
        logp, _, hidden, metrics = policy_terms(modules["policy"], b.seq, self.chunk_size)
        P = b.seq.prompt_tokens.shape[1]
        log_z = modules["log_z"](hidden[:, :P], b.seq.prompt_mask) if "log_z" in modules else b.log_z_prime
        value, m = self.loss_fn(**self.arguments(b, logp, log_z))
        return value, {**metrics, **m}

    def initialize(self, params: Mapping[str, nnx.State], graphdefs: Mapping[str, nnx.GraphDef],
                   b: GFlowNetBatch, num_prompts: int, mean: Callable[[float], float]) -> tuple[dict, Metrics]:
        """Start the log Z'(q) head at the least-squares value of the first batch (its output bias; the last
        layer's weights start at zero), so the policy's first updates are not spent on an offset that the
        head would otherwise take hundreds of steps to learn (e.g. -11 nats/token for Gemma). `mean`
        averages over processes (each saw its own prompts)."""
        if "log_z" not in params:
            return dict(params), {}
        seq = b.seq
        groups = np.repeat(np.arange(num_prompts), seq.prompt_tokens.shape[0] // num_prompts)
        estimate = group_log_partition(b.log_reward, b.old_logp, seq.response_mask, groups, num_prompts,
                                       per_token=self.per_token)
        value = mean(float(jnp.mean(estimate)))
        head = nnx.merge(graphdefs["log_z"], params["log_z"])
        head.out.bias[...] = jnp.full_like(head.out.bias[...], value)
        return {**params, "log_z": nnx.state(head, nnx.Param)}, {"log_z_init": value}
