"""Write an evaluation run: a rich table in the terminal, ``results.json``, PNG plots and ``report.md``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pf_jax.evaluation.plots import (
    pareto_front,
    plot_alpha_sweep,
    plot_distribution_over_steps,
    plot_pass_at_k,
    plot_quality_diversity,
)
from pf_jax.evaluation.scoring import MethodResult

# Columns shown when present, in this order; avg@n / maj@n / pass@n are found by prefix.
_METRIC_ORDER = ("avg@", "maj@", "pass@1", "pass@", "answer_rate", "distinct_answers", "answer_entropy",
                 "distinct_1", "distinct_2", "self_bleu", "semantic_diversity")

# Diversity measures in the order the quality-diversity plot tries them: short answers (a few words, where
# n-gram measures are empty or constant) are compared by their extracted answers, long text by n-grams.
SHORT_ANSWER_WORDS = 4.0
_SHORT_DIVERSITY = ("semantic_diversity", "distinct_answers", "answer_entropy", "distinct_1", "distinct_2")
_LONG_DIVERSITY = ("semantic_diversity", "distinct_2", "distinct_1", "distinct_answers", "answer_entropy")


def has_spread(values: Sequence[float], tolerance: float = 1e-9) -> bool:
    """Whether the values differ (max - min > tolerance): a plot axis along them shows something."""
    return len(values) >= 2 and max(values) - min(values) > tolerance


def choose_diversity_metric(results: Sequence[MethodResult]) -> str | None:
    """The first diversity measure, in the task's order of preference, that differs across methods;
    None when every measured one is constant (or fewer than two methods were run). Short answers (mean
    words per response <= SHORT_ANSWER_WORDS) prefer distinct answers and answer entropy."""
    words = [r.metrics["words_per_response"] for r in results if "words_per_response" in r.metrics]
    order = _SHORT_DIVERSITY if words and max(words) <= SHORT_ANSWER_WORDS else _LONG_DIVERSITY
    for name in order:
        values = [r.metrics[name] for r in results if name in r.metrics]
        if len(values) == len(results) and has_spread(values):
            return name
    return None


def metric_columns(results: Sequence[MethodResult]) -> list[str]:
    """The metric names present in any result, in a stable reading order."""
    names = {m for r in results for m in r.metrics}
    ordered = []
    for prefix in _METRIC_ORDER:
        for name in sorted(names - set(ordered)):
            if name == prefix or (prefix.endswith("@") and name.startswith(prefix)):
                ordered.append(name)
    return ordered + sorted(names - set(ordered))


def metrics_table(results: Sequence[MethodResult], title: str = "evaluation") -> Table:
    """A rich Table: one row per method, one column per metric (3 decimals, with its 95% interval over
    problems where one was computed)."""
    table = Table(title=title)
    table.add_column("method", style="bold")
    table.add_column("settings")
    columns = metric_columns(results)
    for name in columns:
        table.add_column(name, justify="right")
    for r in results:
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
        table.add_row(r.name, settings, *[_fmt(r.metrics.get(c), r.intervals.get(c)) for c in columns])
    return table


def _fmt(value: float | None, interval: Sequence[float] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" + ("" if interval is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]")


def write_report(run_dir: str | Path, results: Sequence[MethodResult], title: str = "evaluation",
                 quality_metric: str | None = None, diversity_metric: str | None = None,
                 console: Console | None = None, include_responses: bool = True) -> dict[str, Path]:
    """Write results.json, pass_at_k.png, quality_diversity.png, alpha_sweep.png (when two or more
    alphas were run) and report.md under ``run_dir``; print the table to ``console``.

    quality_metric defaults to avg@n; diversity_metric to the first measure with spread across methods
    (``choose_diversity_metric``). When the diversity measure is constant across methods there is no
    quality-diversity plot: report.md says so, with the values. Returns {artifact name: path}.
    """
    if not results:
        raise ValueError("write_report: no results to report")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    columns = metric_columns(results)
    quality_metric = quality_metric or next((c for c in columns if c.startswith("avg@")), columns[0])
    diversity_metric = diversity_metric or choose_diversity_metric(results)
    for metric in (quality_metric, diversity_metric):
        if metric is not None and metric not in columns:
            raise ValueError(f"write_report: metric {metric!r} was not measured; available: {columns}")

    if console is None:  # wide enough for every column, also when piped to a log (rich's default there is 80)
        console = Console(width=max(Console().width, 60 + 22 * len(columns)))
    console.print(metrics_table(results, title))
    paths: dict[str, Path] = {}
    payload: dict[str, Any] = {"title": title, "quality_metric": quality_metric,
                               "diversity_metric": diversity_metric,
                               "methods": [r.to_json(include_responses) for r in results]}
    paths["json"] = run_dir / "results.json"
    paths["json"].write_text(json.dumps(payload, indent=1))

    labels = [_label(r) for r in results]
    paths["pass_at_k"] = plot_pass_at_k({lab: r.pass_at_k for lab, r in zip(labels, results)},
                                        run_dir / "pass_at_k.png", title=f"{title}: pass@k")
    points = {lab: (r.metrics[diversity_metric], r.metrics[quality_metric]) for lab, r in zip(labels, results)
              if diversity_metric in r.metrics and quality_metric in r.metrics} if diversity_metric else {}
    if has_spread([x for x, _ in points.values()]):
        paths["quality_diversity"] = plot_quality_diversity(points, run_dir / "quality_diversity.png",
                                                            quality_metric, diversity_metric, title)
    series: dict[str, dict[float, dict[str, float]]] = {}
    for r in results:
        if "alpha" in r.settings:
            series.setdefault(r.name, {})[float(r.settings["alpha"])] = r.metrics
    if len({a for s in series.values() for a in s}) >= 2:
        paths["alpha_sweep"] = plot_alpha_sweep(series, [quality_metric, diversity_metric],
                                                run_dir / "alpha_sweep.png", title=f"{title}: alpha sweep")
    paths["markdown"] = run_dir / "report.md"
    paths["markdown"].write_text(_markdown(title, results, labels, columns, points, paths,
                                           _constant_diversity(results, diversity_metric, paths)))
    return paths


def _constant_diversity(results: Sequence[MethodResult], chosen: str | None, paths: dict[str, Path]) -> str:
    """The sentence report.md carries instead of a quality-diversity plot along a constant axis."""
    if "quality_diversity" in paths:
        return ""
    names = [chosen] if chosen else [n for n in _SHORT_DIVERSITY if all(n in r.metrics for r in results)]
    values = "; ".join(f"{n} = {', '.join(_fmt(r.metrics.get(n)) for r in results)}" for n in names)
    return (f"No quality-diversity plot: every diversity measure compared is constant across the "
            f"{len(results)} method(s) ({values}), so it cannot separate them.")


def _label(result: MethodResult) -> str:
    tags = [f"{k}={result.settings[k]}" for k in ("alpha", "temperature") if k in result.settings]
    return result.name + (f" ({', '.join(tags)})" if tags else "")


def _markdown(title: str, results: Sequence[MethodResult], labels: list[str], columns: list[str],
              points: dict[str, tuple[float, float]], paths: dict[str, Path], constant_note: str) -> str:
    n = results[0].correct.shape
    lines = [f"# {title}", "", f"{n[0]} problems, {n[1]} samples per problem per method; [low, high] is a "
             "95% percentile-bootstrap interval over problems.", "",
             "| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, r in zip(labels, results):
        lines.append(f"| {label} | " + " | ".join(_fmt(r.metrics.get(c), r.intervals.get(c)) for c in columns) + " |")
    if constant_note:
        lines += ["", constant_note, ""]
    else:
        front_labels = [list(points)[i] for i in pareto_front(list(points.values()))]
        lines += ["", f"Pareto front (quality vs diversity): {', '.join(front_labels)}.", ""]
    ks = sorted({k for r in results for k in r.pass_at_k})
    lines += ["pass@k (unbiased estimator):", "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
              "|---|" + "---:|" * len(ks)]
    for label, r in zip(labels, results):
        lines.append(f"| {label} | " + " | ".join(_fmt(r.pass_at_k.get(k)) for k in ks) + " |")
    lines.append("")
    lines += [f"![{name}]({p.name})" for name, p in paths.items() if p.suffix == ".png"]
    return "\n".join(lines) + "\n"


def write_distribution_report(run_dir: str | Path, history: Sequence[dict[str, Any]], alpha: float,
                              console: Console | None = None) -> dict[str, Path]:
    """The distribution probe's record (training.evaluators.DistributionProbe): distribution.json (every
    probe: step, metrics, intervals), distribution_match.png (the metrics over steps) and
    distribution.md (first vs last probe with intervals); the same table printed to ``console``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "distribution.json", "plot": run_dir / "distribution_match.png",
             "markdown": run_dir / "distribution.md"}
    paths["json"].write_text(json.dumps({"alpha": alpha, "history": list(history)}, indent=1))
    plot_distribution_over_steps(history, paths["plot"], title=f"distance to p_base^{alpha:g} on candidate sets")
    first, last = history[0], history[-1]
    names = [n for n in first["metrics"] if n != "seconds"]
    table = Table(title=f"distribution matching (alpha = {alpha:g})")
    lines = [f"# distribution matching, alpha = {alpha:g}", "", "[low, high]: 95% bootstrap interval over prompts.",
             "", f"| metric | step {first['step']} | step {last['step']} |", "|---|---:|---:|"]
    for column in ("metric", f"step {first['step']}", f"step {last['step']}"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in names:
        cells = [_fmt(h["metrics"].get(name), h["intervals"].get(name)) for h in (first, last)]
        table.add_row(name, *cells)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    (console or Console()).print(table)
    paths["markdown"].write_text("\n".join([*lines, "", f"![distribution]({paths['plot'].name})", ""]))
    return paths
