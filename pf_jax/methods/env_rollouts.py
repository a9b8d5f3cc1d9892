"""The multi-turn environment response source (rewardflow, gigpo, grpo_episode): the task pool as prompt
rows, episodes rolled out with the current policy, and every policy turn packed as one batch row.

    (task, seed) rows ──► run_rollouts (SamplerPolicy: one jit sampler call per turn, all live episodes)
        ──► one row per turn: prompt = that turn's prompt tokens, response = its tokens, behaviour log-probs
            = the sampler's; the reference's log-probs when the objective has a KL term

Rows are padded to a power-of-two count (padding rows have an empty response mask) and prompt / response
lengths to power-of-two buckets, so the update compiles a handful of times per run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
from pf_jax.methods.protocols import EpisodeRollout, Models, Needs
from pf_jax.methods.scoring import Scorer
from pf_jax.sampling.sampler import GenerationConfig


def task_pool_rows(env: EnvSection) -> list[dict[str, Any]]:
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


@dataclass
class EnvRollouts:
    """Rolls out the current policy in the recipe's environment, group_size episodes per (task, seed) row."""

    env: EnvSection
    codec: TextCodec
    gen: GenerationConfig
    scorer: Scorer
    needs: Needs
    max_prompt_tokens: int

    def __post_init__(self) -> None:
        self.make_env = env_factory(self.env)
        self.rollout = rollout_config(self.env)
        self.last_episodes: list[Episode] = []

    def rollouts(self, rows: Sequence[Mapping[str, Any]], model: nnx.Module, key: jax.Array) -> list[Episode]:
        sampler = SamplerPolicy(model, self.codec, self.gen, batch_size=len(rows) * self.env.group_size, key=key,
                                max_prompt_tokens=self.max_prompt_tokens)
        return run_rollouts(self.make_env, [(str(r["task"]), int(r["seed"])) for r in rows], self.env.group_size,
                            sampler, self.rollout)

    def __call__(self, rows: Sequence[Mapping[str, Any]], models: Models, key: jax.Array) -> EpisodeRollout:
        episodes = self.rollouts(rows, models.sampler_model(), key)
        self.last_episodes = episodes
        seq, old_logp, real = pack_step_rows(episodes, self.codec.pad_id, min_rows=self.env.min_row_bucket)
        ref = self.scorer.logprobs(models.reference, seq, models.reference_graphdef) if self.needs.reference_logp else None
        steps = [s for e in episodes for s in e.steps]
        metrics = {**episode_metrics(episodes), "step_rows": float(real.sum()),
                   "response_length": float(np.mean([s.response_tokens.size for s in steps])),
                   "prompt_tokens_max": float(max(s.prompt_tokens.size for s in steps))}
        return EpisodeRollout(episodes, seq, jnp.asarray(old_logp), real, ref, metrics)
