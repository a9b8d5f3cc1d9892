"""The agentic objective (RewardFlow, GiGPO, GRPO on the episode return): per-step advantages from a
group's episodes, broadcast over each turn's tokens, then the clipped-ratio loss of the policy-gradient
family (clip 0.2, token-mean, optional k3 KL to the reference, entropy bonus from the recipe)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from pf_jax.config.recipe import EnvSection
from pf_jax.envs.episodes import Episode
from pf_jax.methods.batches import BatchShape, PolicyGradientBatch, abstract_sequences, f32
from pf_jax.methods.policy_gradient import RatioLoss
from pf_jax.methods.protocols import EpisodeRollout, Metrics, Needs, ObjectiveDefaults
from pf_jax.rewards.step_advantages import (
    broadcast_to_tokens,
    gigpo_advantages,
    grpo_episode_advantages,
    rewardflow_advantages,
)

StepAdvantages = Callable[[Sequence[Episode], EnvSection], np.ndarray]
"""(a step's episodes, the env section) -> advantage of every step row (episode order, then step order) [S]."""


def rewardflow_steps(episodes: Sequence[Episode], env: EnvSection) -> np.ndarray:
    """RewardFlow: terminal rewards propagated over the group's state graph, plus w x the episode's."""
    return rewardflow_advantages(episodes, env.gamma, env.invalid_penalty, env.step_weight)[0]


def gigpo_steps(episodes: Sequence[Episode], env: EnvSection) -> np.ndarray:
    """GiGPO: discounted returns grouped by anchor state, plus w x the episode's."""
    return gigpo_advantages(episodes, env.gamma, env.invalid_penalty, env.step_weight)


def episode_return_steps(episodes: Sequence[Episode], env: EnvSection) -> np.ndarray:
    """GRPO on the episode return (std-normalised), the same for every step of an episode."""
    return grpo_episode_advantages(episodes)


@dataclass(frozen=True)
class Agentic(ObjectiveDefaults):
    loss: RatioLoss
    step_advantages: StepAdvantages
    env: EnvSection
    reference: bool

    @property
    def needs(self) -> Needs:
        return Needs(reference_logp=self.reference)

    def abstract_batch(self, s: BatchShape) -> PolicyGradientBatch:
        B, R = s.rows, s.response_len
        ref = f32(B, R) if self.reference else None
        return PolicyGradientBatch(abstract_sequences(B, s.prompt_len, R), f32(B, R), f32(B, R), ref_logp=ref)

    def batch(self, r: EpisodeRollout) -> tuple[PolicyGradientBatch, Metrics]:
        step_adv = self.step_advantages(r.episodes, self.env)
        padded = np.zeros(r.real.shape[0], np.float64)
        padded[: step_adv.shape[0]] = step_adv
        advantages = broadcast_to_tokens(padded, np.asarray(r.seq.response_mask))
        metrics = {"advantage_abs_mean": float(np.mean(np.abs(step_adv)))}
        return PolicyGradientBatch(r.seq, r.behaviour_logp, jnp.asarray(advantages), ref_logp=r.ref_logp), metrics
