"""Rewards of sampled texts: `fn(rows, responses, group_ids) -> RewardOutput`, where `rows` are the prompt
rows (with their reference answers), `responses` the decoded texts (one per sampled sequence) and
`group_ids` the index of each response's prompt. Built here from an answer checker: correctness (RLVR)
and the majority vote of a prompt's samples (TTRL); the named rewards a recipe picks are in
pf_jax.tasks.rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pf_jax.evaluation.answer_checkers import AnswerChecker


@dataclass
class RewardOutput:
    rewards: np.ndarray  # float32 [N]
    answers: list[str | None]  # the extracted answer of each response (None: no parseable answer)
    metrics: dict[str, float] = field(default_factory=dict)


RewardFn = Callable[[Sequence[Mapping[str, Any]], Sequence[str], np.ndarray], RewardOutput]


def checker_reward(checker: AnswerChecker, answer_field: str = "answer") -> RewardFn:
    """1 for a response the checker accepts against row[answer_field], else 0 (RLVR correctness)."""

    def reward(rows, responses, group_ids):
        refs = [rows[g][answer_field] for g in group_ids]
        correct = np.array([checker.is_correct(r, ref) for r, ref in zip(responses, refs)], np.float32)
        answers = [checker.extract(r) for r in responses]
        return RewardOutput(correct, answers, {"accuracy": float(correct.mean())})

    return reward


def majority_vote_reward(checker: AnswerChecker) -> RewardFn:
    """TTRL: the most frequent extracted answer of a prompt's samples is its pseudo-label; reward 1 for
    agreeing with it, 0 otherwise or without an answer. Uses no reference answer at all."""

    def reward(rows, responses, group_ids):
        answers = [checker.extract(r) for r in responses]
        rewards = np.zeros(len(responses), np.float32)
        for g in np.unique(group_ids):
            idx = np.flatnonzero(group_ids == g)
            votes = [answers[i] for i in idx if answers[i] is not None]
            if votes:
                values, counts = np.unique(votes, return_counts=True)
                label = values[np.argmax(counts)]
                rewards[idx] = [answers[i] == label for i in idx]
        return RewardOutput(rewards, answers, {"majority_agreement": float(rewards.mean())})

    return reward
