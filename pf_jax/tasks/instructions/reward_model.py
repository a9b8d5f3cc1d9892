"""The `reward_model` method family: train the constraint classifier (backbone = the recipe's model +
ConstraintClassifierHead) with binary cross-entropy on (response, constraint, label) rows, export it, and
score held-out rows (self-supervised IF, arXiv 2510.14420, Sec. 3.2).

Rows come from `soft_constraints_synthetic` (the synthetic soft constraints; test split = held-out
topics) or a jsonl of pseudo-labels {"response", "constraint", "label"} (`pseudo_label_rows` writes them
from the curriculum's pseudo-labels).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.config import ConfigError, DataConfig
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.codec import TextCodec
from pf_jax.data.loading import read_jsonl
from pf_jax.data.rows import RowProblem, check_text_field, validate_rows
from pf_jax.tasks.instructions.classifier import format_classifier_input, make_soft_scorer
from pf_jax.tasks.instructions.classifier_files import (
    encode_classifier_texts,
    save_constraint_classifier,
    text_encoder,
)
from pf_jax.tasks.instructions.pseudo_labels import PseudoLabel
from pf_jax.tasks.instructions.soft_constraints import SOFT_CONSTRAINTS, synthetic_soft_examples

SYNTHETIC_CLASSIFIER_SOURCE = "soft_constraints_synthetic"
EVAL_FILE = "classifier_eval.json"


def pseudo_label_rows(labels: Sequence[PseudoLabel]) -> list[dict[str, Any]]:
    """Pseudo-labels as reward-model rows {"response", "constraint", "label", "instruction_id", "level"}."""
    return [{"response": pl.response, "constraint": pl.constraint_text, "label": pl.label,
             "instruction_id": pl.instruction_id, "level": pl.level} for pl in labels]


def _check_row(row: Mapping[str, Any]) -> dict[str, Any] | RowProblem:
    out: dict[str, Any] = {}
    for field in ("response", "constraint"):
        text = check_text_field(row, field)
        if isinstance(text, RowProblem):
            return text
        out[field] = text
    label = row.get("label")
    if isinstance(label, bool) or label not in (0, 1):
        return RowProblem("bad label", f"field 'label' must be 0 or 1, got {label!r:.40}")
    out["label"] = int(label)
    return out


def load_classifier_rows(data: DataConfig, synthetic_examples: int, split: str | None = None) -> list[dict[str, Any]]:
    """Validated rows {"response", "constraint", "label"} of the synthetic source or a pseudo-label jsonl.

    The synthetic source gives `synthetic_examples` balanced rows per soft constraint (interleaved)."""
    split = split or data.split
    if data.source == SYNTHETIC_CLASSIFIER_SOURCE:
        if split not in ("train", "test"):
            raise ConfigError(f"data.split for {SYNTHETIC_CLASSIFIER_SOURCE} must be 'train' or 'test', got '{split}'")
        per = [synthetic_soft_examples(name, synthetic_examples, seed=data.shuffle_seed, split=split)
               for name in sorted(SOFT_CONSTRAINTS)]
        return [{"response": r, "constraint": c, "label": y} for group in zip(*per) for r, c, y in group]
    if Path(data.source).suffix.lower() not in (".jsonl", ".json"):
        raise ConfigError(f"method reward_model reads '{SYNTHETIC_CLASSIFIER_SOURCE}' or a .jsonl of "
                          f"{{response, constraint, label}} rows; got data.source '{data.source}'")
    kept = validate_rows(read_jsonl(data.source), _check_row, data.on_bad_row, source=f"{data.source} [reward_model]")
    if kept.report.skipped:
        print(f"[pf_jax] data: {kept.report.summary()}")
    return kept.rows


def classifier_batch(codec: TextCodec, rows: Sequence[Mapping[str, Any]], max_length: int) -> dict[str, jax.Array]:
    """{"tokens" [B, T], "mask" [B, T], "labels" [B]} of "Response: {r}. Constraint: {c}" texts."""
    texts = [format_classifier_input(r["response"], r["constraint"]) for r in rows]
    tokens, mask = encode_classifier_texts(codec, texts, max_length)
    return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
            "labels": jnp.asarray([float(r["label"]) for r in rows], jnp.float32)}


def export_classifier(policy: nnx.Module, head: nnx.Module, codec: TextCodec, max_length: int,
                      directory: Path) -> Path:
    """Backbone + head + tokenizer + config of the trained classifier (load with load_soft_scorer)."""
    return save_constraint_classifier(directory, policy, head, codec, max_length)


def evaluate_classifier(policy: nnx.Module, head: nnx.Module, codec: TextCodec, cfg: TrainConfig,
                        run_dir: Path) -> dict[str, float]:
    """Held-out accuracy, mean BCE and per-class recall of the trained classifier on `eval.split` rows
    (the first `reward_model.eval_examples`), through the same soft scorer an export gives; written to
    <run_dir>/classifier_eval.json."""
    if not cfg.reward_model.eval_examples or not cfg.eval.enabled:
        return {}
    rows = load_classifier_rows(cfg.data, max(cfg.reward_model.eval_examples // max(len(SOFT_CONSTRAINTS), 1), 1),
                                split=cfg.eval.split)[: cfg.reward_model.eval_examples]
    scorer = make_soft_scorer(text_encoder(policy, codec, cfg.reward_model.max_length), head, batch_size=32)
    probs = scorer([r["response"] for r in rows], [r["constraint"] for r in rows]).astype(np.float64)
    labels = np.array([r["label"] for r in rows], np.float64)
    eps = 1e-7
    out = {
        "examples": float(len(rows)),
        "accuracy": float(np.mean((probs > 0.5) == labels)),
        "bce": float(-np.mean(labels * np.log(probs + eps) + (1 - labels) * np.log(1 - probs + eps))),
        "recall_positive": float(np.mean(probs[labels == 1] > 0.5)) if (labels == 1).any() else float("nan"),
        "recall_negative": float(np.mean(probs[labels == 0] <= 0.5)) if (labels == 0).any() else float("nan"),
    }
    (run_dir / EVAL_FILE).write_text(json.dumps({"split": cfg.eval.split, **out}, indent=2) + "\n")
    print(f"[pf_jax] constraint classifier on {cfg.data.source} [{cfg.eval.split}]: " +
          ", ".join(f"{k}={v:.4g}" for k, v in out.items()))
    return out
