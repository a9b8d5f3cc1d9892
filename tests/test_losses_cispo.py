"""CISPO (MiniMax-M1, arXiv 2506.13585, Eq. 4-5), from the paper's definition:

    J = 1 / sum_i |o_i| * sum_i sum_t sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A_t log pi(o_t)

so d(-J)/d log pi(o_t) = -clip(r_t) A_t / N for every response token (N the batch's tokens), whatever
r_t is, and 0 on padding. PPO's gradient is 0 for a token whose ratio left the trust region on the side
its advantage pushes; CISPO's is not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pf_jax.losses import cispo_loss, kl_per_token, ppo_clip_loss
from pf_jax.methods.registry import get_method, make_loss_fn

B, T = 4, 6
MASK = np.arange(T)[None, :] < np.array([6, 2, 4, 1])[:, None]


def grad_coefficient(loss_fn, logp, old, adv, mask=MASK, **kw):
    return np.asarray(jax.grad(lambda lp: loss_fn(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                                  **kw)[0])(jnp.asarray(logp)))


def expected(logp, old, adv, mask=MASK, lo=None, hi=5.0):
    w = np.clip(np.exp(logp - old), lo if lo is not None else -np.inf, hi)
    a = adv[:, None] if adv.ndim == 1 else adv
    return np.where(mask, -w * a / mask.sum(), 0.0)


floats = st.floats(-3.0, 3.0, allow_subnormal=False, width=32)


@given(logp=hnp.arrays(np.float32, (B, T), elements=st.floats(-6.0, -0.0625, width=32)),
       shift=hnp.arrays(np.float32, (B, T), elements=floats),
       adv=hnp.arrays(np.float32, (B,), elements=floats),
       hi=st.floats(1.5, 8.0), lo=st.one_of(st.none(), st.floats(0.0, 0.9)))
def test_gradient_is_the_clipped_weight_times_the_advantage_on_every_token(logp, shift, adv, hi, lo):
    old = logp - shift  # ratios exp(shift) from e^-3 to e^3: inside and far outside any trust region
    got = grad_coefficient(cispo_loss, logp, old, adv, max_weight=hi, min_weight=lo)
    np.testing.assert_allclose(got, expected(logp, old, adv, lo=lo, hi=hi), rtol=2e-5, atol=1e-7)


def test_tokens_ppo_drops_keep_their_gradient():
    logp = np.full((B, T), -1.0, np.float32)
    old = logp - np.log(3.0)  # ratio 3 on every token: outside PPO's [0.8, 1.2]
    adv = np.array([1.0, 1.0, -1.0, 2.0], np.float32)
    ppo = grad_coefficient(ppo_clip_loss, logp, old, adv, clip_low=0.2)
    cispo = grad_coefficient(cispo_loss, logp, old, adv)
    positive = MASK & (adv[:, None] > 0)
    assert np.all(ppo[positive] == 0.0)  # PPO: clipped, no gradient
    np.testing.assert_allclose(cispo[positive], (-3.0 * np.broadcast_to(adv[:, None], (B, T)) / MASK.sum())[positive],
                               rtol=1e-5)
    capped = grad_coefficient(cispo_loss, logp, old, adv, max_weight=2.0)  # the weight is capped, not dropped
    np.testing.assert_allclose(capped[MASK], expected(logp, old, adv, hi=2.0)[MASK], rtol=1e-5)


def test_on_policy_it_is_reinforce_and_equals_grpo():
    rng = np.random.default_rng(0)
    logp = -np.abs(rng.normal(size=(B, T))).astype(np.float32) - 0.1
    adv = rng.normal(size=B).astype(np.float32)
    cispo = grad_coefficient(cispo_loss, logp, logp, adv)
    np.testing.assert_allclose(cispo, np.where(MASK, -adv[:, None] / MASK.sum(), 0.0), rtol=1e-5, atol=1e-8)
    ppo = grad_coefficient(ppo_clip_loss, logp, logp, adv, clip_low=0.2)
    np.testing.assert_allclose(cispo, ppo, rtol=1e-5, atol=1e-8)


def test_value_padding_and_kl_term():
    rng = np.random.default_rng(1)
    logp = -np.abs(rng.normal(size=(B, T))).astype(np.float32) - 0.1
    old = logp + rng.normal(size=(B, T)).astype(np.float32)
    ref = logp + 0.3 * rng.normal(size=(B, T)).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    garbage = np.where(MASK, logp, np.nan).astype(np.float32)  # padding must not leak into the loss
    loss, metrics = cispo_loss(jnp.asarray(garbage), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(MASK))
    w = np.minimum(np.exp(logp - old), 5.0)
    want = np.sum(np.where(MASK, -w * adv[:, None] * logp, 0.0)) / MASK.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert 0.0 < float(metrics["is_weight_clip_fraction"]) < 1.0
    with_kl, _ = cispo_loss(*map(jnp.asarray, (logp, old, adv, MASK)), ref_logp=jnp.asarray(ref), kl_coef=0.1)
    kl = np.asarray(kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k3"))
    np.testing.assert_allclose(float(with_kl) - float(cispo_loss(*map(jnp.asarray, (logp, old, adv, MASK)))[0]),
                               0.1 * np.sum(np.where(MASK, kl, 0.0)) / MASK.sum(), rtol=1e-4)


def test_bad_settings_are_errors():
    x = jnp.zeros((B, T))
    with pytest.raises(ValueError, match="min_weight < max_weight"):
        cispo_loss(x, x, jnp.zeros(B), jnp.asarray(MASK), max_weight=1.0, min_weight=2.0)
    with pytest.raises(ValueError, match="needs ref_logp"):
        cispo_loss(x, x, jnp.zeros(B), jnp.asarray(MASK), kl_coef=0.1)


def test_the_method_is_grpo_advantages_with_the_cispo_loss():
    method = get_method("cispo")
    assert method.loss.fn is cispo_loss and method.estimator is get_method("grpo").estimator
    assert method.reward and method.responses == "policy"
    loss = make_loss_fn("cispo", max_weight=2.0)
    assert loss.keywords == {"max_weight": 2.0}
