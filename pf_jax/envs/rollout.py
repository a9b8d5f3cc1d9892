"""The batched multi-turn rollout loop: many environments at once, one policy call per turn.

Every turn the loop asks the policy once for all live episodes (`TurnRequest`s in, `PolicyResponse`s out;
the sampler adapter turns the messages into prompts with the tokenizer's chat template, pads them and runs
one jit sampler call). The action is parsed from each response, the environment steps, and a `Step` is
recorded with the state keys, action, reward, validity, and the response's tokens and log-probs. Episodes
end when the environment says done or at `max_steps` (then `truncated`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from pf_jax.envs.episodes import Episode, Step
from pf_jax.envs.protocol import TextEnv, parse_action


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """max_steps: turns per episode (paper: 25 ALFWorld, 15 WebShop/Sokoban); history_window: earlier
    (observation, action) turns shown in the prompt; require_action_tags: actions must be inside
    <action>...</action>; show_admissible_actions: list them in the prompt where the env knows them."""

    max_steps: int = 15
    history_window: int = 2
    require_action_tags: bool = True
    show_admissible_actions: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"RolloutConfig.max_steps must be >= 1, got {self.max_steps}")
        if self.history_window < 0:
            raise ValueError(f"RolloutConfig.history_window must be >= 0, got {self.history_window}")


@dataclasses.dataclass(frozen=True)
class TurnRequest:
    """One live episode's turn: the chat messages for the policy plus what scripted policies need."""

    episode_index: int
    turn: int
    messages: tuple[dict[str, str], ...]
    observation: str
    admissible_actions: tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class PolicyResponse:
    """The policy's answer to one TurnRequest: text, its tokens and log-probs (int32 / float32 [T]), and
    optionally the prompt tokens the sampler saw (int32 [P], after the chat template)."""

    text: str
    tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))
    logprobs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.float32))
    prompt_tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))


class Policy(Protocol):
    """Answers all live episodes' turns in one call (one jit sampler call for an LLM policy)."""

    def __call__(self, requests: Sequence[TurnRequest]) -> list[PolicyResponse]: ...


def build_messages(
    instructions: str,
    task_observation: str,
    history: Sequence[Step],
    observation: str,
    admissible_actions: tuple[str, ...] | None,
    config: RolloutConfig,
) -> tuple[dict[str, str], ...]:
    """Chat messages for one turn: the task, the last `history_window` turns, the current observation."""
    parts = [instructions, f"Task:\n{task_observation}"]
    recent = list(history)[-config.history_window :] if config.history_window else []
    if recent:
        first = len(history) - len(recent)
        lines = [
            f"[turn {first + i}] action: {s.action if s.action is not None else '(none)'}"
            for i, s in enumerate(recent)
        ]
        parts.append("Recent actions:\n" + "\n".join(lines))
    parts.append(f"Current observation:\n{observation}")
    if config.show_admissible_actions and admissible_actions:
        parts.append("Admissible actions: " + ", ".join(admissible_actions))
    if config.require_action_tags:
        parts.append("Think briefly, then give your action as <action>...</action>.")
    return ({"role": "user", "content": "\n\n".join(parts)},)


def run_rollouts(
    make_env: Callable[[], TextEnv],
    tasks: Sequence[tuple[str, int]],
    group_size: int,
    policy: Policy,
    config: RolloutConfig | None = None,
) -> list[Episode]:
    """Roll out `group_size` episodes of every (task, seed); group i = the runs of tasks[i].

    Episodes are returned grouped: tasks[0]'s group first, in run order. Every turn, the live episodes'
    requests go to the policy in one call.
    """
    config = config or RolloutConfig()
    if group_size < 1:
        raise ValueError(f"run_rollouts: group_size must be >= 1, got {group_size}")
    envs, episodes, observations = _start(make_env, tasks, group_size)
    live = list(range(len(envs)))
    for turn in range(config.max_steps):
        if not live:
            break
        requests = [_request(envs[i], episodes[i], observations[i], i, turn, config) for i in live]
        responses = policy(requests)
        if len(responses) != len(requests):
            raise ValueError(f"policy returned {len(responses)} responses for {len(requests)} requests")
        live = [r.episode_index for r, response in zip(requests, responses)
                if not _act(envs, episodes, observations, r, response, config)]
    for i in live:
        episodes[i].truncated = True
    for env in envs:
        close = getattr(env, "close", None)
        if close is not None:
            close()
    return episodes


def _start(make_env: Callable[[], TextEnv], tasks: Sequence[tuple[str, int]], group_size: int
           ) -> tuple[list[TextEnv], list[Episode], list[str]]:
    """A fresh environment, episode record and first observation for each of the group_size runs of each task."""
    envs: list[TextEnv] = []
    episodes: list[Episode] = []
    observations: list[str] = []
    for group_id, (task, seed) in enumerate(tasks):
        for _ in range(group_size):
            env = make_env()
            first = env.reset(task, seed)
            envs.append(env)
            observations.append(first)
            episodes.append(Episode(task, seed, group_id, env.state_key, first))
    return envs, episodes, observations


def _request(env: TextEnv, episode: Episode, observation: str, index: int, turn: int,
             config: RolloutConfig) -> TurnRequest:
    messages = build_messages(env.instructions, episode.initial_observation, episode.steps, observation,
                              env.admissible_actions, config)
    return TurnRequest(index, turn, messages, observation, env.admissible_actions)


def _act(envs: list[TextEnv], episodes: list[Episode], observations: list[str], request: TurnRequest,
         response: PolicyResponse, config: RolloutConfig) -> bool:
    """Play the response's action in its environment and record the step; True when the episode ended."""
    i, env = request.episode_index, envs[request.episode_index]
    action = parse_action(response.text, require_tags=config.require_action_tags)
    state_key = env.state_key
    result = env.step(action if action is not None else "")
    episodes[i].steps.append(Step(
        state_key=state_key, observation=observations[i], response_text=response.text, action=action,
        env_reward=result.reward, valid=result.valid and action is not None, next_state_key=result.state_key,
        done=result.done, admissible_actions=request.admissible_actions, response_tokens=response.tokens,
        response_logprobs=response.logprobs, prompt_messages=request.messages, prompt_tokens=response.prompt_tokens,
    ))
    observations[i] = result.observation
    if result.done:
        episodes[i].won = result.won
    return result.done
