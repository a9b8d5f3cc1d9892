"""The distribution-matching metric from its definitions (evaluation.distribution_match), the candidate
sets scored by teacher forcing (evaluation.candidate_sets) and the trainer's DistributionProbe."""

import json
import math

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import log_softmax

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.evaluation.distribution_match import (
    PromptCandidates,
    distribution_match,
    inversion_rate,
    kl_divergence,
    length_tilted_log_target,
    prompt_match,
    renormalise,
    total_variation,
)
from pf_jax.training.metrics import MetricsLogger, read_metrics
from pf_jax.training.trainer import Trainer

logits = st.lists(st.floats(-20, 0, allow_nan=False), min_size=2, max_size=12)


@given(logits)
def test_tv_and_kl_are_zero_for_equal_distributions(x):
    p = renormalise(x)
    assert total_variation(p, p) == 0.0
    assert kl_divergence(np.log(p), np.log(p)) == 0.0


@given(logits, st.data())
def test_tv_and_kl_bounds(x, data):
    y = data.draw(st.lists(st.floats(-20, 0, allow_nan=False), min_size=len(x), max_size=len(x)))
    p, q = renormalise(x), renormalise(y)
    assert 0.0 <= total_variation(p, q) <= 1.0
    assert total_variation(p, q) == pytest.approx(total_variation(q, p))
    assert kl_divergence(log_softmax(x), log_softmax(y)) >= -1e-12
    # Pinsker: TV <= sqrt(KL / 2)
    assert total_variation(p, q) <= math.sqrt(kl_divergence(log_softmax(x), log_softmax(y)) / 2) + 1e-9


def test_hand_computed_distances():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    assert total_variation(p, q) == pytest.approx(0.4)
    assert kl_divergence(np.log(p), np.log(q)) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


def test_inversion_rate_from_its_definition():
    t = np.array([-3.0, -1.0, -2.0, -5.0])
    assert inversion_rate(2.5 * t + 7.0, t) == 0.0  # a monotone transform keeps every order
    assert inversion_rate(np.exp(t), t) == 0.0
    assert inversion_rate(-t, t) == 1.0  # reversed
    assert inversion_rate(np.zeros(4), t) == 0.5  # policy ties count 1/2
    swapped = t.copy()
    swapped[[0, 2]] = swapped[[2, 0]]  # one adjacent pair of the 6 swapped
    assert inversion_rate(swapped, t) == pytest.approx(1 / 6)
    assert math.isnan(inversion_rate([1.0], [1.0])) and math.isnan(inversion_rate([1.0, 2.0], [0.0, 0.0]))


def _candidates(rng, size=6, lengths=None):
    lengths = rng.integers(2, 6, size) if lengths is None else np.asarray(lengths)
    return PromptCandidates(-rng.random(size) * 8, -rng.random(size) * 8, lengths, rng.random(size) < 0.4)


def test_metrics_are_invariant_to_renormalisation():
    rng = np.random.default_rng(0)
    c = _candidates(rng)
    shifted = PromptCandidates(c.base_logp - 3.7, c.policy_logp + 12.0, c.lengths, c.correct)
    a, b = prompt_match(c, 4.0, True), prompt_match(shifted, 4.0, True)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == pytest.approx(b[name], abs=1e-9), name


def test_policy_at_the_target_scores_zero_and_set_accuracies():
    base = np.log([0.5, 0.3, 0.2])
    c = PromptCandidates(base, 4.0 * base - 1.0, np.array([3, 3, 3]), np.array([True, False, False]))
    m = prompt_match(c, 4.0, True)
    assert m["tv"] == pytest.approx(0.0, abs=1e-12) and m["kl"] == pytest.approx(0.0, abs=1e-12)
    assert m["inversion_rate"] == 0.0 and m["tv_tilted"] == pytest.approx(0.0, abs=1e-12)  # one length: no tilt
    t = np.array([0.5, 0.3, 0.2]) ** 4
    assert m["target_accuracy"] == pytest.approx(t[0] / t.sum())
    assert m["policy_accuracy"] == pytest.approx(m["target_accuracy"]) and m["base_accuracy"] == pytest.approx(0.5)


def test_length_tilted_fixed_point():
    rng = np.random.default_rng(1)
    base, lengths = -rng.random(8), np.array([1, 2, 2, 3, 4, 4, 5, 6])
    policy = 4.0 * base - 0.7 * lengths  # p_base^4 exp(-0.7 |y|): the LA-TB fixed point for lambda = 0.7
    m = prompt_match(PromptCandidates(base, policy, lengths, np.zeros(8, bool)), 4.0, True)
    assert m["tv_tilted"] < 1e-6 and m["kl_tilted"] < 1e-9 and m["inversion_rate_tilted"] == 0.0
    assert m["tv"] > 0.05  # but it is not p_base^4 itself
    tilted = renormalise(length_tilted_log_target(4.0 * base, lengths, 3.0))
    assert tilted @ lengths == pytest.approx(3.0, abs=1e-9)  # lambda meets the length constraint
    same = length_tilted_log_target(4.0 * base, np.full(8, 3), 5.0)
    np.testing.assert_array_equal(same, 4.0 * base)


def test_distribution_match_averages_prompts_with_intervals():
    rng = np.random.default_rng(2)
    sets = [_candidates(rng) for _ in range(10)] + [_candidates(rng, size=1)]  # one lone candidate
    metrics, intervals = distribution_match(sets, 4.0)
    per_prompt = [prompt_match(c, 4.0, False) for c in sets]
    assert metrics["tv"] == pytest.approx(np.mean([m["tv"] for m in per_prompt]))
    assert metrics["inversion_rate"] == pytest.approx(np.mean([m["inversion_rate"] for m in per_prompt[:10]]))
    for name, (lo, hi) in intervals.items():
        assert lo <= metrics[name] <= hi, name
    with pytest.raises(ValueError, match="no candidate sets"):
        distribution_match([], 4.0)


TINY = [
    "model.name=tiny", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.head_dim=16", "model.log_z_width=16",
    "method.name=powerflow", "data.source=arithmetic", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=4", "eval.problems=4", "eval.samples=2", "export=false", "optimizer.lr=1e-2",
    "eval.distribution.enabled=true", "eval.distribution.prompts=5", "eval.distribution.samples=12",
]


def test_probe_in_the_trainer_scores_candidates_exactly(tmp_path):
    cfg = load_config(TrainConfig, None, [*TINY, f"logging.runs_dir={tmp_path}"])
    trainer = Trainer(cfg)
    probe = trainer.distribution
    assert probe is not None and probe.alpha == 4.0 and probe.length_tilt
    logger = MetricsLogger(tmp_path / "run", 1, tensorboard=False, progress_bar=False, plots=False)
    trainer.probe_distribution(0, logger)  # the policy is the base: at distance 0 from... itself
    cands = probe.candidates
    assert len(cands.texts) == len(cands.prompt_index) and 5 <= len(cands.texts) <= 60
    seq = jax.tree_util.tree_map(lambda x: np.asarray(x[: cands.sizes[0]]), cands.chunks[0])
    rows = {(int(i), tuple(t[m])) for i, t, m in zip(cands.prompt_index, seq.response_tokens, seq.response_mask)}
    assert len(rows) == cands.sizes[0]  # no token sequence twice for one prompt
    assert np.all(probe.base_logp < 0) and np.isfinite(probe.base_logp).all()
    first = trainer.distribution_history[0]["metrics"]
    assert first["policy_accuracy"] == pytest.approx(first["base_accuracy"])
    assert first["inversion_rate"] == 0.0  # the same order as p_base, hence as p_base^4
    assert first["tv"] > 0 and first["kl"] > 0  # p_base is not p_base^4
    # teacher forcing reproduces the sampler's exact log-probs of the same draws (draw_candidates' first call)
    from pf_jax.evaluation.candidate_sets import draw_candidates
    from pf_jax.sampling.texts import generation_config, sample_responses
    from pf_jax.training.evaluators import held_out_problems, sequence_logprobs

    base = trainer.models().reference_model()
    problems, key = held_out_problems(cfg, 2), jax.random.key(5)
    gen = generation_config(cfg.rollout, trainer.codec, temperature=1.0)
    drawn = draw_candidates(base, trainer.codec, problems, 6, key, gen, probe.checker)
    sampled, exact, _, _ = sample_responses(base, trainer.codec, [p.prompt for p in problems], 6,
                                            jax.random.fold_in(key, 0), gen)
    exact_sums = {(int(i) // 6, tuple(np.asarray(t)[np.asarray(m)])): float(np.sum(np.where(m, e, 0.0)))
                  for i, (t, m, e) in enumerate(zip(sampled.response_tokens, sampled.response_mask, exact))}
    scored = sequence_logprobs(base, drawn)
    chunk = jax.tree_util.tree_map(lambda x: np.asarray(x[: drawn.sizes[0]]), drawn.chunks[0])
    assert len(exact_sums) == drawn.sizes[0] == len(scored)
    for p, t, m, s in zip(drawn.prompt_index, chunk.response_tokens, chunk.response_mask, scored):
        assert s == pytest.approx(exact_sums[(int(p), tuple(t[m]))], abs=1e-4)
    trainer.train_one_step(0)
    trainer.probe_distribution(1, logger)
    later = trainer.distribution_history[1]["metrics"]
    assert later["tv"] != first["tv"]
    logger.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1] and "dist/inversion_rate" in records[0]


def test_a_resumed_run_keeps_the_probes_of_the_steps_before_it(tmp_path):
    """The checkpoint carries the probes so far: a run extended from step 2 to 4 reports steps 0, 2 and 4,
    the first two as the first run measured them."""
    common = [*TINY, f"logging.runs_dir={tmp_path}", "logging.run_name=probe", "eval.distribution.every_steps=2",
              "checkpoint.every_steps=2", "logging.progress_bar=false", "logging.plots=false"]
    Trainer(load_config(TrainConfig, None, [*common, "steps=2"])).run()
    report = tmp_path / "probe" / "eval" / "distribution.json"
    first = json.loads(report.read_text())["history"]
    assert [h["step"] for h in first] == [0, 2]
    Trainer(load_config(TrainConfig, None, [*common, "steps=4"])).run()
    history = json.loads(report.read_text())["history"]
    assert [h["step"] for h in history] == [0, 2, 4]
    assert history[:2] == first
