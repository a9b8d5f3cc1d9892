"""Scoring, problem files, Pareto front, plots and the run-dir report, end to end on a synthetic
arithmetic task whose responses come from a known categorical sampler."""

import io
import json
import math

import jax
import numpy as np
import pytest
from rich.console import Console

from pf_jax.evaluation.answer_checkers import ExactIntegerChecker
from pf_jax.evaluation.plots import pareto_front, plot_alpha_sweep, plot_pass_at_k, plot_quality_diversity
from pf_jax.evaluation.problems import load_jsonl_problems, load_problems
from pf_jax.evaluation.report import metric_columns, write_report
from pf_jax.evaluation.scoring import Problem, evaluate_method, score_responses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ERROR_LOGITS = np.array([0.0, 2.0, 0.0])  # answer offset -1, 0, +1


def arithmetic_sampler(temperature: float):
    """generate(prompts, n, rng): answers a + b + e, e in {-1, 0, 1} ~ softmax(ERROR_LOGITS / T)."""

    def generate(prompts, n, rng):
        out = []
        for i, prompt in enumerate(prompts):
            a, b = (int(x) for x in prompt.split("=")[0].split("+"))
            offsets = jax.random.categorical(jax.random.fold_in(rng, i), ERROR_LOGITS / temperature, shape=(n,))
            out.append([f"{a} + {b} = {a + b + int(e) - 1}" for e in np.asarray(offsets)])
        return out

    return generate


def _problems(count: int = 40) -> list[Problem]:
    rng = np.random.default_rng(0)
    return [Problem(prompt=f"{a} + {b} =", reference=int(a + b), problem_id=str(i))
            for i, (a, b) in enumerate(rng.integers(0, 50, (count, 2)))]


def test_pareto_front_hand_made():
    points = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.2), (0.2, 0.9)]
    # (0.4,0.4) < (0.5,0.5); (0.5,0.2) < (0.5,0.5); (0.1,0.9) < (0.2,0.9)
    assert pareto_front(points) == [5, 1, 3]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # equal points do not dominate each other


def test_plots_write_png_files(tmp_path):
    paths = [
        plot_pass_at_k({"a": {1: 0.2, 2: 0.3, 4: 0.5}, "b": {1: 0.3, 2: 0.35, 4: 0.4}}, tmp_path / "p.png"),
        plot_quality_diversity({"x": (0.1, 0.5), "y": (0.3, 0.4), "z": (0.2, 0.2)}, tmp_path / "q.png"),
        plot_alpha_sweep({"powerflow": {0.5: {"acc": 0.2}, 2.0: {"acc": 0.4}, 4.0: {"acc": 0.5}}}, ["acc"],
                         tmp_path / "sub" / "a.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000
    with pytest.raises(ValueError, match="no curves"):
        plot_pass_at_k({}, tmp_path / "none.png")


def test_score_responses_matches_direct_counts():
    problems = _problems(30)
    result = evaluate_method("T=1", problems, arithmetic_sampler(1.0), 8, jax.random.key(0), ExactIntegerChecker())
    correct = result.correct
    assert correct.shape == (30, 8)
    expected_rate = math.exp(2) / (math.exp(2) + 2)  # P(offset 0) at T = 1
    assert result.metrics["avg@8"] == pytest.approx(correct.mean())
    assert abs(result.metrics["avg@8"] - expected_rate) < 4 * math.sqrt(expected_rate * (1 - expected_rate) / 240)
    assert result.metrics["pass@8"] == pytest.approx(correct.any(axis=1).mean())
    assert result.pass_at_k[1] == pytest.approx(correct.mean())
    assert result.metrics["maj@8"] >= 0.9  # the right answer is the mode of every prompt's distribution
    assert result.metrics["answer_rate"] == 1.0
    # colder sampling: more accurate, less diverse.
    cold = evaluate_method("T=0.25", problems, arithmetic_sampler(0.25), 8, jax.random.key(0),
                           ExactIntegerChecker())
    assert cold.metrics["avg@8"] > result.metrics["avg@8"]
    assert cold.metrics["distinct_1"] < result.metrics["distinct_1"]


def test_scoring_rejects_badly_shaped_generations():
    problems = _problems(3)
    with pytest.raises(ValueError, match=r"generate must return \[3\]\[4\]"):
        evaluate_method("bad", problems, lambda p, n, rng: [["1"] * n] * 2, 4, jax.random.key(0),
                        ExactIntegerChecker())
    with pytest.raises(ValueError, match="same number n >= 1"):
        score_responses("bad", problems, [["1"], ["1", "2"], ["3"]], ExactIntegerChecker())


def test_write_report_run_dir(tmp_path):
    problems = _problems(12)
    results = []
    for alpha in (1.0, 2.0, 4.0):
        results.append(evaluate_method("low-temperature", problems, arithmetic_sampler(1.0 / alpha), 8,
                                       jax.random.key(1), ExactIntegerChecker(),
                                       settings={"alpha": alpha, "temperature": 1.0 / alpha}))
    console = Console(record=True, width=400, file=io.StringIO())  # the metrics carry intervals
    paths = write_report(tmp_path / "run", results, title="arith", console=console)
    assert set(paths) == {"json", "pass_at_k", "quality_diversity", "alpha_sweep", "markdown"}
    for key in ("pass_at_k", "quality_diversity", "alpha_sweep"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
    payload = json.loads(paths["json"].read_text())
    assert payload["quality_metric"] == "avg@8" and payload["diversity_metric"] == "distinct_2"
    assert [m["settings"]["alpha"] for m in payload["methods"]] == [1.0, 2.0, 4.0]
    assert payload["methods"][0]["metrics"]["avg@8"] == pytest.approx(results[0].metrics["avg@8"])
    assert np.array(payload["methods"][2]["correct"]).shape == (12, 8)
    markdown = paths["markdown"].read_text()
    assert "| low-temperature (alpha=4.0, temperature=0.25) |" in markdown and "Pareto front" in markdown
    table_text = console.export_text()
    assert "low-temperature" in table_text and "avg@8" in table_text
    assert metric_columns(results)[:4] == ["avg@8", "maj@8", "pass@1", "pass@8"]
    with pytest.raises(ValueError, match="metric 'semantic_diversity' was not measured"):
        write_report(tmp_path / "run2", results, diversity_metric="semantic_diversity", console=console)


def test_jsonl_problems(tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text('{"prompt": "1 + 2 =", "answer": 3}\n\n{"prompt": "2 + 2 =", "answer": 4, "id": "b"}\n')
    problems = load_problems(str(path))
    assert [(p.prompt, p.reference, p.problem_id) for p in problems] == [("1 + 2 =", 3, "1"), ("2 + 2 =", 4, "b")]
    assert len(load_jsonl_problems(path, limit=1)) == 1
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected fields 'prompt' and 'answer'"):
        load_problems(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: not a JSON object"):
        load_problems(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="unknown problem source 'math5000'"):
        load_problems("math5000")


def test_hub_benchmark_offline_error_names_the_benchmark(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(RuntimeError, match=r"could not load benchmark 'math500' from the hub \(HuggingFaceH4/MATH-500"):
        load_problems("math500")
