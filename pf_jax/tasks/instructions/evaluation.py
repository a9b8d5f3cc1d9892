"""Held-out instruction-following reward of a policy: the base model before training and the trained
policy after, on the same prompts (every level of the eval split's instructions, or its IFEval rows).

Written to <run_dir>/instruction_eval_<name>.json: the mean reward, the mean constraint score, the
fraction of responses meeting all constraints, the mean reward per level and the reason counts.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from pf_jax.config import DataConfig
from pf_jax.tasks.instructions.rows import load_instruction_rows
from pf_jax.training.experience import generation_config, sample_responses

if TYPE_CHECKING:
    from pf_jax.training.trainer import Trainer


def evaluation_rows(trainer: Trainer) -> list[dict[str, Any]]:
    """The first `eval.problems` rows of the eval split, in a fixed order spread over the levels."""
    cfg = trainer.cfg
    data = DataConfig(**{**cfg.data.model_dump(), "split": cfg.eval.split})
    rows = load_instruction_rows(data, cfg.curriculum.synthetic_instructions)
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    return [rows[int(i)] for i in order[: cfg.eval.problems]]


def evaluate_instruction_reward(trainer: Trainer, name: str, policy_params: nnx.State, *, key: jax.Array
                                ) -> dict[str, float]:
    """`eval.samples` responses per held-out row at `eval.temperature`, scored by the run's reward."""
    cfg = trainer.cfg
    rows = evaluation_rows(trainer)
    model = nnx.merge(trainer.graphdefs["policy"], policy_params)
    gen = generation_config(cfg, trainer.codec, temperature=cfg.eval.temperature)
    texts: list[str] = []
    groups: list[int] = []
    chunk = 32
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        _, _, t, g = sample_responses(model, trainer.codec, [r["prompt"] for r in part], cfg.eval.samples,
                                      jax.random.fold_in(key, start), gen)
        texts += t
        groups += [start + int(i) for i in g]
    out = trainer.reward_fn(rows, texts, np.asarray(groups))
    metrics = {"rows": float(len(rows)), "samples": float(cfg.eval.samples), **out.metrics}
    (trainer.run_dir / f"instruction_eval_{name}.json").write_text(
        json.dumps({"name": name, "split": cfg.eval.split, "metrics": metrics,
                    "examples": [{"prompt": rows[g]["prompt"], "response": t}
                                 for g, t in list(zip(groups, texts))[:8]]}, indent=2) + "\n")
    print(f"[pf_jax] instruction reward of {name} on {len(rows)} held-out rows x {cfg.eval.samples}: "
          f"mean {metrics['mean']:.4f}, constraint mean {metrics['constraint_mean']:.4f}")
    return metrics
