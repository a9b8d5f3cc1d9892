"""Example custom rewards for `reward.name: module:function` (TRL's reward_funcs convention).

    PYTHONPATH=examples python -m pf_jax.train --config configs/arith/grpo.yaml reward.name=rewards:correct_and_brief

A reward takes the prompts, the completions and each other field of the prompt rows as keyword lists aligned
with the completions (here `answer`), and returns one float per completion. Raising, or returning NaN, for a
row is handled by `reward.on_error` (stop the run naming the row, or reward 0 and counted).
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def correct_and_brief(prompts: list[str], completions: list[str], answer: list[str], **fields) -> list[float]:
    """1 for a completion whose first integer is the row's answer, minus 0.01 per character after it."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        match = NUMBER.search(completion)
        correct = match is not None and match.group() == str(expected).strip()
        rewards.append(float(correct) - 0.01 * (len(completion) - match.end() if match else 0))
    return rewards
