"""Per-step metrics to the terminal (rich), `metrics.jsonl`, TensorBoard and optionally wandb, with a
progress bar (step rate, ETA) and, at the end, a summary table, `summary.json` and PNG curves.

Everything lands in the run directory `<runs_dir>/<run_name>/`; only process 0 writes (other processes
get a logger whose methods do nothing), so multi-host runs can call it unconditionally. metrics.jsonl is
appended one whole line per write and cut back to its last complete line on a resume
(training/run_storage.py): a kill mid-write never blocks the resume.
"""

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from pf_jax.config import ConfigError, LoggingConfig
from pf_jax.training.completions_log import completion_records, markdown_table
from pf_jax.training.run_storage import LineLog, read_json_lines, write_text

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
SUMMARY_FILE = "summary.json"
PLOTS_DIR = "plots"


class StepRateColumn(ProgressColumn):
    """Steps per second, averaged by rich over the recent window."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text("-- steps/s" if speed is None else f"{speed:.2f} steps/s", style="progress.data.speed")


def _scalar(name: str, value: Any) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric '{name}' must be a scalar, got an array of shape {array.shape}")
    return float(array.reshape(()))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (NaN / inf were written as null); a torn last line is left out."""
    return read_json_lines(Path(path))


def _start_wandb(project: str | None, run_dir: Path, config: Mapping[str, Any] | None) -> Any:
    try:
        import wandb as wandb_module
    except ImportError:
        raise ConfigError(
            "logging.wandb=true needs the 'wandb' package (pip install wandb); or set logging.wandb=false"
        ) from None
    return wandb_module.init(project=project, name=run_dir.name, dir=str(run_dir), config=dict(config or {}),
                             resume="allow")


class MetricsLogger:
    """Writes `log(step, metrics)` to every enabled sink; `close()` writes the summary and plots.

    `resume_step`: continuing a run from a checkpoint of that step keeps the metrics.jsonl records with
    step <= resume_step (the rest are replayed by the resumed run; a torn last line is dropped) and purges
    later TensorBoard events. A write that fails (full disk) raises RunStorageError naming the file.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        process_index: int = 0,
        every_steps: int = 1,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        progress_bar: bool = True,
        plots: bool = True,
        resume_step: int = 0,
        config: Mapping[str, Any] | None = None,
        console: Console | None = None,
        completions_every: int = 0,
        completions_count: int = 4,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.every_steps = every_steps
        self.plots = plots
        self.active = process_index == 0
        self.history: list[dict[str, Any]] = []
        self.completions_every, self.completions_count = completions_every, completions_count
        self._tb = self._wandb = self._progress = self._completions = None
        self._closed = False
        if not self.active:
            return
        self.console = console or Console()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = LineLog(self.run_dir / METRICS_FILE,
                              keep=lambda r: isinstance(r.get("step"), int) and r["step"] <= resume_step)
        self.history = self._jsonl.records  # the same list: each append lands in both
        if completions_every:
            self._completions = LineLog(self.run_dir / COMPLETIONS_FILE,
                                        keep=lambda r: isinstance(r.get("step"), int) and r["step"] <= resume_step)
        if config is not None:
            write_text(self.run_dir / "config.json", json.dumps(config, indent=2, default=str))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if wandb:
            self._wandb = _start_wandb(wandb_project, self.run_dir, config)
        if progress_bar:
            self._start_progress(total_steps, resume_step)

    def _start_progress(self, total_steps: int, resume_step: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), StepRateColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
        )
        self._task = self._progress.add_task(self.run_dir.name, total=total_steps, completed=resume_step)
        self._progress.start()
        self._phases = _PhasesInBar(self._progress, self._task, self.run_dir.name)

    @classmethod
    def from_config(
        cls, cfg: LoggingConfig, total_steps: int, process_index: int = 0, **kwargs: Any
    ) -> "MetricsLogger":
        """A logger writing to `<cfg.runs_dir>/<cfg.run_name>/` with the sinks `cfg` enables."""
        return cls(
            Path(cfg.runs_dir) / cfg.run_name, total_steps, process_index=process_index,
            every_steps=cfg.every_steps, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
            wandb_project=cfg.wandb_project, progress_bar=cfg.progress_bar, plots=cfg.plots,
            completions_every=cfg.completions_every, completions_count=cfg.completions_count, **kwargs,
        )

    def should_log(self, step: int) -> bool:
        """Whether `log(step, ...)` writes (every `every_steps` steps and the last step)."""
        return self.active and (step % self.every_steps == 0 or step == self.total_steps)

    def log(self, step: int, metrics: Mapping[str, Any], *, force: bool = False) -> bool:
        """Advance the progress bar to `step`; on logging steps (any step with `force`: evaluations that
        run on their own schedule) convert `metrics` (scalars: floats, numpy or jax arrays) and write them
        to every sink. Returns whether they were written. Call `should_log` first to avoid computing (or
        device-syncing) metrics that would be dropped."""
        if not self.active:
            return False
        if self._progress is not None:
            self._phases.detach()  # the bar now shows steps
            self._progress.update(self._task, completed=step)
        if not force and not self.should_log(step):
            return False
        values = {name: _scalar(name, value) for name, value in metrics.items()}
        record = {"step": int(step), "time": time.time(), **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        self._jsonl.append(record)
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        shown = "  ".join(f"{name} {value:.4g}" for name, value in values.items())
        self.console.print(f"[dim]step {step}/{self.total_steps}[/dim]  {shown}", highlight=False)
        return True

    def log_completions(self, step: int, responses: Any, batch: Any) -> int:
        """Every `completions_every` steps, a few of the step's sampled prompts, completions, rewards and
        advantages to completions.jsonl, TensorBoard (text) and W&B (a table); how many were written."""
        if not (self.active and self._completions is not None and step % self.completions_every == 0):
            return 0
        records = completion_records(step, responses, batch, self.completions_count)
        for record in records:
            self._completions.append(record)
        if records and self._tb is not None:
            self._tb.add_text("completions", markdown_table(records), global_step=step)
        if records and self._wandb is not None:
            import wandb as wandb_module

            columns = ["step", "prompt", "completion", "reward", "advantage", "group"]
            table = wandb_module.Table(columns=columns, data=[[str(r[c]) for c in columns] for r in records])
            self._wandb.log({"completions": table}, step=step)
        return len(records)

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per metric over the logged steps: first, last, min, max, mean (finite values only)."""
        names = [k for k in dict.fromkeys(k for r in self.history for k in r) if k not in ("step", "time")]
        out = {}
        for name in names:
            values = np.array([r[name] for r in self.history if r.get(name) is not None], float)
            if values.size == 0:
                out[name] = dict.fromkeys(("first", "last", "min", "max", "mean"))
                continue
            out[name] = {
                "first": float(values[0]), "last": float(values[-1]), "min": float(values.min()),
                "max": float(values.max()), "mean": float(values.mean()),
            }
        return out

    def close(self) -> dict[str, dict[str, float | None]]:
        """Stop the progress bar, flush sinks, print the summary table, write summary.json and plots."""
        if not self.active or self._closed:
            return {}
        self._closed = True
        if self._progress is not None:
            self._phases.detach()
            self._progress.stop()
        self._jsonl.close()
        if self._completions is not None:
            self._completions.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        summary = self.summary()
        write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        table = Table(title=f"{self.run_dir.name}: {len(self.history)} logged steps")
        for column in ("metric", "first", "last", "min", "max", "mean"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for name, stats in summary.items():
            table.add_row(name, *("-" if v is None else f"{v:.4g}" for v in stats.values()))
        self.console.print(table)
        if self.plots and self.history:
            plot_curves(self.history, self.run_dir / PLOTS_DIR)
        return summary

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PhasesInBar(logging.Handler):
    """Until the first step is logged, the progress bar's description is the current startup phase
    (pf_jax.phases: compiling the train step, the first rollout, ...) rather than a bar stuck at 0."""

    def __init__(self, progress: Progress, task: Any, name: str) -> None:
        super().__init__(logging.INFO)
        self.progress, self.task, self.name = progress, task, name
        self.logger = logging.getLogger("pf_jax.phase")
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.update(self.task, description=f"{self.name}: {record.getMessage()}")

    def detach(self) -> None:
        if self in self.logger.handlers:
            self.logger.removeHandler(self)
            self.progress.update(self.task, description=self.name)


def _curve(ax: Any, name: str, steps: list[int], values: list[float]) -> None:
    """The raw points, faint, under their EMA-smoothed line (evaluation.plots.ema); integer step ticks."""
    from matplotlib.ticker import MaxNLocator

    from pf_jax.evaluation.plots import ema

    ax.plot(steps, values, marker="o", ms=2.5, lw=0.6, alpha=0.35, color="tab:blue", label="raw")
    if len(values) > 2:
        ax.plot(steps, ema(values), lw=1.8, color="tab:blue", label="EMA 0.8")
        ax.legend(fontsize=6)
    ax.set(xlabel="step", title=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_curves(history: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per metric (`<metric>.png`, '/' in names becomes '_') and `curves.png` with all of them:
    raw points with an EMA-smoothed line, integer step ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [k for k in dict.fromkeys(k for r in history for k in r) if k not in ("step", "time")]
    series = {
        name: ([r["step"] for r in history if r.get(name) is not None], [r[name] for r in history if r.get(name) is not None])
        for name in names
    }
    written = []
    for name, (steps, values) in series.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        _curve(ax, name, steps, values)
        path = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    cols = min(3, len(series)) or 1
    rows = math.ceil(len(series) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, (name, (steps, values)) in zip(axes.flat, series.items()):
        _curve(ax, name, steps, values)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [*written, path]
