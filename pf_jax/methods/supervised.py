"""The supervised objective: SFT on dataset responses (gradient coefficient 1), and rejection-sampling
fine-tuning on samples of the reference (RFT) or of the policy (online RFT), where each sample is weighted
by 1(its reward >= 1): only the correct ones are learned from."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.methods.batches import BatchShape, SupervisedBatch, abstract_sequences, f32
from pf_jax.methods.protocols import Completions, Metrics, Needs, ObjectiveDefaults
from pf_jax.methods.scoring import policy_terms


@dataclass(frozen=True)
class Supervised(ObjectiveDefaults):
    loss_fn: Callable[..., Any]
    keep_correct_only: bool
    chunk_size: int

    @property
    def needs(self) -> Needs:
        return Needs(reward=self.keep_correct_only)

    def batch(self, r: Completions) -> tuple[SupervisedBatch, Metrics]:
        if not self.keep_correct_only:
            return SupervisedBatch(r.seq), {}
        weights = (r.rewards >= 1.0).astype(np.float32)
        return SupervisedBatch(r.seq, jnp.asarray(weights)), {"kept_fraction": float(weights.mean())}

    def abstract_batch(self, s: BatchShape) -> SupervisedBatch:
        seq = abstract_sequences(s.rows, s.prompt_len, s.response_len)
        return SupervisedBatch(seq, f32(s.rows) if self.keep_correct_only else None)

    def loss(self, modules: Mapping[str, nnx.Module], b: SupervisedBatch):
        logp, _, _, metrics = policy_terms(modules["policy"], b.seq, self.chunk_size)
        value, m = self.loss_fn(logp=logp, mask=b.seq.loss_mask, weights=b.weights)
        return value, {**metrics, **m}
