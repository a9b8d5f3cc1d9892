"""The policy-gradient objective (PPO, GRPO and its variants, RLOO, REINFORCE++, CISPO): an advantage
estimator over scored samples, then a clipped-ratio loss of pf_jax.losses over the policy's log-probs.

    rewards (+ DAPO's overlong penalty) ──► token rewards (GAE / REINFORCE++: the outcome at the last
    token, or KL-shaped) ──► advantages (group-normalised, leave-one-out, whitened returns, GAE, process)
    ──► PolicyGradientBatch ──► loss(logp, old_logp, advantages, mask[, ref_logp]) + entropy / value terms
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.config.recipe import MethodSection
from pf_jax.data.sequences import SequenceBatch
from pf_jax.losses import (
    clipped_value_loss,
    dynamic_sampling_keep,
    entropy_bonus_loss,
    kl_shaped_token_rewards,
    overlong_penalty,
    weighted_advantages,
)
from pf_jax.methods.batches import BatchShape, PolicyGradientBatch, abstract_sequences, f32
from pf_jax.methods.bound import Bound
from pf_jax.methods.protocols import Completions, Metrics, Needs, ObjectiveDefaults
from pf_jax.methods.scoring import policy_terms
from pf_jax.models.heads import ValueHead


@dataclass(frozen=True)
class Signals:
    """What an advantage estimator may read: outcome rewards [N] of groups of samples, the response
    mask [N, R], token rewards [N, R], values [N, R] and a task's step rewards."""

    rewards: jax.Array
    group_ids: jax.Array
    num_groups: int
    mask: jax.Array
    token_rewards: jax.Array | None = None
    values: jax.Array | None = None
    steps: Mapping[str, jax.Array] = field(default_factory=dict)


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator of pf_jax.losses.advantages with its defaults, and the arrays it takes.

    token_rewards: it reads per-token rewards (the outcome at the last token, or KL-shaped with
    method.reward_kl_coef); values: it reads the value head's (GAE); steps: a task's per-step rewards
    (texts, reference answers, R) -> {step_rewards, step_mask, step_end} (process supervision)."""

    fn: Bound
    arguments: Callable[[Signals], dict[str, Any]]
    token_rewards: bool = False
    values: bool = False
    steps: Callable[[Sequence[str], Sequence[str], int], dict[str, jax.Array]] | None = None

    def __call__(self, signals: Signals, overrides: Mapping[str, Any]) -> tuple[jax.Array, jax.Array | None]:
        """(advantages [N] or [N, R], returns [N, R] or None)."""
        out = self.fn.bind(overrides, what="method.advantage")(**self.arguments(signals))
        if isinstance(out, tuple):
            first, second = out
            return first, (second if isinstance(second, jax.Array) else None)
        return out, None


def group_outcome(fn: Callable[..., Any], **defaults: Any) -> Estimator:
    """From the rewards of each prompt's group of samples (GRPO, Dr. GRPO, DAPO, GSPO, RLOO)."""
    return Estimator(Bound(fn, defaults), lambda s: {"rewards": s.rewards, "group_ids": s.group_ids,
                                                     "num_groups": s.num_groups})


def group_outcome_per_token(fn: Callable[..., Any], **defaults: Any) -> Estimator:
    """From the group's rewards, spread over the response tokens (REINFORCE++ with a group baseline)."""
    return Estimator(Bound(fn, defaults), lambda s: {"rewards": s.rewards, "mask": s.mask, "group_ids": s.group_ids,
                                                     "num_groups": s.num_groups})


def token_returns(fn: Callable[..., Any], **defaults: Any) -> Estimator:
    """From token rewards alone (REINFORCE++: whitened discounted returns)."""
    return Estimator(Bound(fn, defaults), lambda s: {"token_rewards": s.token_rewards, "mask": s.mask},
                     token_rewards=True)


def gae(fn: Callable[..., Any], **defaults: Any) -> Estimator:
    """From token rewards and the value head's values (PPO's GAE); also gives the value targets."""
    return Estimator(Bound(fn, defaults), lambda s: {"token_rewards": s.token_rewards, "values": s.values,
                                                     "mask": s.mask}, token_rewards=True, values=True)


def process_steps(fn: Callable[..., Any], steps: Callable[..., dict[str, jax.Array]], **defaults: Any) -> Estimator:
    """From a task's per-step rewards, normalised within the group (GRPO with process supervision)."""
    return Estimator(Bound(fn, defaults), lambda s: {**s.steps, "token_mask": s.mask, "group_ids": s.group_ids,
                                                     "num_groups": s.num_groups}, steps=steps)


@dataclass(frozen=True)
class RatioLoss:
    """loss(logp, old_logp, advantages, mask[, ref_logp]) of the bound pf_jax.losses function, plus the
    entropy bonus (method.entropy_coef) and, with a value head, value_coef x its clipped value loss."""

    loss_fn: Callable[..., Any]
    chunk_size: int
    entropy_coef: float = 0.0
    value_coef: float = 0.0

    def __call__(self, modules: Mapping[str, nnx.Module], b: PolicyGradientBatch):
        seq = b.seq
        logp, ent, hidden, metrics = policy_terms(modules["policy"], seq, self.chunk_size)
        kl = {} if b.ref_logp is None else {"ref_logp": b.ref_logp}
        value, m = self.loss_fn(logp=logp, old_logp=b.old_logp, advantages=b.advantages, mask=seq.response_mask, **kl)
        metrics.update(m)
        if self.entropy_coef:
            bonus, _ = entropy_bonus_loss(ent, seq.response_mask, coef=self.entropy_coef)
            value = value + bonus
        if "value" in modules:
            v_loss, vm = _value_loss(modules["value"], hidden, seq, b)
            value = value + self.value_coef * v_loss
            metrics.update({f"value/{k}": x for k, x in vm.items()}, value_loss=v_loss)
        return value, metrics


def _value_loss(head: nnx.Module, hidden: jax.Array, seq: SequenceBatch, b: PolicyGradientBatch):
    P, R = seq.prompt_tokens.shape[1], seq.response_tokens.shape[1]
    return clipped_value_loss(head(hidden[:, P - 1 : P - 1 + R]), b.old_values, b.returns, seq.response_mask)


@dataclass(frozen=True)
class PolicyGradient(ObjectiveDefaults):
    """Advantages from the recipe's estimator over scored samples, then the clipped-ratio loss."""

    loss: RatioLoss
    estimator: Estimator
    section: MethodSection
    reference: bool  # a KL term to the frozen reference: the batch carries its log-probs

    @property
    def needs(self) -> Needs:
        return Needs(reward=True, reference_logp=self.reference, values=self.estimator.values)

    def heads(self, hidden_size: int, seed: int) -> dict[str, nnx.Module]:
        return {"value": ValueHead(hidden_size, rngs=nnx.Rngs(seed + 2))} if self.estimator.values else {}

    def batch(self, r: Completions) -> tuple[PolicyGradientBatch, Metrics]:
        rewards, mask = self._rewards(r), r.seq.response_mask
        advantages, value_targets = self.estimator(self._signals(r, rewards), self.section.advantage)
        seq, metrics = r.seq, {}
        if self.section.dynamic_sampling:  # DAPO: groups whose samples all score the same carry no signal
            keep = np.asarray(dynamic_sampling_keep(jnp.asarray(rewards), jnp.asarray(r.group_ids), len(r.rows)))
            metrics["kept_fraction"] = float(keep.mean())
            seq = seq.replace(response_mask=mask & jnp.asarray(keep)[:, None])
        metrics["advantage_abs_mean"] = float(jnp.mean(jnp.abs(advantages)))
        old_logp = r.behaviour_logp
        if r.proximal_logp is not None:  # async rollouts: the ratio to the policy before the update, TIS to the sampler
            old_logp, advantages = r.proximal_logp, weighted_advantages(advantages, r.importance_weight, mask)
        return PolicyGradientBatch(seq, old_logp, advantages, ref_logp=r.ref_logp, old_values=r.values,
                                   returns=value_targets), metrics

    def abstract_batch(self, s: BatchShape) -> PolicyGradientBatch:
        B, R = s.rows, s.response_len
        advantages, value_targets = estimate_shapes(self.estimator, self.section.advantage, s)
        values = f32(B, R) if self.estimator.values else None
        return PolicyGradientBatch(abstract_sequences(B, s.prompt_len, R), f32(B, R), advantages,
                                   ref_logp=f32(B, R) if self.reference else None, old_values=values,
                                   returns=value_targets)

    def _rewards(self, r: Completions) -> np.ndarray:
        """The outcome rewards, with DAPO's soft overlong penalty when method.overlong_max_tokens is set."""
        s = self.section
        if s.overlong_max_tokens is None:
            return r.rewards
        lengths = np.asarray(r.seq.response_mask.sum(axis=1))
        cache = s.overlong_cache_tokens or max(1, s.overlong_max_tokens // 4)
        return r.rewards + np.asarray(overlong_penalty(jnp.asarray(lengths), s.overlong_max_tokens, cache))

    def _signals(self, r: Completions, rewards: np.ndarray) -> Signals:
        mask, token_rewards, steps = r.seq.response_mask, None, {}
        if self.estimator.token_rewards:
            token_rewards = (kl_shaped_token_rewards(jnp.asarray(rewards), r.behaviour_logp, r.ref_logp, mask,
                                                     self.section.reward_kl_coef)
                             if self.section.reward_kl_coef else last_token_rewards(rewards, mask))
        if self.estimator.steps is not None:
            steps = self.estimator.steps(r.texts, [str(r.rows[g]["answer"]) for g in r.group_ids],
                                         r.seq.response_tokens.shape[1])
        return Signals(jnp.asarray(rewards, jnp.float32), jnp.asarray(r.group_ids, jnp.int32), len(r.rows), mask,
                       token_rewards, r.values, steps)


def last_token_rewards(rewards: np.ndarray, mask: jax.Array) -> jax.Array:
    """Outcome reward placed on each sequence's last response token, [N, R]."""
    lengths = mask.sum(axis=1)
    pos = jnp.arange(mask.shape[1])[None, :]
    return jnp.where(pos == (lengths - 1)[:, None], jnp.asarray(rewards, jnp.float32)[:, None], 0.0)


def estimate_shapes(estimator: Estimator, overrides: Mapping[str, Any], s: BatchShape
                    ) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct | None]:
    """The shapes of (advantages, returns) of one update: the estimator traced abstractly over the step's
    rollout of s.rollout_rows rows in s.prompts groups, then cut to the update's s.rows rows."""
    n, R = s.rollout_rows, s.response_len
    group_ids = np.repeat(np.arange(s.prompts), n // s.prompts)
    sds = jax.ShapeDtypeStruct

    def estimate(rewards, mask, values, steps):
        token_rewards = last_token_rewards(rewards, mask) if estimator.token_rewards else None
        return estimator(Signals(rewards, group_ids, s.prompts, mask, token_rewards, values, steps), overrides)

    steps = {"step_rewards": sds((n, R), jnp.float32), "step_mask": sds((n, R), jnp.bool_),
             "step_end": sds((n, R), jnp.int32)} if estimator.steps is not None else {}
    values = sds((n, R), jnp.float32) if estimator.values else None
    advantages, returns = jax.eval_shape(estimate, sds((n,), jnp.float32), sds((n, R), jnp.bool_), values, steps)
    cut = lambda x: sds((s.rows, *x.shape[1:]), x.dtype)
    return cut(advantages), None if returns is None else cut(returns)
