"""Aggregation modes, the method registry's losses and estimators, and that every method's loss jit-compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pf_jax.losses import (
    aggregate_loss,
    binary_cross_entropy_loss,
    cispo_loss,
    gspo_loss,
    length_aware_tb_loss,
    nll_loss,
    ppo_clip_loss,
    tb_token_loss,
    trajectory_balance_loss,
)
from pf_jax.methods.registry import METHODS, get_method, make_advantage_fn, make_loss_fn

X = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
M = jnp.array([[True, True, True], [True, False, False], [False, False, False]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token_mean", (1 + 2 + 3 + 4) / 4),
        ("seq_mean_token_mean", (2.0 + 4.0) / 2),  # the all-padding row does not count
        ("seq_mean_token_sum", (6.0 + 4.0) / 2),
        ("seq_mean_token_sum_norm", (6.0 + 4.0) / (2 * 8.0)),
    ],
)
def test_aggregation_modes_hand_computed(mode, expected):
    assert float(aggregate_loss(X, M, mode, norm_constant=8.0)) == pytest.approx(expected)


def test_unknown_names_are_errors_with_suggestions():
    with pytest.raises(ValueError, match="did you mean 'grpo'"):
        get_method("grop")
    with pytest.raises(ValueError, match="has no argument 'clip_hi'; did you mean 'clip_high'"):
        make_loss_fn("dapo", clip_hi=0.3)
    with pytest.raises(ValueError, match="has no advantage estimator"):
        make_advantage_fn("dpo")


def _inputs(rng, b=4, t=5):
    mask = jnp.asarray(np.arange(t)[None, :] < np.array([5, 3, 2, 4])[:, None])
    lp = lambda: jnp.asarray(-np.abs(rng.normal(size=(b, t))))
    return mask, lp


def _call(name, rng):
    mask, lp = _inputs(rng)
    fn = make_loss_fn(name)
    method = get_method(name)
    adv = jnp.asarray(rng.normal(size=4))
    if name in ("ppo", "reinforce_pp", "grpo_process") or method.responses == "env":
        adv = jnp.asarray(rng.normal(size=(4, 5)))
    if method.loss.fn in (ppo_clip_loss, gspo_loss, cispo_loss):
        kwargs = {"norm_constant": 5.0} if name == "dr_grpo" else {}
        if method.loss.defaults.get("kl_coef", 0.0):
            kwargs["ref_logp"] = lp()
        return jax.jit(lambda a, b: fn(a, b, adv, mask, **kwargs))(lp(), lp())
    if name == "powerflow":
        return jax.jit(lambda a: fn(a, lp(), lp(), mask, jnp.zeros(4), alpha=4.0))(lp())
    if method.loss.fn in (trajectory_balance_loss, length_aware_tb_loss, tb_token_loss):
        return jax.jit(lambda a: fn(a, mask, jnp.asarray(rng.normal(size=4)), jnp.zeros(())))(lp())
    if name in ("simpo", "orpo"):
        return jax.jit(lambda a, b: fn(a, b, mask, mask))(lp(), lp())
    if method.loss.fn is nll_loss:
        return jax.jit(lambda a: fn(a, mask))(lp())
    if method.loss.fn is binary_cross_entropy_loss:
        return jax.jit(lambda z: fn(z, jnp.array([1.0, 0.0, 1.0, 0.0])))(jnp.asarray(rng.normal(size=4)))
    if name == "kto":
        return jax.jit(lambda a: fn(a, lp(), mask, jnp.array([True, False, True, False]), 0.1))(lp())
    return jax.jit(lambda a, b: fn(a, b, lp(), lp(), mask, mask))(lp(), lp())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_jit_compiles_to_a_finite_scalar_with_scalar_metrics(name):
    loss, metrics = _call(name, np.random.default_rng(0))
    assert loss.shape == () and bool(jnp.isfinite(loss))
    assert all(v.shape == () for v in metrics.values()), {k: v.shape for k, v in metrics.items()}
