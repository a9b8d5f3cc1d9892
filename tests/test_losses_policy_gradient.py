"""Gradient coefficients of the policy-gradient losses (methods/unified-rl.md table).

For loss L = -J, dL/dlogp_{i,t} = -GC_{i,t} * (aggregation weight of token (i, t)) at the on-policy point
(logp == old_logp). GC and the weights are computed here from the spec's formulas with numpy, independently
of pf_jax.losses.advantages.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pf_jax.losses import (
    clipped_value_loss,
    entropy_bonus_loss,
    gspo_loss,
    kl_loss,
    kl_shaped_token_rewards,
    ppo_clip_loss,
)
from pf_jax.methods.registry import make_advantage_fn, make_loss_fn

B, T = 6, 7
GROUPS = np.array([0, 0, 0, 1, 1, 1])
LENGTHS = np.array([7, 3, 5, 1, 6, 4])
MASK = np.arange(T)[None, :] < LENGTHS[:, None]
REWARDS = np.array([1.0, 0.0, 0.5, 2.0, -1.0, 0.3])
RNG = np.random.default_rng(0)
LOGP = -np.abs(RNG.normal(size=(B, T))) - 0.1
REF_LOGP = LOGP + 0.3 * RNG.normal(size=(B, T))
BETA_GRPO = 0.04


def grpo_advantage_np(normalize_std: bool) -> np.ndarray:
    out = np.zeros(B)
    for g in np.unique(GROUPS):
        r = REWARDS[g == GROUPS]
        a = r - r.mean()
        out[g == GROUPS] = a / (r.std(ddof=1) + 1e-6) if normalize_std else a
    return out


def rloo_np() -> np.ndarray:
    out = np.zeros(B)
    for i in range(B):
        others = [REWARDS[j] for j in range(B) if GROUPS[j] == GROUPS[i] and j != i]
        out[i] = REWARDS[i] - np.mean(others)
    return out


def whiten_np(x: np.ndarray) -> np.ndarray:
    v = x[MASK]
    return np.where(MASK, (x - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8), 0.0)


def weights(kind: str, norm: float = 0.0) -> np.ndarray:
    if kind == "token_mean":
        w = np.ones((B, T)) / MASK.sum()
    elif kind == "seq_mean_token_mean":
        w = np.ones((B, T)) / (B * LENGTHS[:, None])
    else:  # seq_mean_token_sum_norm
        w = np.ones((B, T)) / (B * norm)
    return np.where(MASK, w, 0.0)


def grad_wrt_logp(loss_fn, **kwargs) -> np.ndarray:
    g = jax.grad(lambda lp: loss_fn(lp, jnp.asarray(LOGP), mask=jnp.asarray(MASK), **kwargs)[0])(
        jnp.asarray(LOGP)
    )
    return np.asarray(g)


def test_grpo_outcome_gradient_is_normalised_advantage_plus_k3_kl_term():
    adv, _ = make_advantage_fn("grpo")(jnp.asarray(REWARDS), jnp.asarray(GROUPS), 2)
    g = grad_wrt_logp(make_loss_fn("grpo"), advantages=adv, ref_logp=jnp.asarray(REF_LOGP))
    gc = grpo_advantage_np(True)[:, None] + BETA_GRPO * (np.exp(REF_LOGP - LOGP) - 1.0)
    np.testing.assert_allclose(g, -gc * weights("seq_mean_token_mean"), rtol=1e-4, atol=1e-7)


def test_dr_grpo_gradient_has_no_std_and_a_constant_normaliser():
    adv, _ = make_advantage_fn("dr_grpo")(jnp.asarray(REWARDS), jnp.asarray(GROUPS), 2)
    g = grad_wrt_logp(make_loss_fn("dr_grpo", norm_constant=float(T)), advantages=adv)
    gc = grpo_advantage_np(False)[:, None]
    np.testing.assert_allclose(g, -gc * weights("norm", T), rtol=1e-5, atol=1e-8)


def test_dapo_gradient_is_token_level():
    adv, _ = make_advantage_fn("dapo")(jnp.asarray(REWARDS), jnp.asarray(GROUPS), 2)
    g = grad_wrt_logp(make_loss_fn("dapo"), advantages=adv)
    np.testing.assert_allclose(
        g, -grpo_advantage_np(True)[:, None] * weights("token_mean"), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_gradient_on_policy_is_advantage_over_length(name):
    adv, _ = make_advantage_fn(name)(jnp.asarray(REWARDS), jnp.asarray(GROUPS), 2)
    g = grad_wrt_logp(make_loss_fn(name), advantages=adv)
    gc = grpo_advantage_np(True)[:, None]
    np.testing.assert_allclose(g, -gc * weights("seq_mean_token_mean"), rtol=1e-4, atol=1e-7)


def test_rloo_gradient_is_leave_one_out_advantage():
    adv, _ = make_advantage_fn("rloo")(jnp.asarray(REWARDS), jnp.asarray(GROUPS), 2)
    g = grad_wrt_logp(make_loss_fn("rloo"), advantages=adv)
    np.testing.assert_allclose(g, -rloo_np()[:, None] * weights("seq_mean_token_mean"), rtol=1e-5, atol=1e-8)


def test_reinforce_pp_baseline_gradient_is_batch_whitened_group_centred_reward():
    adv = make_advantage_fn("reinforce_pp_baseline")(
        jnp.asarray(REWARDS), jnp.asarray(MASK), jnp.asarray(GROUPS), 2
    )
    g = grad_wrt_logp(make_loss_fn("reinforce_pp_baseline"), advantages=adv, ref_logp=jnp.asarray(REF_LOGP))
    centred = np.broadcast_to((REWARDS - _group_mean())[:, None], (B, T))
    gc = whiten_np(centred) + 0.001 * (np.exp(REF_LOGP - LOGP) - 1.0)
    np.testing.assert_allclose(g, -gc * weights("token_mean"), rtol=1e-4, atol=1e-7)


def _group_mean() -> np.ndarray:
    return np.array([REWARDS[GROUPS[i] == GROUPS].mean() for i in range(B)])


def test_reinforce_pp_gradient_is_whitened_return_with_kl_in_reward():
    kl_coef = 0.01
    token_rewards = kl_shaped_token_rewards(
        jnp.asarray(REWARDS), jnp.asarray(LOGP), jnp.asarray(REF_LOGP), jnp.asarray(MASK), kl_coef, "k1"
    )
    adv = make_advantage_fn("reinforce_pp")(token_rewards, jnp.asarray(MASK))
    g = grad_wrt_logp(make_loss_fn("reinforce_pp"), advantages=adv)
    # r_t = -kl_coef (logp - ref) + R on the last token; G_t = sum_{s >= t} r_s (gamma = 1).
    r = np.where(MASK, -kl_coef * (LOGP - REF_LOGP), 0.0)
    r[np.arange(B), LENGTHS - 1] += REWARDS
    returns = np.where(MASK, np.cumsum(r[:, ::-1], axis=1)[:, ::-1], 0.0)
    np.testing.assert_allclose(g, -whiten_np(returns) * weights("token_mean"), rtol=1e-4, atol=1e-7)


def test_ppo_gradient_is_gae_advantage():
    values = RNG.normal(size=(B, T))
    token_rewards = np.where(MASK, RNG.normal(size=(B, T)), 0.0)
    gamma, lam = 0.9, 0.8
    adv, _ = make_advantage_fn("ppo", gamma=gamma, lam=lam)(
        jnp.asarray(token_rewards), jnp.asarray(values), jnp.asarray(MASK)
    )
    g = grad_wrt_logp(make_loss_fn("ppo"), advantages=adv)
    expected_adv = np.zeros((B, T))
    for i in range(B):
        n = LENGTHS[i]
        v_next = np.append(values[i, 1:n], 0.0)
        delta = token_rewards[i, :n] + gamma * v_next - values[i, :n]
        for t in range(n):
            expected_adv[i, t] = sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, n))
    np.testing.assert_allclose(g, -expected_adv * weights("token_mean"), rtol=1e-4, atol=1e-7)


# Hand-enumerated clip cases: (advantage, ratio, gradient active?) for clip_low = clip_high = 0.2,
# dual-clip c = 3.
CLIP_CASES = [
    (1.0, 1.5, False),  # A > 0, ratio above 1 + eps: clipped
    (1.0, 0.5, True),  # A > 0, ratio below 1 - eps: pessimistic branch is the unclipped one
    (-1.0, 0.5, False),  # A < 0, ratio below 1 - eps: clipped
    (-1.0, 1.5, True),  # A < 0, ratio above 1 + eps but below c
    (-1.0, 4.0, False),  # A < 0, ratio above c: dual clip
    (2.0, 1.1, True),
    (-2.0, 0.9, True),
]


def _single_token_grad(loss_fn, adv: float, ratio: float, **kw) -> float:
    old = jnp.array([[-1.0]])
    mask = jnp.array([[True]])
    lp = old + jnp.log(ratio)
    return float(jax.grad(lambda x: loss_fn(x, old, jnp.array([adv]), mask, **kw)[0])(lp)[0, 0])


@pytest.mark.parametrize(("adv", "ratio", "active"), CLIP_CASES)
def test_ppo_clip_gradient_zero_exactly_where_clip_active(adv, ratio, active):
    g = _single_token_grad(ppo_clip_loss, adv, ratio, clip_low=0.2, dual_clip=3.0)
    expected = -adv * ratio if active else 0.0
    assert g == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_without_dual_clip_large_ratio_negative_advantage_keeps_gradient():
    assert _single_token_grad(ppo_clip_loss, -1.0, 4.0, clip_low=0.2) == pytest.approx(4.0, rel=1e-5)


def test_dapo_clip_higher_keeps_gradient_between_1_2_and_1_28():
    assert _single_token_grad(ppo_clip_loss, 1.0, 1.25, clip_low=0.2) == 0.0
    assert _single_token_grad(ppo_clip_loss, 1.0, 1.25, clip_low=0.2, clip_high=0.28) == pytest.approx(
        -1.25, rel=1e-5
    )
    assert _single_token_grad(ppo_clip_loss, -1.0, 0.75, clip_low=0.2, clip_high=0.28) == 0.0


def test_ppo_clip_fraction_metric_counts_clipped_tokens():
    old = jnp.full((1, 4), -1.0)
    lp = old + jnp.log(jnp.array([[1.5, 1.0, 0.5, 1.1]]))
    _, m = ppo_clip_loss(lp, old, jnp.array([1.0]), jnp.ones((1, 4), bool))
    assert float(m["clip_fraction"]) == pytest.approx(0.25)  # only ratio 1.5 is clipped for A > 0


@pytest.mark.parametrize(
    ("adv", "shift", "active"),
    [(1.0, 1e-3, False), (1.0, 2e-4, True), (-1.0, -1e-3, False), (-1.0, -2e-4, True), (1.0, -1e-3, True)],
)
def test_gspo_sequence_clip(adv, shift, active):
    # Every token's log-ratio is `shift`, so s = exp(shift); clip range [1 - 3e-4, 1 + 4e-4].
    old = jnp.full((1, 4), -1.0)
    mask = jnp.ones((1, 4), bool)
    g = jax.grad(lambda x: gspo_loss(x, old, jnp.array([adv]), mask)[0])(old + shift)
    expected = -adv * np.exp(shift) / 4 if active else 0.0
    np.testing.assert_allclose(np.asarray(g), np.full((1, 4), expected), rtol=1e-5, atol=1e-12)


def test_gspo_token_variant_equals_gspo_off_policy_with_sequence_advantages():
    old = jnp.asarray(LOGP)
    lp = old + 1e-4 * jnp.asarray(RNG.normal(size=(B, T)))
    adv = jnp.asarray(grpo_advantage_np(True))
    f_seq = lambda x: gspo_loss(x, old, adv, jnp.asarray(MASK))[0]
    f_tok = lambda x: gspo_loss(x, old, adv, jnp.asarray(MASK), token_level=True)[0]
    np.testing.assert_allclose(float(f_seq(lp)), float(f_tok(lp)), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(
        np.asarray(jax.grad(f_seq)(lp)), np.asarray(jax.grad(f_tok)(lp)), rtol=1e-5, atol=1e-9
    )


def test_old_logp_ref_logp_and_advantages_receive_no_gradient():
    lp, old, ref = jnp.asarray(LOGP), jnp.asarray(LOGP) - 0.05, jnp.asarray(REF_LOGP)
    adv = jnp.asarray(REWARDS)
    f = lambda o, r, a: ppo_clip_loss(lp, o, a, jnp.asarray(MASK), ref_logp=r, kl_coef=0.1)[0]
    grads = jax.grad(f, argnums=(0, 1, 2))(old, ref, adv)
    for g in grads:
        assert float(jnp.max(jnp.abs(g))) == 0.0


@pytest.mark.parametrize(
    ("estimator", "dkl_dlogp"),
    [
        ("k1", lambda lp, ref: np.ones_like(lp)),
        ("k2", lambda lp, ref: lp - ref),
        ("k3", lambda lp, ref: 1.0 - np.exp(ref - lp)),
    ],
)
def test_kl_loss_gradients(estimator, dkl_dlogp):
    g = jax.grad(lambda x: kl_loss(x, jnp.asarray(REF_LOGP), jnp.asarray(MASK), estimator)[0])(
        jnp.asarray(LOGP)
    )
    np.testing.assert_allclose(
        np.asarray(g), dkl_dlogp(LOGP, REF_LOGP) * weights("token_mean"), rtol=1e-4, atol=1e-7
    )


def test_kl_estimators_values_and_k3_nonnegative():
    lp, ref, m = jnp.asarray(LOGP), jnp.asarray(REF_LOGP), jnp.asarray(MASK)
    log_u = REF_LOGP - LOGP
    for est, per_tok in [("k1", -log_u), ("k2", 0.5 * log_u**2), ("k3", np.exp(log_u) - 1 - log_u)]:
        val, _ = kl_loss(lp, ref, m, est)
        assert float(val) == pytest.approx(per_tok[MASK].mean(), rel=1e-5)
    assert float(kl_loss(lp, ref, m, "k3")[0]) >= 0.0
    assert float(kl_loss(lp, lp, m, "k3")[0]) == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_loss(lp, ref, m, "k4")


def test_kl_shaped_rewards_put_outcome_on_last_token():
    tr = np.asarray(
        kl_shaped_token_rewards(
            jnp.asarray(REWARDS), jnp.asarray(LOGP), jnp.asarray(REF_LOGP), jnp.asarray(MASK), 0.1, "k1"
        )
    )
    np.testing.assert_allclose(
        tr.sum(-1), REWARDS - 0.1 * np.where(MASK, LOGP - REF_LOGP, 0).sum(-1), rtol=1e-5
    )
    assert np.all(tr[~MASK] == 0.0)


def test_clipped_value_loss_hand_computed():
    # token 0: V=1.5, old=1.0, R=2.0 -> clipped branch (1.2-2)^2 = .64 > .25, constant in V
    # token 1: V=1.1, old=1.0, R=2.0 -> both branches .81; gradient 0.5 * 2 (V - R) / 2 tokens
    v = jnp.array([[1.5, 1.1]])
    loss, m = clipped_value_loss(v, jnp.array([[1.0, 1.0]]), jnp.array([[2.0, 2.0]]), jnp.ones((1, 2), bool))
    assert float(loss) == pytest.approx(0.5 * (0.64 + 0.81) / 2, rel=1e-5)
    g = jax.grad(
        lambda x: clipped_value_loss(
            x, jnp.array([[1.0, 1.0]]), jnp.array([[2.0, 2.0]]), jnp.ones((1, 2), bool)
        )[0]
    )(v)
    np.testing.assert_allclose(np.asarray(g), [[0.0, 0.5 * 2 * (1.1 - 2.0) / 2]], rtol=1e-5, atol=1e-8)
    assert float(m["vf_clip_fraction"]) == pytest.approx(0.5)


def test_entropy_bonus_gradient_is_minus_coef_times_weight():
    ent = jnp.asarray(np.abs(LOGP))
    g = jax.grad(lambda e: entropy_bonus_loss(e, jnp.asarray(MASK), coef=0.01)[0])(ent)
    np.testing.assert_allclose(np.asarray(g), -0.01 * weights("token_mean"), rtol=1e-5, atol=1e-9)


def test_bad_arguments_are_named_errors():
    lp, m = jnp.asarray(LOGP), jnp.asarray(MASK)
    with pytest.raises(ValueError, match="needs ref_logp"):
        ppo_clip_loss(lp, lp, jnp.asarray(REWARDS), m, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip_loss(lp, lp, jnp.asarray(REWARDS), m, dual_clip=0.5)
    with pytest.raises(ValueError, match="needs a positive norm_constant"):
        make_loss_fn("dr_grpo")(lp, lp, jnp.asarray(REWARDS), m)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        ppo_clip_loss(lp, lp, jnp.asarray(REWARDS), m, aggregation="mean")
    with pytest.raises(ValueError, match=r"\[B\]"):
        gspo_loss(lp, lp, jnp.asarray(LOGP), m)


def test_grpo_process_gradient_is_sum_of_future_normalised_step_rewards():
    # Two steps per response: step 0 ends at token 0, step 1 at the last token.
    step_r = RNG.normal(size=(B, 2))
    step_end = np.stack([np.zeros(B, int), LENGTHS - 1], axis=1)
    step_mask = np.ones((B, 2), bool)
    adv = make_advantage_fn("grpo_process")(
        jnp.asarray(step_r),
        jnp.asarray(step_mask),
        jnp.asarray(step_end),
        jnp.asarray(MASK),
        jnp.asarray(GROUPS),
        2,
    )
    g = grad_wrt_logp(make_loss_fn("grpo_process"), advantages=adv, ref_logp=jnp.asarray(REF_LOGP))
    expected_adv = np.zeros((B, T))
    for grp in (0, 1):
        rows = grp == GROUPS
        normed = (step_r[rows] - step_r[rows].mean()) / (step_r[rows].std(ddof=1) + 1e-6)
        for k, i in enumerate(np.flatnonzero(rows)):
            for t in range(LENGTHS[i]):
                expected_adv[i, t] = sum(normed[k, j] for j in range(2) if step_end[i, j] >= t)
    gc = expected_adv + BETA_GRPO * (np.exp(REF_LOGP - LOGP) - 1.0)
    np.testing.assert_allclose(g, -gc * weights("seq_mean_token_mean"), rtol=1e-4, atol=1e-7)
