"""`train(cfg)`: a recipe end to end, the body of `python -m pf_jax.train`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from pf_jax.config import ConfigError
from pf_jax.config.recipe import TrainConfig
from pf_jax.methods.compose import check_recipe
from pf_jax.rewards.custom import register
from pf_jax.sharding.distributed import initialize_distributed
from pf_jax.training.bases import prepare_model
from pf_jax.training.trainer import RunResult, Trainer


def train(cfg: TrainConfig, reward_fn: Callable[..., Any] | None = None) -> RunResult:
    """Check the recipe against its method, join a multi-process run when the environment describes one
    (pf_jax.sharding.distributed), build the built-in base model the recipe names if it is not there yet,
    then train, evaluate and export.

    reward_fn: a reward function of the user's, `fn(prompts, completions, **fields) -> floats` (TRL's
    reward_funcs convention, pf_jax.rewards.custom), used as reward.name; the recipe's reward.name must
    then be unset (or name the same function)."""
    if reward_fn is not None:
        cfg = with_reward_fn(cfg, reward_fn)
    check_recipe(cfg)
    initialize_distributed()
    prepare_model(cfg.model, cfg.logging.runs_dir)
    return Trainer(cfg, process_index=jax.process_index(), process_count=jax.process_count()).run()


def with_reward_fn(cfg: TrainConfig, reward_fn: Callable[..., Any]) -> TrainConfig:
    """cfg with reward.name naming `reward_fn` (registered in this process: pf_jax.rewards.custom)."""
    name = register(reward_fn)
    if cfg.reward.name not in (None, name):
        raise ConfigError(f"train(cfg, reward_fn={name}) and reward.name={cfg.reward.name!r} both name the reward; "
                          "pass one of them")
    return cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"name": name})})
