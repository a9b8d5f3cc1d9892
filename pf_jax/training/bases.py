"""The built-in base models (`arith-base`, `maze-base`): each is an ordinary trainer run of its recipe,
built into runs_dir/<name>/export before a run, an evaluation or a pseudo-label collection that names it."""

from __future__ import annotations

from pathlib import Path

import jax

from pf_jax.config import ConfigError, load_config
from pf_jax.config.recipe import ModelSection, TrainConfig
from pf_jax.training.model_source import BUILT_IN_BASES, built_in_base_directory
from pf_jax.training.trainer import Trainer


def ensure_built_in_base(name: str, runs_dir: str | Path) -> Path:
    """Train the built-in base model `name` with its recipe unless runs_dir/name/export already holds it."""
    recipe, what = BUILT_IN_BASES[name]
    directory = built_in_base_directory(name, runs_dir)
    if not (directory / "config.json").is_file():
        if not recipe.is_file():
            raise ConfigError(f"the {name} recipe {recipe} is missing from this installation")
        print(f"[pf_jax] building the {what} ({recipe.name}) into {directory.parent}")
        cfg = load_config(TrainConfig, recipe, [f"logging.runs_dir={runs_dir}"])
        prepare_model(cfg.model, runs_dir)
        Trainer(cfg, process_index=jax.process_index(), process_count=jax.process_count()).run()
    return directory


def prepare_model(model: ModelSection, runs_dir: str | Path) -> None:
    """Build the model a recipe names first, when it is a built-in base that is not there yet."""
    if model.name in BUILT_IN_BASES:
        ensure_built_in_base(model.name, runs_dir)
