"""PNG plots of evaluation results (matplotlib Figure objects rendered by Agg: no display, no pyplot
global state, so importing this never changes a notebook's backend).

- pass@k curves across methods (log2 k axis);
- quality vs diversity across methods / alphas / temperatures, with the Pareto front marked;
- alpha sweep: metrics against alpha, one line per method family;
- distribution matching over training steps (distances to the target, set accuracies), with intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, both coordinates higher-is-better.

    Point j dominates i when x_j >= x_i and y_j >= y_i with at least one strict. Sorted by x.
    """
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any((xj >= xi and yj >= yi) and (xj > xi or yj > yi) for j, (xj, yj) in enumerate(points)
                        if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pass_at_k(curves: Mapping[str, Mapping[int, float]], path: str | Path, title: str = "pass@k") -> Path:
    """One line per method: pass@k (unbiased estimator) against k on a log2 axis."""
    if not curves:
        raise ValueError("plot_pass_at_k: no curves to plot")
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_quality_diversity(points: Mapping[str, tuple[float, float]], path: str | Path,
                           quality_label: str = "quality", diversity_label: str = "diversity",
                           title: str = "quality vs diversity") -> Path:
    """Scatter of (diversity, quality) per labelled setting; the Pareto front (both higher-is-better)
    is drawn as a step line and its points are ringed. A diversity axis with no spread (every point at
    the same x: one vertical line, which compares nothing) is refused."""
    if not points:
        raise ValueError("plot_quality_diversity: no points to plot")
    xs = [x for x, _ in points.values()]
    if len(xs) < 2 or max(xs) - min(xs) <= 1e-9:
        raise ValueError(f"plot_quality_diversity: {diversity_label} is {xs[0]:.4g} for every point: a degenerate "
                         "axis; pick a diversity measure that differs across methods")
    labels = list(points)
    xy = [points[label] for label in labels]
    front = pareto_front(xy)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    ax.scatter([p[0] for p in xy], [p[1] for p in xy], color="tab:blue", zorder=3)
    for label, (x, y) in zip(labels, xy):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    fx, fy = [xy[i][0] for i in front], [xy[i][1] for i in front]
    ax.step(fx, fy, where="post", color="tab:red", alpha=0.7, label="Pareto front")
    ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="tab:red", zorder=4)
    ax.set_xlabel(diversity_label)
    ax.set_ylabel(quality_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_alpha_sweep(series: Mapping[str, Mapping[float, Mapping[str, float]]], metrics: Sequence[str],
                     path: str | Path, title: str = "alpha sweep") -> Path:
    """One panel per metric; in each, one line per method family over alpha (log2 axis: alpha < 1
    flattens, alpha > 1 sharpens). series[family][alpha][metric] = value."""
    if not series or not metrics:
        raise ValueError("plot_alpha_sweep: need at least one family and one metric")
    fig = Figure(figsize=(4.2 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for family, by_alpha in series.items():
            alphas = sorted(a for a in by_alpha if metric in by_alpha[a])
            if alphas:
                ax.plot(alphas, [by_alpha[a][metric] for a in alphas], marker="o", label=family)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("alpha")
        ax.set_ylabel(metric)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


# Panels of the distribution-matching plot: (title, metrics drawn in it).
DISTRIBUTION_PANELS = (
    ("total variation to the target", ("tv", "tv_tilted")),
    ("KL(target || policy), nats", ("kl", "kl_tilted")),
    ("pairwise inversion rate", ("inversion_rate", "inversion_rate_tilted")),
    ("accuracy on the candidate set", ("target_accuracy", "tilted_accuracy", "policy_accuracy")),
)


def plot_distribution_over_steps(history: Sequence[Mapping], path: str | Path,
                                 title: str = "distance to p_base^alpha") -> Path:
    """One panel per group of DISTRIBUTION_PANELS: each metric against the training step, with its 95%
    interval over prompts as a band. history: [{"step", "metrics": {...}, "intervals": {name: [lo, hi]}}]."""
    if not history:
        raise ValueError("plot_distribution_over_steps: no probes to plot")
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(4.2 * len(DISTRIBUTION_PANELS), 3.6))
    axes = fig.subplots(1, len(DISTRIBUTION_PANELS))
    for ax, (panel, names) in zip(axes, DISTRIBUTION_PANELS):
        for name in names:
            if name not in history[0]["metrics"]:
                continue
            ax.plot(steps, [h["metrics"][name] for h in history], marker="o", ms=3, label=name)
            band = [h["intervals"].get(name, (np.nan, np.nan)) for h in history]
            ax.fill_between(steps, [b[0] for b in band], [b[1] for b in band], alpha=0.2)
        ax.set(title=panel, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def ema(values: Sequence[float], weight: float = 0.8) -> np.ndarray:
    """Exponential moving average, debiased like TensorBoard's smoothing: s_t = w s_{t-1} + (1 - w) x_t,
    divided by 1 - w^t so the first points are not pulled toward 0."""
    x = np.asarray(values, np.float64)
    out, acc = np.empty_like(x), 0.0
    for t, value in enumerate(x, start=1):
        acc = weight * acc + (1 - weight) * value
        out[t - 1] = acc / (1 - weight**t)
    return out


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if not path.exists() or path.stat().st_size == 0:
        raise OSError(f"plot was not written to {path}")
    return path
