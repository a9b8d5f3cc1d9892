"""The shared update: accumulation equals the full batch, non-finite steps are skipped and reported."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pf_jax.training.step import TrainState, make_train_step


def _setup(lr=0.1):
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(lr)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"policy": params},
        opt_state=tx.init({"policy": params}),
        rng=jax.random.key(0),
    )
    return {"policy": graphdef}, tx, state


def mse(modules, batch):
    pred = modules["policy"](batch["x"])[:, 0]
    err = (pred - batch["y"]) ** 2
    return err.mean(), {"max_err": err.max()}


def test_microbatch_accumulation_matches_full_batch():
    graphdefs, tx, state = _setup()
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=8), jnp.float32),
    }
    full, m_full = jax.jit(make_train_step(graphdefs, mse, tx))(state, batch)
    acc, m_acc = jax.jit(make_train_step(graphdefs, mse, tx, microbatches=4))(state, batch)
    chex.assert_trees_all_close(full.params, acc.params, atol=1e-6)
    np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-6)
    assert int(acc.step) == 1 and float(m_acc["skipped"]) == 0.0


def test_non_finite_loss_skips_update_and_reports():
    graphdefs, tx, state = _setup()
    batch = {"x": jnp.ones((2, 4)), "y": jnp.array([jnp.nan, 0.0])}
    new, metrics = jax.jit(make_train_step(graphdefs, mse, tx))(state, batch)
    assert float(metrics["skipped"]) == 1.0
    assert not np.isfinite(float(metrics["loss"]))
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)
    assert int(new.step) == 1


def test_bf16_compute_keeps_fp32_master_weights():
    graphdefs, tx, state = _setup()
    batch = {"x": jnp.ones((2, 4)), "y": jnp.zeros(2)}
    new, metrics = jax.jit(make_train_step(graphdefs, mse, tx, compute_dtype=jnp.bfloat16))(state, batch)
    for leaf in jax.tree_util.tree_leaves(new.params):
        assert leaf.dtype == jnp.float32
    assert float(metrics["skipped"]) == 0.0
    assert not jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), new.params, state.params)
    )


def test_finite_gradients_with_an_overflowing_update_are_skipped():
    """optimizer.lr=1e39 in the probe: the loss and gradients were finite, the updated parameters were not,
    and they were applied. The guard now checks the update too."""
    graphdefs, tx, state = _setup(lr=3e38)
    batch = {"x": jnp.full((2, 4), 10.0), "y": jnp.zeros(2)}
    new, metrics = jax.jit(make_train_step(graphdefs, mse, tx))(state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["skipped"]) == 1.0
    chex.assert_trees_all_equal(new.params, state.params)
    # the same step with a sane learning rate applies
    graphdefs, tx, state = _setup(lr=1e-3)
    new, metrics = jax.jit(make_train_step(graphdefs, mse, tx))(state, batch)
    assert float(metrics["skipped"]) == 0.0


def test_skip_guard_stops_only_after_steps_whose_every_update_was_skipped(capsys):
    import pytest

    from pf_jax.training.guards import SkipGuard, TrainingStalledError

    guard = SkipGuard(max_consecutive=2, total_steps=10, updates_per_step=4, lr=5.0)
    nan = float("nan")
    guard.observe(1, {"skipped": 4.0, "loss": nan, "grad_norm": nan})
    guard.observe(2, {"skipped": 2.0, "loss": 0.5, "grad_norm": 1.0})  # two updates applied: not stalled
    guard.observe(3, {"skipped": 4.0, "loss": 0.5, "grad_norm": 1.0})
    assert "step 2: 2 of 4 update(s) skipped" in capsys.readouterr().out
    with pytest.raises(TrainingStalledError, match=r"steps 3-4 was skipped .*update is not: likely optimizer.lr=5"):
        guard.observe(4, {"skipped": 4.0, "loss": 0.5, "grad_norm": 1.0})
    last = SkipGuard(max_consecutive=20, total_steps=2, updates_per_step=1, lr=1e-3)
    last.observe(1, {"skipped": 1.0, "loss": nan, "grad_norm": nan})
    with pytest.raises(TrainingStalledError, match=r"steps 1-2 .*the loss is nan"):
        last.observe(2, {"skipped": 1.0, "loss": nan, "grad_norm": nan})
