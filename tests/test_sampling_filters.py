"""Sampling filters against a float64 numpy reference (sort-based, the textbook definitions), the
inverse-CDF sampler against exact probabilities, and the validation of SamplingParams."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pf_jax.sampling.filters import SamplingParams, filtered_logits, sample_categorical, sample_next_token


def reference_filter(z: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Kept-token mask [B, V] by sorting, in float64; also returns the margins to every decision boundary."""
    z = z.astype(np.float64)
    if p.greedy:
        keep = np.zeros_like(z, bool)
        keep[np.arange(len(z)), z.argmax(-1)] = True
        return keep, np.inf
    z = z / p.temperature
    keep = np.ones_like(z, bool)
    margin = np.inf
    if p.top_k:
        kth = np.sort(z, -1)[:, ::-1][:, min(p.top_k, z.shape[1]) - 1 : min(p.top_k, z.shape[1])]
        keep &= z >= kth
    for row in range(len(z)):
        if p.top_p < 1.0:
            zr = np.where(keep[row], z[row], -np.inf)
            probs = np.exp(zr - zr.max())
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")
            mass = np.cumsum(probs[order])
            cut = int(np.searchsorted(mass, p.top_p))  # first prefix with mass >= top_p
            cut = min(cut, len(order) - 1)
            threshold = probs[order[cut]]
            keep[row] &= probs >= threshold
            margin = min(margin, np.min(np.abs(mass - p.top_p)))
        if p.min_p > 0.0:
            zr = np.where(keep[row], z[row], -np.inf)
            ratio = np.exp(zr - zr.max())
            keep[row] &= ratio >= p.min_p
            margin = min(margin, np.min(np.abs(ratio - p.min_p)))
    return keep, margin


def reference_logprobs(z: np.ndarray, p: SamplingParams) -> np.ndarray:
    keep, _ = reference_filter(z, p)
    zt = z.astype(np.float64) / (p.temperature or 1.0)
    zt = np.where(keep, zt, -np.inf)
    return zt - np.log(np.sum(np.exp(zt - zt.max(-1, keepdims=True)), -1, keepdims=True)) - zt.max(-1, keepdims=True)


params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 3, 10, 100]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
)


@given(params=params_strategy, seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 60),
       batch=st.integers(1, 3), scale=st.sampled_from([0.5, 3.0]))
def test_filtered_logits_match_numpy_reference(params, seed, vocab, batch, scale):
    z = np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * scale
    keep, margin = reference_filter(z, params)
    assume(margin > 1e-4)  # float32 vs float64 may legitimately differ exactly at a boundary
    ours = np.asarray(filtered_logits(jnp.asarray(z), params))
    chex.assert_shape(ours, (batch, vocab))
    np.testing.assert_array_equal(np.isfinite(ours), keep)
    assert keep.any(-1).all()  # the most probable token always survives
    if not params.greedy:
        ours_logp = np.asarray(jax.nn.log_softmax(jnp.asarray(ours), -1))
        ref_logp = reference_logprobs(z, params)
        np.testing.assert_allclose(ours_logp[keep], ref_logp[keep], rtol=1e-5, atol=1e-5)


def test_top_p_keeps_ties_with_the_threshold_and_stops_at_the_smallest_nucleus():
    probs = np.array([[0.4, 0.2, 0.2, 0.1, 0.1]])
    z = jnp.asarray(np.log(probs), jnp.float32)
    kept = lambda top_p: np.isfinite(np.asarray(filtered_logits(z, SamplingParams(top_p=top_p))))[0].tolist()
    assert kept(0.35) == [True, False, False, False, False]
    assert kept(0.5) == [True, True, True, False, False]  # 0.2 ties: both kept
    assert kept(0.85) == [True, True, True, True, True]


def test_sample_categorical_frequencies_match_probabilities():
    # V = 37 is not a power of two (exercises the padded last block); two tokens are impossible.
    rng = np.random.default_rng(0)
    z = rng.normal(size=37).astype(np.float32) * 1.5
    z[[4, 30]] = -np.inf
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    draws = 40_000
    tokens = np.asarray(sample_categorical(jax.random.key(1), jnp.broadcast_to(jnp.asarray(z), (draws, 37))))
    freq = np.bincount(tokens, minlength=37) / draws
    assert freq[4] == 0 and freq[30] == 0
    sigma = np.sqrt(probs * (1 - probs) / draws)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-12), np.max(np.abs(freq - probs) / (sigma + 1e-12))


def test_sample_categorical_on_a_large_peaked_vocabulary():
    z = np.full((4, 70_000), -30.0, np.float32)
    z[0, 12_345] = 0.0  # one token with all the mass
    z[1, -1] = 0.0  # the very last token (end of the padded last block)
    z[2, 0] = 0.0
    z[3, [7, 69_998]] = 0.0  # two tokens, far apart
    tokens = np.asarray(sample_categorical(jax.random.key(0), jnp.asarray(z)))
    assert tokens[:3].tolist() == [12_345, 69_999, 0]
    assert tokens[3] in (7, 69_998)


def test_sample_next_token_scores_under_policy_and_sampling_distributions():
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.normal(size=(5, 40)) * 2.0, jnp.float32)
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.9)
    excluded = jnp.asarray([[1, 40]] * 5, jnp.int32)  # 40 is out of range: ignored
    token, policy_logp, sample_logp = sample_next_token(jax.random.key(0), z, params, excluded)
    z_excluded = z.at[:, 1].set(-jnp.inf)
    q = jax.nn.log_softmax(filtered_logits(z_excluded, params), -1)
    rows = np.arange(5)
    np.testing.assert_allclose(policy_logp, jax.nn.log_softmax(z, -1)[rows, token], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sample_logp, q[rows, token], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(q)[rows, np.asarray(token)]))
    assert not np.any(np.asarray(token) == 1)

    greedy_token, greedy_policy, greedy_q = sample_next_token(jax.random.key(0), z, SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(greedy_token, np.argmax(np.asarray(z), -1))
    np.testing.assert_array_equal(greedy_q, 0.0)
    np.testing.assert_allclose(greedy_policy, jax.nn.log_softmax(z, -1)[rows, greedy_token], rtol=1e-6)


def test_plain_temperature_one_sampling_logprobs_equal_policy_logprobs():
    z = jnp.asarray(np.random.default_rng(4).normal(size=(3, 30)), jnp.float32)
    _, policy_logp, sample_logp = sample_next_token(jax.random.key(2), z, SamplingParams())
    np.testing.assert_array_equal(policy_logp, sample_logp)
    # With excluded tokens (EOS before min_new_tokens) the sampling distribution renormalises without them.
    excluded = jnp.asarray([[0, 5], [0, 5], [29, 30]], jnp.int32)
    tokens = []
    for seed in range(40):
        token, policy_logp, sample_logp = sample_next_token(jax.random.key(seed), z, SamplingParams(), excluded)
        q = jax.nn.log_softmax(z.at[jnp.arange(3)[:, None], excluded].set(-jnp.inf, mode="drop"), -1)
        np.testing.assert_allclose(sample_logp, q[jnp.arange(3), token], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(policy_logp, jax.nn.log_softmax(z, -1)[jnp.arange(3), token], rtol=1e-5, atol=1e-6)
        tokens.append(np.asarray(token))
    tokens = np.stack(tokens)
    assert not np.isin(tokens[:, :2], [0, 5]).any() and not (tokens[:, 2] == 29).any()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": -0.2}, "min_p"),
])
def test_invalid_sampling_params_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_excluding_a_dominant_token_still_draws_and_scores_exactly():
    # EOS holds all but e^-100 of the mass and is excluded (before min_new_tokens): the draw must come
    # from the remaining tokens, with finite, exact log-probs under both distributions.
    z = np.zeros((2, 50), np.float32)
    z[:, 7] = 100.0
    z[1, 3] = 2.0
    excluded = jnp.asarray([[7, 50]] * 2, jnp.int32)  # 50 is out of range: ignored
    token, policy_logp, sample_logp = sample_next_token(jax.random.key(0), jnp.asarray(z), SamplingParams(), excluded)
    assert not np.any(np.asarray(token) == 7)
    z64 = z.astype(np.float64)
    for row in range(2):
        kept = np.delete(z64[row], 7)
        t = int(token[row])
        np.testing.assert_allclose(sample_logp[row], z64[row, t] - np.log(np.sum(np.exp(kept))), atol=1e-5)
        np.testing.assert_allclose(policy_logp[row], z64[row, t] - (100.0 + np.log1p(np.sum(np.exp(kept - 100.0)))),
                                   atol=1e-4)
