"""Held-out instruction-following reward of a policy: the base model before training and the trained
policy after, on the same prompts (every level of the eval split's instructions, or its IFEval rows).

Written to <run_dir>/instruction_eval_<name>.json: the mean reward, the mean constraint score, the
fraction of responses meeting all constraints, the mean reward per level and the reason counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pf_jax.config import DataConfig
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.codec import TextCodec
from pf_jax.models.decoder import Decoder
from pf_jax.rewards.text_rewards import RewardFn
from pf_jax.sampling.texts import generation_config, sample_texts
from pf_jax.tasks.instructions.rows import load_instruction_rows


def evaluation_rows(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The first `eval.problems` rows of the eval split, in a fixed order spread over the levels."""
    data = DataConfig(**{**cfg.data.model_dump(), "split": cfg.eval.split})
    rows = load_instruction_rows(data, cfg.curriculum.synthetic_instructions)
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    return [rows[int(i)] for i in order[: cfg.eval.problems]]


def evaluate_instruction_reward(name: str, model: Decoder, codec: TextCodec, reward: RewardFn, cfg: TrainConfig,
                                run_dir: Path, *, key: jax.Array) -> dict[str, float]:
    """`eval.samples` responses per held-out row at `eval.temperature`, scored by the run's reward."""
    rows = evaluation_rows(cfg)
    gen = generation_config(cfg.rollout, codec, temperature=cfg.eval.temperature)
    texts, groups = sample_texts(model, codec, [r["prompt"] for r in rows], cfg.eval.samples, key, gen, chunk=32)
    out = reward(rows, texts, groups)
    metrics = {"rows": float(len(rows)), "samples": float(cfg.eval.samples), **out.metrics}
    (run_dir / f"instruction_eval_{name}.json").write_text(
        json.dumps({"name": name, "split": cfg.eval.split, "metrics": metrics,
                    "examples": [{"prompt": rows[g]["prompt"], "response": t}
                                 for g, t in list(zip(groups, texts))[:8]]}, indent=2) + "\n")
    print(f"[pf_jax] instruction reward of {name} on {len(rows)} held-out rows x {cfg.eval.samples}: "
          f"mean {metrics['mean']:.4f}, constraint mean {metrics['constraint_mean']:.4f}")
    return metrics
