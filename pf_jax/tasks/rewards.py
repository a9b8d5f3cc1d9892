"""Named reward functions a recipe can choose with `reward.name`.

External rewards score texts: `fn(rows, responses, group_ids) -> RewardOutput`, where `rows` are the
prompt rows (with their reference answers), `responses` the decoded texts (one per sampled sequence)
and `group_ids` the index of each response's prompt. Internal rewards (self-certainty, entropy) are
properties of the policy's own token distributions: the trainer computes them from its forward pass,
so they are listed in INTERNAL_REWARDS and have no text function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from pf_jax.evaluation.answer_checkers import AnswerChecker, MathVerifyChecker
from pf_jax.rewards.custom import custom_reward, guarded, is_custom, resolve
from pf_jax.rewards.text_rewards import RewardFn, RewardOutput, checker_reward, majority_vote_reward
from pf_jax.tasks.arithmetic import ARITHMETIC_CHECKER, arithmetic_answer


def instruction_reward(scale: float = 1.0, soft_scorer: str | None = None) -> RewardFn:
    """Self-supervised instruction following: scale x mean over the row's constraints of the verifier
    (hard) or classifier (soft) score (pf_jax.tasks.instructions.reward). `soft_scorer`: the directory of
    an exported constraint classifier (pf_jax.tasks.instructions.classifier_files)."""
    from pf_jax.tasks.instructions.reward import InstructionReward

    soft = None
    if soft_scorer is not None:
        from pf_jax.tasks.instructions.classifier_files import load_soft_scorer

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
    "arithmetic": arithmetic_answer, "majority_vote": arithmetic_answer,
    "math": _math_answer, "majority_vote_math": _math_answer,
}


def check_reward_name(name: str | None, soft_scorer: str | None = None) -> None:
    """A ValueError (ConfigError for a custom reward) when `name` names no reward, before anything loads:
    unknown names list the known ones, a `module:function` must import."""
    if soft_scorer is not None and name != "instructions":
        raise ValueError(f"reward.soft_scorer is used by the 'instructions' reward only, not by {name!r}")
    if name is None or name in INTERNAL_REWARDS or name in REWARDS:
        return
    if is_custom(name):
        resolve(name)
        return
    known = ", ".join([*REWARDS, *INTERNAL_REWARDS])
    raise ValueError(f"unknown reward {name!r}; known rewards: {known}, or package.module:function")


def build_reward(name: str, scale: float = 1.0, soft_scorer: str | None = None, on_error: str = "stop"
                 ) -> RewardFn | None:
    """The text reward called `name` (a named reward, or a `module:function` of the user's:
    pf_jax.rewards.custom), scaled, under the on_error policy for a row that raises or is not finite;
    None for an internal reward. `soft_scorer` (a classifier export directory) is read by the
    `instructions` reward only."""
    check_reward_name(name, soft_scorer)
    if name in INTERNAL_REWARDS:
        return None
    if is_custom(name):
        fn = custom_reward(name)
    else:
        fn = REWARDS[name](scale=scale, **({"soft_scorer": soft_scorer} if soft_scorer is not None else {}))
    factor = 1.0 if name == "instructions" else scale  # `instructions` applies its scale itself
    policed = guarded(name, fn, on_error)

    def scaled(rows, responses, group_ids):
        out = policed(rows, responses, group_ids)
        out.rewards = np.asarray(out.rewards, np.float32) * np.float32(factor)
        return out

    return scaled


def answer_format(reward_name: str | None, data_source: str) -> Callable[[str], str | None] | None:
    """The answer extractor of the recipe's task: its reward's, else the arithmetic one for the arithmetic
    sources; None when the task has no answer format (PowerFlow's format penalty and the answer rate
    then do not apply)."""
    extractor = ANSWER_EXTRACTORS.get(reward_name or "")
    if extractor is None and data_source.startswith("arithmetic"):
        return arithmetic_answer
    return extractor


def heldout_checker(reward_name: str | None, data_source: str) -> AnswerChecker | None:
    """The checker that scores held-out answers of the recipe's task (None: the task has no reference
    answers to check, e.g. a label-free reward on another source)."""
    if reward_name in ("math", "majority_vote_math"):
        return MathVerifyChecker()
    if reward_name in (None, "arithmetic", "majority_vote") and data_source.startswith("arithmetic"):
        return ARITHMETIC_CHECKER
    return None
