"""`train(cfg)`: a recipe end to end, the body of `python -m pf_jax.train`."""

from __future__ import annotations

import jax

from pf_jax.config.recipe import TrainConfig
from pf_jax.methods.compose import check_recipe
from pf_jax.sharding.distributed import initialize_distributed
from pf_jax.training.bases import prepare_model
from pf_jax.training.trainer import RunResult, Trainer


def train(cfg: TrainConfig) -> RunResult:
    """Check the recipe against its method, join a multi-process run when the environment describes one
    (pf_jax.sharding.distributed), build the built-in base model the recipe names if it is not there yet,
    then train, evaluate and export."""
    check_recipe(cfg)
    initialize_distributed()
    prepare_model(cfg.model, cfg.logging.runs_dir)
    return Trainer(cfg, process_index=jax.process_index(), process_count=jax.process_count()).run()
