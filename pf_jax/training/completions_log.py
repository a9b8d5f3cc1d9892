"""Sample completions in the logs (logging.completions_every): every so many steps, a few prompts with
their completions, rewards and advantages, as records for completions.jsonl, a TensorBoard text table
and a W&B table (written by pf_jax.training.metrics.MetricsLogger).

A record: {"step", "prompt", "completion", "reward", "advantage", "group"}: `advantage` is the response's
advantage (a per-token advantage averaged over its tokens), None where the objective has none (DPO,
PowerFlow); `group` the index of its prompt in the step's batch. Only responses sampled this step have
texts to show: dataset methods (SFT, DPO) write nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pf_jax.methods.protocols import Completions


def completion_records(step: int, responses: Any, batch: Any, count: int) -> list[dict[str, Any]]:
    """The first `count` sampled responses of a step (none when it sampled no texts)."""
    if not isinstance(responses, Completions) or responses.texts is None:
        return []
    n = min(count, len(responses.texts))
    rewards = None if responses.rewards is None else np.asarray(responses.rewards)
    advantages = _per_response(getattr(batch, "advantages", None), getattr(getattr(batch, "seq", None), "response_mask", None))
    out = []
    for i in range(n):
        group = int(responses.group_ids[i])
        out.append({"step": step, "prompt": responses.rows[group]["prompt"], "completion": responses.texts[i],
                    "reward": None if rewards is None else float(rewards[i]),
                    "advantage": None if advantages is None else float(advantages[i]), "group": group})
    return out


def _per_response(advantages: Any, mask: Any) -> np.ndarray | None:
    if advantages is None:
        return None
    a = np.asarray(advantages, np.float64)
    if a.ndim == 1:
        return a
    m = np.asarray(mask, bool)
    return (a * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The records as a markdown table (TensorBoard renders its text summaries as markdown)."""
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", "\\n")[:300]
    rows = [f"| {cell(r['prompt'])} | {cell(r['completion'])} | {r['reward']} | {r['advantage']} |" for r in records]
    return "\n".join(["| prompt | completion | reward | advantage |", "|---|---|---|---|", *rows])
