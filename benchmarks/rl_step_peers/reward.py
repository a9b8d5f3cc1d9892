"""The reward every framework of bench_rl_step.py computes: 1 when the completion's last \\boxed{...} holds the
row's answer, else 0. TRL's reward_funcs convention (prompts, completions, **row fields), which pf_jax's
`reward.name=module:function` and Tunix's reward_fns share; a completion may be text or a message list."""

from __future__ import annotations

import re

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _text(completion) -> str:
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def boxed_match(prompts, completions, answer, **fields) -> list[float]:
    scores = []
    for completion, truth in zip(completions, answer, strict=True):
        found = BOXED.findall(_text(completion))
        scores.append(float(bool(found) and found[-1].strip() == str(truth).strip()))
    return scores
