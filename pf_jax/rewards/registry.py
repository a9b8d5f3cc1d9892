"""Named reward functions a recipe can choose with `reward.name`.

External rewards score texts: `fn(rows, responses, group_ids) -> RewardOutput`, where `rows` are the
prompt rows (with their reference answers), `responses` the decoded texts (one per sampled sequence)
and `group_ids` the index of each response's prompt. Internal rewards (self-certainty, entropy) are
properties of the policy's own token distributions: the trainer computes them from its forward pass,
so they are listed in INTERNAL_REWARDS and have no text function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pf_jax.data.arithmetic import parse_answer
from pf_jax.evaluation.answer_checkers import AnswerChecker, MathVerifyChecker, PredicateChecker
from pf_jax.rewards.errors import RewardOutputError


@dataclass
class RewardOutput:
    rewards: np.ndarray  # float32 [N]
    answers: list[str | None]  # the extracted answer of each response (None: no parseable answer)
    metrics: dict[str, float] = field(default_factory=dict)


RewardFn = Callable[[Sequence[Mapping[str, Any]], Sequence[str], np.ndarray], RewardOutput]


def _arithmetic_answer(response: str) -> str | None:
    value = parse_answer(response)
    return None if value is None else str(value)


ARITHMETIC_CHECKER = PredicateChecker(
    predicate=lambda response, reference: _arithmetic_answer(response) == str(int(reference)),
    extract_answer=_arithmetic_answer,
)


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


def instruction_reward(scale: float = 1.0, soft_scorer: str | None = None) -> RewardFn:
    """Self-supervised instruction following: scale x mean over the row's constraints of the verifier
    (hard) or classifier (soft) score (pf_jax.rewards.instruction_reward). `soft_scorer`: the directory of
    an exported constraint classifier (pf_jax.rewards.constraint_classifier_export)."""
    from pf_jax.rewards.instruction_reward import InstructionReward

    soft = None
    if soft_scorer is not None:
        from pf_jax.rewards.constraint_classifier_export import load_soft_scorer

        soft = load_soft_scorer(soft_scorer)
    scorer = InstructionReward(scale=scale, soft_scorer=soft)

    def reward(rows, responses, group_ids):
        out = scorer([rows[g] for g in group_ids], list(responses))
        metrics = {k.removeprefix("reward/"): float(v) for k, v in out.metrics().items()}
        return RewardOutput(np.asarray(out.rewards, np.float32), [None] * len(responses), metrics)

    return reward


@functools.cache
def _math_checker() -> AnswerChecker:
    return MathVerifyChecker()


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "arithmetic": lambda scale=1.0: checker_reward(ARITHMETIC_CHECKER),
    "math": lambda scale=1.0: checker_reward(_math_checker()),
    "majority_vote": lambda scale=1.0: majority_vote_reward(ARITHMETIC_CHECKER),
    "majority_vote_math": lambda scale=1.0: majority_vote_reward(_math_checker()),
    "instructions": instruction_reward,
}
INTERNAL_REWARDS = ("self_certainty", "entropy")
def _math_answer(response: str) -> str | None:
    return _math_checker().extract(response)


ANSWER_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "arithmetic": _arithmetic_answer, "majority_vote": _arithmetic_answer,
    "math": _math_answer, "majority_vote_math": _math_answer,
}


def build_reward(name: str, scale: float = 1.0, soft_scorer: str | None = None) -> RewardFn | None:
    """The text reward called `name` (its output checked: one finite reward per response); None for an
    internal reward. Unknown names list the known ones. `soft_scorer` (a classifier export directory) is
    read by the `instructions` reward only."""
    if soft_scorer is not None and name != "instructions":
        raise ValueError(f"reward.soft_scorer is used by the 'instructions' reward only, not by {name!r}")
    if name in INTERNAL_REWARDS:
        return None
    if name not in REWARDS:
        known = ", ".join([*REWARDS, *INTERNAL_REWARDS])
        raise ValueError(f"unknown reward {name!r}; known rewards: {known}")
    fn = REWARDS[name](scale=scale, **({"soft_scorer": soft_scorer} if soft_scorer is not None else {}))
    factor = 1.0 if name == "instructions" else scale  # `instructions` applies its scale itself

    def checked(rows, responses, group_ids):
        out = fn(rows, responses, group_ids)
        out.rewards = np.asarray(out.rewards, np.float32) * np.float32(factor)
        check_rewards(name, out.rewards, responses)
        return out

    return checked


def check_rewards(name: str, rewards: np.ndarray, responses: Sequence[str]) -> None:
    """One finite reward per response, else RewardOutputError naming the reward and the response."""
    if rewards.shape != (len(responses),):
        raise RewardOutputError(f"reward {name!r} returned rewards of shape {rewards.shape} for {len(responses)} responses")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        i = int(bad[0])
        raise RewardOutputError(f"reward {name!r} gave {rewards[i]} for response {i} ({responses[i][:60]!r}); "
                                   f"{bad.size} of {rewards.size} rewards are not finite numbers",
                                   hint="a reward function must return a finite number for every response")
