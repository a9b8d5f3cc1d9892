"""The multi-turn environment response source (methods with `responses="env"`): rewardflow, gigpo,
grpo_episode.

    (task, seed) rows ──► run_rollouts (SamplerPolicy: one jit sampler call per turn, all live episodes)
        ──► step advantages (pf_jax.rewards.step_advantages) ──► one batch row per policy turn:
            prompt = that turn's prompt tokens, response = its tokens, old_logp = the sampler's
            log-probs, advantages = the step's advantage broadcast over its tokens

The loss is the PPO clipped surrogate of the policy-gradient family (clip 0.2, token-mean, optional k3
KL to the reference, entropy bonus from the recipe). Rows are padded to a power-of-two count (padding
rows have an empty response mask) and prompt / response lengths to power-of-two buckets, so the update
compiles a handful of times per run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.config.recipe import EnvSection
from pf_jax.data.codec import TextCodec
from pf_jax.data.sequences import SequenceBatch, bucket_length, pack_sequences
from pf_jax.envs.episodes import Episode
from pf_jax.envs.protocol import TextEnv
from pf_jax.envs.rollout import RolloutConfig, run_rollouts
from pf_jax.envs.sampler_policy import SamplerPolicy
from pf_jax.rewards.step_advantages import (
    broadcast_to_tokens,
    gigpo_advantages,
    grpo_episode_advantages,
    rewardflow_advantages,
)
from pf_jax.sampling.sampler import GenerationConfig

AGENTIC_METHODS = ("rewardflow", "gigpo", "grpo_episode")


def agentic_task_rows(env: EnvSection) -> list[dict[str, Any]]:
    """The task pool: one row {"task", "seed"} per task string and seed in [seed_offset, +task_seeds)."""
    return [{"task": t, "seed": s} for t in env.tasks for s in range(env.seed_offset, env.seed_offset + env.task_seeds)]


def env_factory(env: EnvSection) -> Callable[[], TextEnv]:
    """A constructor of fresh environments of the recipe's kind (TextWorld games are generated and cached
    on first reset)."""
    if env.name == "maze":
        from pf_jax.envs.maze import MazeEnv

        return MazeEnv
    if env.name == "sokoban":
        from pf_jax.envs.sokoban import SokobanEnv

        return SokobanEnv
    from pf_jax.envs.textworld_env import TextWorldEnv

    return lambda: TextWorldEnv(state_key_source=env.textworld_state_key)


def rollout_config(env: EnvSection) -> RolloutConfig:
    return RolloutConfig(max_steps=env.max_steps, history_window=env.history_window,
                         require_action_tags=env.require_action_tags,
                         show_admissible_actions=env.show_admissible_actions)


def episode_step_advantages(method: str, episodes: Sequence[Episode], env: EnvSection) -> np.ndarray:
    """Advantage of every step row (episode order, then step order), float64 [S], for one of
    AGENTIC_METHODS: RewardFlow (propagated state values), GiGPO (anchor-state discounted returns) or
    GRPO on the episode return (std-normalised)."""
    if method == "rewardflow":
        return rewardflow_advantages(episodes, env.gamma, env.invalid_penalty, env.step_weight)[0]
    if method == "gigpo":
        return gigpo_advantages(episodes, env.gamma, env.invalid_penalty, env.step_weight)
    if method == "grpo_episode":
        return grpo_episode_advantages(episodes)
    raise ValueError(f"no step advantages for method {method!r}; expected one of {AGENTIC_METHODS}")


def pack_step_rows(
    episodes: Sequence[Episode], pad_id: int, *, min_rows: int = 1
) -> tuple[SequenceBatch, np.ndarray, np.ndarray]:
    """One row per step: (SequenceBatch [N, P] / [N, R], sampler log-probs float32 [N, R], real-row flags
    bool [N]). N = bucket_length(S, min_rows) >= S steps; the padding rows repeat row 0's tokens (finite
    log-probs) with an empty response mask, so they carry no loss."""
    steps = [s for e in episodes for s in e.steps]
    if not steps:
        raise ValueError("pack_step_rows: the episodes have no steps")
    missing = [i for i, s in enumerate(steps) if s.prompt_tokens.size == 0 or s.response_tokens.size == 0]
    if missing:
        raise ValueError(f"pack_step_rows: step rows {missing[:5]} have no prompt or response tokens (a policy "
                         "that does not report them cannot be trained on)")
    n = bucket_length(len(steps), minimum=min_rows)
    order = list(range(len(steps))) + [0] * (n - len(steps))
    prompts = [steps[i].prompt_tokens.tolist() for i in order]
    responses = [steps[i].response_tokens.tolist() for i in order]
    seq = pack_sequences(prompts, responses, pad_id=pad_id)
    real = np.arange(n) < len(steps)
    seq = seq.replace(response_mask=seq.response_mask & jnp.asarray(real)[:, None])
    old_logp = np.zeros(seq.response_tokens.shape, np.float32)
    for row, step in enumerate(steps):
        old_logp[row, : step.response_logprobs.shape[0]] = step.response_logprobs
    return seq, old_logp, real


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    steps = [s for e in episodes for s in e.steps]
    return {
        "success_rate": float(np.mean([e.won for e in episodes])),
        "episode_return": float(np.mean([e.total_reward for e in episodes])),
        "episode_steps": float(np.mean([len(e.steps) for e in episodes])),
        "invalid_fraction": float(np.mean([not s.valid for s in steps])) if steps else 0.0,
    }


class AgenticExperience:
    """Rolls out the current policy in the recipe's environment and builds the policy-gradient batch."""

    def __init__(self, cfg: Any, method: str, codec: TextCodec, graphdefs: Mapping[str, nnx.GraphDef],
                 gen: GenerationConfig, scorer: Any) -> None:
        if method not in AGENTIC_METHODS:
            raise ValueError(f"AgenticExperience: method {method!r} is not one of {AGENTIC_METHODS}")
        self.env, self.method, self.codec = cfg.env, method, codec
        self.graphdefs, self.gen, self.scorer = graphdefs, gen, scorer
        self.make_env = env_factory(cfg.env)
        self.rollout = rollout_config(cfg.env)
        self.max_prompt_tokens = cfg.data.max_prompt_tokens
        self.last_episodes: list[Episode] = []

    def rollouts(self, rows: Sequence[Mapping[str, Any]], policy_params: nnx.State, key: jax.Array) -> list[Episode]:
        model = nnx.merge(self.graphdefs["policy"], policy_params)
        policy = SamplerPolicy(model, self.codec, self.gen, batch_size=len(rows) * self.env.group_size, key=key,
                               max_prompt_tokens=self.max_prompt_tokens)
        return run_rollouts(self.make_env, [(str(r["task"]), int(r["seed"])) for r in rows], self.env.group_size,
                            policy, self.rollout)

    def make_batch(self, rows: Sequence[Mapping[str, Any]], params: Mapping[str, nnx.State], ref_params,
                   key: jax.Array) -> tuple[dict, dict]:
        episodes = self.rollouts(rows, params["policy"], key)
        self.last_episodes = episodes
        step_adv = episode_step_advantages(self.method, episodes, self.env)
        seq, old_logp, real = pack_step_rows(episodes, self.codec.pad_id, min_rows=self.env.min_row_bucket)
        padded = np.zeros(real.shape[0], np.float64)
        padded[: step_adv.shape[0]] = step_adv
        advantages = broadcast_to_tokens(padded, np.asarray(seq.response_mask))
        batch = {"seq": seq, "old_logp": jnp.asarray(old_logp), "advantages": jnp.asarray(advantages)}
        if ref_params is not None:
            batch["ref_logp"] = self.scorer.logprobs(ref_params, seq)
        metrics = episode_metrics(episodes)
        metrics.update(step_rows=float(real.sum()), advantage_abs_mean=float(np.mean(np.abs(step_adv))),
                       response_length=float(np.mean([s.response_tokens.size for e in episodes for s in e.steps])),
                       prompt_tokens_max=float(max(s.prompt_tokens.size for e in episodes for s in e.steps)))
        return batch, metrics
