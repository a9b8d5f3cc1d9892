"""Where a recipe's rows come from (`data.source`): a synthetic task by name, else a local jsonl / parquet
file or a hub dataset (pf_jax.data.loading), validated with the recipe's bad-row policy.

`format="auto"` decides by the file suffix, then this registry of synthetic tasks, then the hub.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pf_jax.config import ConfigError, DataConfig
from pf_jax.data.loading import (
    LOCAL_FORMATS,
    file_format,
    read_file_rows,
    validated_kto_rows,
    validated_preference_rows,
    validated_prompt_rows,
)
from pf_jax.data.row_checks import Render
from pf_jax.data.rows import ValidatedRows
from pf_jax.tasks.arithmetic import arithmetic_task_rows


def _arithmetic_rows(split: str) -> list[dict[str, Any]]:
    if split not in ("train", "test"):
        raise ConfigError(f"data.split for the synthetic arithmetic tasks must be 'train' or 'test', got '{split}'")
    return arithmetic_task_rows(split)


def _maze_random_walk_rows(split: str) -> list[dict[str, Any]]:
    from pf_jax.tasks.maze import maze_random_walk_rows  # imports the maze env and the sampler

    return maze_random_walk_rows(split)


SYNTHETIC_SOURCES: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "arithmetic": _arithmetic_rows,
    "arithmetic_noisy": lambda split: arithmetic_task_rows(split, kind="noisy"),
    "arithmetic_pairs": lambda split: arithmetic_task_rows(split, kind="pairs"),
    "arithmetic_kto": lambda split: arithmetic_task_rows(split, kind="kto"),
    "maze_random_walk": _maze_random_walk_rows,
}


def resolve_format(cfg: DataConfig) -> str:
    """'synthetic', 'jsonl', 'parquet' or 'hub' for `cfg.source` (by suffix, then registry, then hub)."""
    if cfg.format == "auto" and Path(cfg.source).suffix.lower() not in LOCAL_FORMATS and cfg.source in SYNTHETIC_SOURCES:
        return "synthetic"
    return file_format(cfg)


def read_rows(cfg: DataConfig, cache_dir: str | None = None) -> Any:
    """The raw rows of the configured source and split (an iterable of dicts / RowProblems)."""
    if resolve_format(cfg) == "synthetic":
        if cfg.source not in SYNTHETIC_SOURCES:
            raise ConfigError(f"unknown synthetic data source '{cfg.source}'; known: {sorted(SYNTHETIC_SOURCES)}")
        return SYNTHETIC_SOURCES[cfg.source](cfg.split)
    return read_file_rows(cfg, cache_dir, hub_hint=f" nor a synthetic task {sorted(SYNTHETIC_SOURCES)}")


def load_prompt_rows(
    cfg: DataConfig, count_tokens: Callable[[Any], int] | None = None, cache_dir: str | None = None, *,
    targets_in_messages: bool = False, render: Render | None = None,
) -> ValidatedRows:
    """Validated prompt rows {"prompt", "answer"?} of `cfg`, with the skip/stop policy applied
    (targets_in_messages: SFT rows, whose conversations carry their own targets; render: see
    pf_jax.data.row_checks.rendered)."""
    return validated_prompt_rows(read_rows(cfg, cache_dir), cfg, count_tokens, targets_in_messages=targets_in_messages,
                                 render=render)


def load_preference_rows(
    cfg: DataConfig, count_tokens: Callable[[Any], int] | None = None, cache_dir: str | None = None, *,
    render: Render | None = None,
) -> ValidatedRows:
    """Validated preference rows {"prompt", "chosen", "rejected"} of `cfg`."""
    return validated_preference_rows(read_rows(cfg, cache_dir), cfg, count_tokens, render=render)


def load_kto_rows(cfg: DataConfig, count_tokens: Callable[[Any], int] | None = None, *,
                  render: Render | None = None) -> ValidatedRows:
    """Validated KTO rows {"prompt", "completion", "label": bool} of `cfg` (text or conversations)."""
    return validated_kto_rows(read_rows(cfg), cfg, count_tokens, render=render)
