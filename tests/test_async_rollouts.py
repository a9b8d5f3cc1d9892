"""rollout.mode=async (pf_jax.training.async_rollouts): rollouts sampled by an older policy on a thread,
corrected by truncated importance sampling (pf_jax.losses.importance).

Written from the definitions: rollout s is sampled by the parameters of step max(0, s - k); the loss's ratio
is taken against the policy before the update; the TIS weight is min(exp(log pi_before - log mu), C) with mu
the sampler's own log-probs; staleness 0 is synchronous training bit for bit; a resumed run ends with the
parameters of an uninterrupted one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.losses.importance import truncated_importance_weights, weighted_advantages
from pf_jax.training.trainer import Trainer
from tests.test_trainer_methods import TINY as METHOD_TINY
from tests.test_user_errors import train_fails

TINY = [*METHOD_TINY, "steps=3", "optimizer.lr=3e-3"]  # later overrides win
METHODS = {"grpo": ["method.name=grpo", "reward.name=entropy"],
           "powerflow": ["method.name=powerflow", "reward.format_penalty=-0.5"]}
ASYNC = ["rollout.mode=async"]


def trainer(tmp_path, *overrides, name="r"):
    cfg = load_config(TrainConfig, None, [*TINY, f"logging.runs_dir={tmp_path}", f"logging.run_name={name}",
                                          *overrides])
    return Trainer(cfg)


def host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def assert_identical(a, b):
    la, lb = jax.tree_util.tree_leaves(host(a)), jax.tree_util.tree_leaves(host(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


# --- the weights, from their definition --------------------------------------------------------------

def test_tis_weights_from_the_definition():
    rng = np.random.default_rng(0)
    prox, beh = rng.normal(-2, 1, (3, 5)).astype(np.float32), rng.normal(-2, 1, (3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    w, m = truncated_importance_weights(jnp.asarray(prox), jnp.asarray(beh), jnp.asarray(mask), 1.5, "token")
    expected = np.where(mask, np.minimum(np.exp(prox - beh), 1.5), 1.0)
    np.testing.assert_allclose(np.where(mask, w, 1.0), expected, rtol=1e-6)
    assert float(m["tis_truncated_fraction"]) == pytest.approx(((np.exp(prox - beh) > 1.5) & mask).sum() / mask.sum())
    seq_gap = np.where(mask, prox - beh, 0).sum(1)
    w, _ = truncated_importance_weights(jnp.asarray(prox), jnp.asarray(beh), jnp.asarray(mask), 3.0, "sequence")
    np.testing.assert_allclose(w, np.minimum(np.exp(seq_gap), 3.0), rtol=1e-5)
    w, _ = truncated_importance_weights(jnp.asarray(prox), jnp.asarray(beh), jnp.asarray(mask), 3.0, "geometric")
    np.testing.assert_allclose(w, np.minimum(np.exp(seq_gap / np.maximum(mask.sum(1), 1)), 3.0), rtol=1e-5)
    adv = jnp.asarray([1.0, -2.0, 0.5])
    tw = jnp.full((3, 5), 0.5)
    np.testing.assert_allclose(weighted_advantages(adv, tw, jnp.asarray(mask)), np.broadcast_to(adv[:, None] * 0.5, (3, 5)))
    np.testing.assert_allclose(weighted_advantages(adv, jnp.asarray([2.0, 1.0, 0.0]), jnp.asarray(mask)), [2.0, -2.0, 0.0])


def test_weights_are_not_differentiated():
    grad = jax.grad(lambda p: truncated_importance_weights(p, jnp.zeros((1, 3)), jnp.ones((1, 3), bool), 2.0)[0].sum())
    np.testing.assert_array_equal(grad(jnp.full((1, 3), 0.3)), 0.0)


# --- the trainer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["grpo", "powerflow"])
def test_staleness_zero_is_synchronous_bit_for_bit(tmp_path, method):
    sync = trainer(tmp_path, *METHODS[method], name="sync")
    sync.run()
    zero = trainer(tmp_path, *METHODS[method], *ASYNC, "rollout.max_staleness=0", name="zero")
    zero.run()
    assert_identical(sync.state.params, zero.state.params)


@pytest.mark.parametrize("method", ["grpo", "powerflow"])
def test_ratio_and_weights_use_the_true_behaviour_logprobs(tmp_path, method):
    """Step 1 of a k = 1 run learns on samples of the step-0 parameters: their log-probs are the sampler's
    under those parameters (teacher forcing agrees), the ratio is taken against the step-1 policy, and the
    weights are min(pi_1 / pi_0, C) of exactly these."""
    t = trainer(tmp_path, *METHODS[method], *ASYNC, "rollout.max_staleness=1", "rollout.tis_cap=1.02")
    theta0 = jax.tree_util.tree_map(jnp.copy, t.state.params)
    info0 = t.train_one_step(0)
    theta1 = jax.tree_util.tree_map(jnp.copy, t.state.params)
    info1 = t.train_one_step(1)
    assert (info0["rollout/staleness"], info1["rollout/staleness"]) == (0.0, 1.0)
    responses, batch = t.last_rollout
    mask = np.asarray(responses.seq.response_mask)
    score = lambda params: np.asarray(t.scorer.logprobs(t.models(params).params["policy"], responses.seq))
    lp0, lp1 = score(theta0), score(theta1)
    np.testing.assert_allclose(np.where(mask, responses.behaviour_logp, 0), np.where(mask, lp0, 0), atol=2e-5)
    assert np.abs(np.where(mask, lp1 - lp0, 0)).max() > 1e-3  # the policy moved: the samples are stale
    np.testing.assert_array_equal(np.asarray(responses.proximal_logp), lp1)
    np.testing.assert_array_equal(np.asarray(batch.old_logp), lp1)
    gap = np.where(mask, lp1 - np.asarray(responses.behaviour_logp), 0.0)
    if method == "grpo":
        expected = np.minimum(np.exp(gap), 1.02)
        np.testing.assert_allclose(np.where(mask, responses.importance_weight, 0), np.where(mask, expected, 0), rtol=1e-6)
    else:  # PowerFlow: one weight per sequence, into the loss's weight
        expected = np.minimum(np.exp(gap.sum(1)), 1.02)
        np.testing.assert_allclose(responses.importance_weight, expected, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(batch.behaviour_weight), np.asarray(responses.importance_weight))
    assert info1["tis/truncated_fraction"] > 0  # the cap of 1.02 is reached: truncation is exercised


def test_without_a_cap_the_ratio_is_taken_against_the_sampler(tmp_path):
    """rollout.tis_cap=null (an ablation): no correction, the ratio against the sampler's log-probs as in sync."""
    t = trainer(tmp_path, *METHODS["grpo"], *ASYNC, "rollout.tis_cap=null")
    t.train_one_step(0)
    info = t.train_one_step(1)
    responses, batch = t.last_rollout
    assert info["rollout/staleness"] == 1.0 and not any(k.startswith("tis/") for k in info)
    assert responses.proximal_logp is None and responses.importance_weight is None
    np.testing.assert_array_equal(np.asarray(batch.old_logp), np.asarray(responses.behaviour_logp))
    t.pipeline.close()


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_a_pending_rollout_is_sampled_by_the_old_parameters(tmp_path, batching):
    """With k = 2 the rollout of step 2 is sampled by the step-0 parameters: it equals a fresh synchronous
    sampling of step 2's rows with step 2's key under those parameters (either sampler)."""
    t = trainer(tmp_path, *METHODS["grpo"], *ASYNC, "rollout.max_staleness=2", "steps=4",
                f"rollout.batching={batching}", "rollout.slots=4")
    theta0 = jax.tree_util.tree_map(jnp.copy, t.state.params)
    for step in range(3):
        info = t.train_one_step(step)
    assert info["rollout/staleness"] == 2.0
    responses, _ = t.last_rollout
    again = t.responses(responses.rows, t.models(theta0), t.step_key(2))
    np.testing.assert_array_equal(np.asarray(responses.seq.response_tokens), np.asarray(again.seq.response_tokens))
    np.testing.assert_array_equal(np.asarray(responses.behaviour_logp), np.asarray(again.behaviour_logp))
    t.pipeline.close()


@pytest.mark.parametrize("staleness", [1])  # k = 2: tests/test_resume.py kills and resumes a run
def test_resume_is_exact_by_regenerating_the_rollouts_in_flight(tmp_path, staleness):
    """A run stopped after step 2 and resumed from its checkpoint (which holds the parameter versions of the
    rollouts in flight, not the rollouts) ends with the parameters of an uninterrupted run."""
    keys = [*METHODS["grpo"], *ASYNC, f"rollout.max_staleness={staleness}", "checkpoint.every_steps=1", "steps=5"]
    whole = trainer(tmp_path, *keys, name="whole")
    whole.run()
    first = trainer(tmp_path, *keys, "steps=2", name="cut")
    first.run()
    resumed = trainer(tmp_path, *keys, name="cut")
    result = resumed.run()
    assert result.final_step == 5
    assert_identical(whole.state.params, resumed.state.params)


def test_lora_snapshots_hold_only_the_adapters(tmp_path):
    t = trainer(tmp_path, *METHODS["grpo"], *ASYNC, "model.lora={rank: 4}", "checkpoint.every_steps=1")
    t.run()
    tree, _ = t.checkpoint_contents(3)
    assert jax.tree_util.tree_structure(tree["behaviour"][0]) == jax.tree_util.tree_structure(t.state.params)
    assert all("lora" in "/".join(map(str, path)) for path, _ in jax.tree_util.tree_leaves_with_path(tree["behaviour"][0]))


# --- bad input: one line, exit 2 ----------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["rollout.max_staleness=-1"], ["rollout.max_staleness", "must be >= 0, got -1"]),
    (["rollout.tis_cap=0"], ["rollout.tis_cap", "must be > 0, got 0"]),
    (["rollout.tis_cap=-2"], ["rollout.tis_cap", "must be > 0"]),
    (["rollout.mode=async", "method.name=sft", "data.source=arithmetic_noisy", "data.answer_field=completion"],
     ["rollout.mode=async", "method 'sft' has no importance ratio", "asynchronous rollouts support ppo, grpo"]),
    (["rollout.mode=async", "method.name=dpo", "data.source=arithmetic_pairs"],
     ["method 'dpo' has no importance ratio", "powerflow"]),
    (["rollout.mode=async", "method.name=online_dpo", "reward.name=arithmetic"], ["method 'online_dpo'"]),
    (["rollout.mode=sideways"], ["rollout.mode", "'sync' or 'async'"]),
    (["rollout.devices=0"], ["rollout.devices", "must be >= 1, got 0"]),
    (["rollout.mode=async", "rollout.devices=1"], ["rollout.devices=1 leaves none of the 1 devices to the update"]),
], ids=["staleness-negative", "tis-cap-zero", "tis-cap-negative", "async-sft", "async-dpo", "async-online-dpo",
        "unknown-mode", "rollout-devices-zero", "rollout-devices-all"])
def test_bad_async_settings(capsys, tmp_path, overrides, words):
    train_fails(capsys, tmp_path, overrides, *words)
