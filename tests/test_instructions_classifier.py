"""Constraint classifier head, soft scorer, and the synthetic soft-constraint generator."""

import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from pf_jax.tasks.instructions.classifier import (
    ConstraintClassifierHead,
    format_classifier_input,
    make_soft_scorer,
    masked_mean_pool,
)
from pf_jax.tasks.instructions.curriculum import build_levels
from pf_jax.tasks.instructions.reward import InstructionReward
from pf_jax.tasks.instructions.soft_constraints import (
    SOFT_CONSTRAINTS,
    synthetic_classifier_inputs,
    synthetic_multi_constraint_instructions,
    synthetic_soft_examples,
)

VOCAB, DIM, MAX_T = 16384, 16, 32


def test_input_format_is_the_papers():
    assert format_classifier_input("I saw a dog", "Mention an animal.") == \
        "Response: I saw a dog. Constraint: Mention an animal."


@settings(max_examples=10)
@given(b=st.integers(1, 3), t=st.integers(1, 6), d=st.integers(1, 4), seed=st.integers(0, 1000))
def test_masked_mean_pool_matches_loop(b, t, d, seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, t, d)).astype(np.float32)
    m = (rng.random((b, t)) < 0.6).astype(np.float32)
    got = np.asarray(masked_mean_pool(jnp.asarray(h), jnp.asarray(m)))
    for i in range(b):
        valid = [h[i, j] for j in range(t) if m[i, j]]
        want = np.mean(valid, axis=0) if valid else np.zeros(d)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_head_ignores_padding_and_has_gradients():
    head = ConstraintClassifierHead(DIM, 8, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (2, 5, DIM))
    m = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
    garbage = h.at[0, 3:].set(1e3)
    logits = head(h, m)
    chex.assert_shape(logits, (2,))
    np.testing.assert_allclose(head(garbage, m), logits, rtol=1e-6)
    grads = nnx.grad(lambda mod: mod(h, m).sum())(head)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


class WordHashEncoder(nnx.Module):
    """A tiny real backbone for tests: crc32 word ids -> embeddings; hidden [B, MAX_T, DIM] + mask.

    Zero-initialised so words never seen in training (held-out topics) pool to nothing, not to noise.
    """

    def __init__(self, rngs, init=None):
        init = nnx.initializers.zeros_init() if init is None else init
        self.embed = nnx.Embed(VOCAB, DIM, embedding_init=init, rngs=rngs)

    @staticmethod
    def tokenize(texts):
        ids = np.zeros((len(texts), MAX_T), np.int32)
        mask = np.zeros((len(texts), MAX_T), np.float32)
        for i, text in enumerate(texts):
            words = text.lower().replace(".", " ").split()[:MAX_T]
            ids[i, : len(words)] = [zlib.crc32(w.encode()) % VOCAB for w in words]
            mask[i, : len(words)] = 1
        return jnp.asarray(ids), jnp.asarray(mask)

    def __call__(self, ids):
        return self.embed(ids)


def _train(encoder, head, texts, labels, steps=150):
    model = nnx.List([encoder, head])
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    ids, mask = WordHashEncoder.tokenize(texts)
    y = jnp.asarray(labels, jnp.float32)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits = model[1](model[0](ids), mask)
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(steps)]
    return losses


@pytest.mark.parametrize("name", ["animal", "cheerful"])
def test_classifier_learns_a_synthetic_soft_constraint(name):
    encoder, head = WordHashEncoder(nnx.Rngs(0)), ConstraintClassifierHead(DIM, 16, rngs=nnx.Rngs(1))
    texts, labels = synthetic_classifier_inputs(name, 256, seed=0, split="train")
    losses = _train(encoder, head, texts, labels)
    assert losses[-1] < 0.25 * losses[0]
    scorer = make_soft_scorer(lambda t: (encoder(WordHashEncoder.tokenize(t)[0]), WordHashEncoder.tokenize(t)[1]),
                              head, batch_size=32)
    test = synthetic_soft_examples(name, 200, seed=1, split="test")  # unseen topics
    probs = scorer([r for r, _, _ in test], [c for _, c, _ in test])
    acc = float(np.mean((probs > 0.5) == np.array([y for *_, y in test])))
    assert acc >= 0.9, acc


def test_soft_scorer_is_batch_invariant_and_feeds_the_reward():
    encoder = WordHashEncoder(nnx.Rngs(0), nnx.initializers.normal(1.0))
    head = ConstraintClassifierHead(DIM, 8, rngs=nnx.Rngs(1))
    encode = lambda t: (encoder(WordHashEncoder.tokenize(t)[0]), WordHashEncoder.tokenize(t)[1])
    responses = [f"response number {i}" for i in range(5)]
    constraints = ["Mention an animal."] * 5
    a = make_soft_scorer(encode, head, batch_size=2)(responses, constraints)
    b = make_soft_scorer(encode, head, batch_size=8)(responses, constraints)
    chex.assert_shape(a, (5,))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert np.all((a > 0) & (a < 1))
    with pytest.raises(ValueError, match="2 responses but 1 constraints"):
        make_soft_scorer(encode, head)(["a", "b"], ["c"])
    ins = synthetic_multi_constraint_instructions(4, seed=0)
    rows = [row for i in ins for row in build_levels(i)]
    out = InstructionReward(soft_scorer=make_soft_scorer(encode, head, batch_size=4))(rows, ["a note"] * len(rows))
    assert out.reason_counts["scored"] == len(rows)
    assert np.all((out.rewards >= 0) & (out.rewards <= 1))


def test_synthetic_examples_are_balanced_deterministic_and_split():
    ex = synthetic_soft_examples("cheerful", 100, seed=3)
    assert ex == synthetic_soft_examples("cheerful", 100, seed=3)
    assert sum(y for *_, y in ex) == 50
    traits = SOFT_CONSTRAINTS["cheerful"].trait_words
    for response, text, y in ex:
        assert text == "Respond in a cheerful tone."
        assert any(w in response.split(" ") or f"{w}." in response for w in traits) == bool(y)
    train_words = {w for r, *_ in synthetic_soft_examples("animal", 200, 0, "train") for w in r.split()}
    test_words = {w for r, *_ in synthetic_soft_examples("animal", 200, 0, "test") for w in r.split()}
    assert "museum" in test_words and "museum" not in train_words and "garden" not in test_words
    with pytest.raises(KeyError, match="unknown synthetic soft constraint 'sad'"):
        synthetic_soft_examples("sad", 4, 0)
