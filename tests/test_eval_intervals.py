"""Bootstrap intervals over problems, answer-level diversity, and the choice of a quality-diversity axis
that shows something (refusing a degenerate one)."""

import io
import math

import numpy as np
import pytest
from rich.console import Console

from pf_jax.evaluation.accuracy import (
    avg_per_problem,
    bootstrap_interval,
    majority_per_problem,
    pass_at_k,
    pass_per_problem,
)
from pf_jax.evaluation.answer_checkers import ExactIntegerChecker
from pf_jax.evaluation.diversity import answer_entropy, distinct_answers
from pf_jax.evaluation.plots import plot_quality_diversity
from pf_jax.evaluation.report import choose_diversity_metric, write_report
from pf_jax.evaluation.scoring import MethodResult, Problem, score_responses


@pytest.mark.parametrize("seed", range(5))
def test_interval_contains_the_point_estimate(seed):
    rng = np.random.default_rng(seed)
    values = rng.random(rng.integers(2, 60)) < rng.random()
    lo, hi = bootstrap_interval(values)
    assert lo <= values.mean() <= hi
    assert 0.0 <= lo <= hi <= 1.0


def test_interval_narrows_with_more_problems():
    rng = np.random.default_rng(0)
    widths = []
    for problems in (20, 80, 320):
        values = rng.random(problems) < 0.4
        lo, hi = bootstrap_interval(values)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    # the binomial standard error at n = 320 is 0.027: a 95% interval is about 4 of them wide
    assert widths[2] == pytest.approx(4 * math.sqrt(0.4 * 0.6 / 320), rel=0.3)


def test_interval_is_degenerate_safe():
    assert bootstrap_interval(np.ones(30)) == (1.0, 1.0)
    assert bootstrap_interval(np.zeros(30)) == (0.0, 0.0)
    assert bootstrap_interval([0.375]) == (0.375, 0.375)
    with pytest.raises(ValueError, match="no values"):
        bootstrap_interval([])
    assert bootstrap_interval([0.0, 1.0]) == bootstrap_interval([0.0, 1.0])  # seeded: reproducible


def test_per_problem_values_average_to_the_metrics():
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
    keys = [["3", "4", "4", "3"], ["1", None, "2", "2"], ["5", "5", "5", "6"]]
    assert avg_per_problem(correct).tolist() == [0.5, 0.0, 0.75]
    assert majority_per_problem(keys, correct).tolist() == [1.0, 0.0, 1.0]  # tie 3/4 -> first seen
    assert pass_per_problem(correct, 2) == pytest.approx([float(pass_at_k(4, c, 2)) for c in (2, 0, 3)])


def test_answer_diversity_hand_computed():
    assert distinct_answers(["3", "3", None, "4"]) == 2
    assert distinct_answers([None, None]) == 0
    assert answer_entropy(["3", "3", "3"]) == 0.0
    assert answer_entropy([None]) == 0.0
    assert answer_entropy(["3", "4", None, "3", "4"]) == pytest.approx(math.log(2))
    assert answer_entropy(["1", "2", "3", "3"]) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))


def _short(name, answers_per_problem):
    problems = [Problem(f"{i} + 0 =", i, str(i)) for i in range(len(answers_per_problem))]
    return score_responses(name, problems, answers_per_problem, ExactIntegerChecker())


def test_score_responses_reports_intervals_around_each_metric():
    result = _short("m", [["0", "0", "1"], ["2", "1", "1"], ["2", "2", "2"], ["4", "3", "3"]])
    for name in ("avg@3", "maj@3", "pass@1", "pass@3", "distinct_answers", "answer_entropy"):
        lo, hi = result.intervals[name]
        assert lo <= result.metrics[name] <= hi, name
    assert result.metrics["distinct_answers"] == pytest.approx((2 + 2 + 1 + 2) / 4)
    back = MethodResult.from_json(result.to_json(include_responses=False))
    assert back.intervals == result.intervals


def test_short_answers_pick_an_answer_measure_with_spread(tmp_path):
    # one-word answers: distinct-2 is 0 for both; the answers themselves differ in spread
    sharp = _short("sharp", [["1", "1", "1", "1"], ["2", "2", "2", "3"]])
    flat = _short("flat", [["1", "2", "3", "4"], ["2", "5", "6", "3"]])
    assert sharp.metrics["distinct_2"] == flat.metrics["distinct_2"] == 0.0
    assert choose_diversity_metric([sharp, flat]) == "distinct_answers"
    paths = write_report(tmp_path / "r", [sharp, flat], console=Console(file=io.StringIO(), width=300))
    assert "quality_diversity" in paths and "Pareto front" in paths["markdown"].read_text()


def test_constant_diversity_is_stated_not_plotted(tmp_path):
    a = _short("a", [["1", "1"], ["2", "2"]])
    b = _short("b", [["1", "1"], ["3", "3"]])
    assert choose_diversity_metric([a, b]) is None
    console = Console(file=io.StringIO(), width=300)
    paths = write_report(tmp_path / "r", [a, b], console=console)
    assert "quality_diversity" not in paths and not (tmp_path / "r" / "quality_diversity.png").exists()
    text = paths["markdown"].read_text()
    assert "No quality-diversity plot" in text and "distinct_answers = 1.000, 1.000" in text
    assert "| 0.000 [0.000, 0.000] |" in text  # every answer wrong: the interval is the point
    assert "avg@2" in console.file.getvalue()


def test_plot_refuses_a_degenerate_axis(tmp_path):
    with pytest.raises(ValueError, match="degenerate axis"):
        plot_quality_diversity({"base": (0.0, 0.3), "powerflow": (0.0, 0.5)}, tmp_path / "q.png")
    with pytest.raises(ValueError, match="degenerate axis"):
        plot_quality_diversity({"base": (0.4, 0.3)}, tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()
    assert plot_quality_diversity({"base": (0.4, 0.3), "pf": (0.2, 0.5)}, tmp_path / "q.png").exists()


def test_ema_is_debiased_and_follows_a_step():
    from pf_jax.evaluation.plots import ema

    np.testing.assert_allclose(ema([0.3] * 5), [0.3] * 5)  # no pull toward 0 at the start
    smoothed = ema([0.0] * 5 + [1.0] * 20, weight=0.8)
    assert smoothed[4] == 0.0 and 0.0 < smoothed[5] < smoothed[10] < 1.0 and smoothed[-1] > 0.98
    assert smoothed[5] == pytest.approx(0.2 / (1 - 0.8**6))


def test_distribution_report_and_curves(tmp_path):
    from pf_jax.evaluation.report import write_distribution_report
    from pf_jax.training.metrics import plot_curves

    history = [{"step": s, "metrics": {"tv": 0.5 / (s + 1), "kl": 1.0 / (s + 1), "inversion_rate": 0.1,
                                       "target_accuracy": 0.7, "policy_accuracy": 0.4 + 0.01 * s, "seconds": 1.0},
                "intervals": {"tv": [0.4 / (s + 1), 0.6 / (s + 1)]}} for s in (0, 10, 20)]
    console = Console(file=io.StringIO(), width=200)
    paths = write_distribution_report(tmp_path / "eval", history, 4.0, console=console)
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    text = paths["markdown"].read_text()
    assert "| tv | 0.500 [0.400, 0.600] | 0.024 [0.019, 0.029] |" in text and "seconds" not in text
    records = [{"step": s, "time": 0.0, "loss": 1.0 / s} for s in range(1, 8)]
    written = plot_curves(records, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "curves.png"]
