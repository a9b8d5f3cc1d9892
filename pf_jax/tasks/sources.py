"""Where a recipe's rows come from (`data.source`): a synthetic task by name, else a local jsonl / parquet
file or a hub dataset (pf_jax.data.loading), validated with the recipe's bad-row policy.

`format="auto"` decides by the file suffix, then this registry of synthetic tasks, then the hub.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pf_jax.config import ConfigError, DataConfig
from pf_jax.data.loading import (
    LOCAL_FORMATS,
    file_format,
    read_file_rows,
    validated_preference_rows,
    validated_prompt_rows,
)
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
    cfg: DataConfig, count_tokens: Callable[[str], int] | None = None, cache_dir: str | None = None
) -> ValidatedRows:
    """Validated prompt rows {"prompt", "answer"?} of `cfg`, with the skip/stop policy applied."""
    return validated_prompt_rows(read_rows(cfg, cache_dir), cfg, count_tokens)


def load_preference_rows(
    cfg: DataConfig, count_tokens: Callable[[str], int] | None = None, cache_dir: str | None = None
) -> ValidatedRows:
    """Validated preference rows {"prompt", "chosen", "rejected"} of `cfg`."""
    return validated_preference_rows(read_rows(cfg, cache_dir), cfg, count_tokens)


def load_kto_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """Rows {"prompt", "completion", "label": bool} of `cfg`; a row missing a field is skipped (counted in
    the printed summary) or, with data.on_bad_row=stop, a ConfigError naming it."""
    raw = list(read_rows(cfg))
    rows = []
    for i, row in enumerate(raw):
        missing = [k for k in ("prompt", "completion", "label") if not isinstance(row, Mapping) or k not in row]
        if missing:
            if cfg.on_bad_row == "stop":
                raise ConfigError(f"bad row {i} in {cfg.source}: missing field(s) {missing} for KTO")
            continue
        rows.append({"prompt": row["prompt"], "completion": row["completion"], "label": bool(row["label"])})
    print(f"[pf_jax] KTO rows: kept {len(rows)} of {len(raw)}")
    return rows
