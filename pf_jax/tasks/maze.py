"""The built-in maze task (the environment itself is pf_jax.envs.maze): what a tiny policy trained from
scratch on it needs.

- Its word vocabulary. The arithmetic `CharTokenizer` only knows digits and operators, so a tiny maze
  policy gets a small word vocabulary (pf_jax.data.word_codec, lower-casing style): the lower-cased words,
  numbers and punctuation marks of the maze's instructions, observations and the rollout prompt scaffolding.
- Random-walk SFT rows that warm-start it (data source `maze_random_walk`). Each row is one turn of a
  random walk (a uniformly random *admissible* move every turn) on a seeded 4x4 maze: prompt = the turn's
  messages rendered as the rollout loop shows them to a model without a chat template, answer = the move.
  SFT on these teaches the format and the walls but nothing about the goal, so the warm policy is (close
  to) a random walk: success is non-zero at the start of RL and any gain in reaching the goal comes from
  RL. The rendering settings are fixed (RANDOM_WALK_ROLLOUT); RL recipes that start from this policy use
  the same ones (configs/rewardflow/maze.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pf_jax.data.word_codec import LOWER, WordCodec, WordTokenizer
from pf_jax.envs.maze import DIRECTIONS, MazeEnv
from pf_jax.envs.rollout import PolicyResponse, RolloutConfig, TurnRequest, build_messages, run_rollouts
from pf_jax.envs.sampler_policy import render_plain


def split_words(text: str) -> list[str]:
    """Lower-cased runs of letters, runs of digits and single punctuation marks, in order."""
    return LOWER.split(text)


def maze_word_codec(words: Sequence[str]) -> WordCodec:
    """The lower-casing WordCodec over `words` (saved as pf_jax_maze_tokenizer.json)."""
    return WordCodec(WordTokenizer(words, LOWER))


def maze_vocabulary(max_size: int = 32) -> list[str]:
    """Every token the maze and the rollout prompts produce for mazes up to max_size x max_size: the words
    of the instructions, observation templates and prompt scaffolding, plus the numbers 0..max_size."""
    env = MazeEnv(show_map=False)
    texts = [env.instructions, "You reached the goal!", "There is a wall that way. Unknown move 'x'.",
             "go " + " ".join(DIRECTIONS), "<action> </action> (none)"]
    first = env.reset("maze-3x3", 0)
    texts.append(first)
    texts += [m["content"] for m in build_messages(env.instructions, first, [], first, env.admissible_actions,
                                                   RolloutConfig(require_action_tags=True))]
    texts.append("Recent actions:\n[turn 0] action: north")
    words: list[str] = []
    for text in texts:
        for w in split_words(text):
            if not w.isdigit() and w not in words:
                words.append(w)
    return words + [str(i) for i in range(max_size + 1)]

RANDOM_WALK_ROLLOUT = RolloutConfig(max_steps=10, history_window=0, require_action_tags=False,
                                    show_admissible_actions=True)
RANDOM_WALK_SEEDS = {"train": range(1000, 1400), "test": range(5000, 5050)}


class RandomAdmissiblePolicy:
    """Answers every turn with a uniformly random admissible action (a scripted `Policy`)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, requests: Sequence[TurnRequest]) -> list[PolicyResponse]:
        return [PolicyResponse(str(self.rng.choice(r.admissible_actions))) for r in requests]


def maze_random_walk_rows(split: str, task: str = "maze-4x4", group_size: int = 2) -> list[dict[str, Any]]:
    """Rows {"prompt", "answer"}: every turn of `group_size` random walks on each seed of the split."""
    if split not in RANDOM_WALK_SEEDS:
        raise ValueError(f"maze random-walk split must be one of {sorted(RANDOM_WALK_SEEDS)}, got {split!r}")
    tasks = [(task, s) for s in RANDOM_WALK_SEEDS[split]]
    episodes = run_rollouts(MazeEnv, tasks, group_size, RandomAdmissiblePolicy(len(split)), RANDOM_WALK_ROLLOUT)
    return [{"prompt": render_plain(step.prompt_messages), "answer": step.action}
            for e in episodes for step in e.steps]
