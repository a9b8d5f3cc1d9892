"""The constraint classifier objective (`method.name: reward_model`, self-supervised IF, arXiv 2510.14420):
binary cross-entropy of ConstraintClassifierHead over the policy backbone's hidden states of
"Response: {r}. Constraint: {c}" texts. With freeze_backbone only the head trains."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pf_jax.config.recipe import TrainConfig
from pf_jax.data.codec import TextCodec
from pf_jax.methods.batches import BatchShape, ClassifierBatch, f32
from pf_jax.methods.protocols import LabelledTexts, Metrics, Needs, ObjectiveDefaults
from pf_jax.tasks.instructions.classifier import ConstraintClassifierHead
from pf_jax.tasks.instructions.classifier_files import backbone_hidden, classifier_length_bucket
from pf_jax.tasks.instructions.reward_model import evaluate_classifier, export_classifier


@dataclass(frozen=True)
class ConstraintClassifier(ObjectiveDefaults):
    loss_fn: Callable[..., Any]
    mlp_dim: int
    freeze_backbone: bool
    max_length: int  # reward_model.max_length: inputs are cut to it
    needs: ClassVar[Needs] = Needs()

    @property
    def trains_policy(self) -> bool:
        return not self.freeze_backbone

    def heads(self, hidden_size: int, seed: int) -> dict[str, nnx.Module]:
        return {"classifier": ConstraintClassifierHead(hidden_size, self.mlp_dim, rngs=nnx.Rngs(seed + 3))}

    def batch(self, r: LabelledTexts) -> tuple[ClassifierBatch, Metrics]:
        return ClassifierBatch(r.tokens, r.mask, r.labels), {}

    def abstract_batch(self, s: BatchShape) -> ClassifierBatch:
        T = classifier_length_bucket(self.max_length, self.max_length)
        return ClassifierBatch(jax.ShapeDtypeStruct((s.rows, T), jnp.int32), jax.ShapeDtypeStruct((s.rows, T), jnp.bool_),
                               f32(s.rows))

    def loss(self, modules: Mapping[str, nnx.Module], b: ClassifierBatch):
        hidden = backbone_hidden(modules["policy"], b.tokens, b.mask)
        if self.freeze_backbone:
            hidden = jax.lax.stop_gradient(hidden)
        return self.loss_fn(modules["classifier"](hidden, b.mask), b.labels)

    def deliver(self, modules: Mapping[str, nnx.Module], codec: TextCodec, directory: Path) -> Path:
        """Backbone + head + tokenizer + config (load with pf_jax.tasks.instructions.load_soft_scorer)."""
        return export_classifier(modules["policy"], modules["classifier"], codec, self.max_length, directory)

    def final_metrics(self, modules: Mapping[str, nnx.Module], codec: TextCodec, cfg: TrainConfig,
                      run_dir: Path) -> dict[str, Any]:
        """Held-out accuracy, BCE and recall of the classifier (pf_jax.tasks.instructions.reward_model)."""
        return {"classifier_eval": evaluate_classifier(modules["policy"], modules["classifier"], codec, cfg, run_dir)}
