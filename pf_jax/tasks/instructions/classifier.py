"""Constraint-wise binary classifier reward model: P(response adheres to a soft constraint).

Self-supervised IF (arXiv 2510.14420): input "Response: {r}. Constraint: {c}", a backbone's hidden states,
mean pooling over the valid tokens, an MLP, one logit; trained on curriculum pseudo-labels
(`pf_jax.tasks.instructions.pseudo_labels`) by the trainer's `reward_model` recipe. `make_soft_scorer` turns
backbone + head into the soft scorer that `InstructionReward` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.models.heads import masked_mean_pool

SoftScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]
"""(responses [N], constraint texts [N]) -> P(adheres) [N] in [0, 1]."""

TextEncoder = Callable[[Sequence[str]], tuple[jax.Array, jax.Array]]
"""texts [B] -> (hidden states [B, T, D], mask [B, T]) of a backbone."""


def format_classifier_input(response: str, constraint: str) -> str:
    """The classifier's input text, exactly as in the paper: "Response: {r}. Constraint: {c}"."""
    return f"Response: {response}. Constraint: {constraint}"


class ConstraintClassifierHead(nnx.Module):
    """logit = w2 . gelu(W1 . mean_pool(h, mask) + b1) + b2 over a backbone's hidden states."""

    def __init__(self, hidden_dim: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(hidden_dim, mlp_dim, rngs=rngs)
        self.out = nnx.Linear(mlp_dim, 1, rngs=rngs)

    def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:  # [B,T,D], [B,T] -> logits [B]
        pooled = masked_mean_pool(hidden.astype(jnp.float32), mask)
        return self.out(jax.nn.gelu(self.hidden(pooled)))[:, 0]


@nnx.jit
def _head_probabilities(head: ConstraintClassifierHead, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(head(hidden, mask))


def make_soft_scorer(encode: TextEncoder, head: ConstraintClassifierHead, batch_size: int = 16) -> SoftScorer:
    """A soft scorer: format each (response, constraint), encode in batches of `batch_size`, sigmoid(logit).

    The last batch is padded with empty strings to `batch_size` so the head compiles once per sequence
    length the encoder returns (the encoder should bucket its lengths).
    """

    def score(responses: Sequence[str], constraints: Sequence[str]) -> np.ndarray:
        if len(responses) != len(constraints):
            raise ValueError(f"soft scorer: {len(responses)} responses but {len(constraints)} constraints")
        texts = [format_classifier_input(r, c) for r, c in zip(responses, constraints)]
        probs = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            hidden, mask = encode(chunk + [""] * (batch_size - len(chunk)))
            probs.append(np.asarray(_head_probabilities(head, hidden, mask))[: len(chunk)])
        return np.concatenate(probs) if probs else np.zeros((0,), np.float32)

    return score
