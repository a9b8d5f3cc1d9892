"""A recipe's batch shapes with no data: what its compiled programs are traced with.

    recipe_sizes      the padded shapes a run produces: prompt bucket P, response length R, rows of a
                      rollout, of one optimizer update and of one sampler call (see RecipeSizes)
    update_batch      one optimizer update's typed batch of ShapeDtypeStructs, as the objective declares it
                      (Objective.abstract_batch)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pf_jax.config import ConfigError
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.sequences import bucket_length
from pf_jax.methods.batches import BatchShape
from pf_jax.methods.compose import Composition


@dataclass(frozen=True)
class RecipeSizes:
    """prompt_len: the prompt bucket (a power of two >= 8, bounded by data.max_prompt_tokens);
    response_len: rollout.max_new_tokens for sampled responses, its bucket for packed ones;
    sequences: rows a step's rollout (or dataset batch) yields; update_rows: rows of one optimizer update
    (a minibatch; the step splits it into optimizer.grad_accum_steps micro-batches); sampler_prompts x
    samples: one sampler call (0 prompts: no sampler); scored_rows: rows of one scoring pass."""

    prompt_len: int
    response_len: int
    sequences: int
    update_rows: int
    sampler_prompts: int
    samples: int
    scored_rows: int

    @property
    def length(self) -> int:
        return self.prompt_len + self.response_len


def recipe_sizes(cfg: TrainConfig, composition: Composition) -> RecipeSizes:
    """The shapes of the recipe's batches (the largest prompt bucket its prompts may fall in)."""
    r, P = cfg.rollout, bucket_length(cfg.data.max_prompt_tokens, minimum=8)
    if composition.kind == "env":  # one row per step taken, rows bucketed; the sampler runs each turn
        e = cfg.env
        episodes = e.tasks_per_step * e.group_size
        rows = bucket_length(episodes * e.max_steps, minimum=e.min_row_bucket)
        sizes = RecipeSizes(P, bucket_length(r.max_new_tokens), rows, rows // r.minibatches, episodes, 1, rows)
    elif composition.samples:
        n = r.prompts_per_step * r.samples_per_prompt
        rows = r.prompts_per_step if composition.kind == "sample_pairs" else n  # online DPO: a pair per prompt
        sizes = RecipeSizes(P, r.max_new_tokens, n, rows // r.minibatches, r.prompts_per_step,
                            r.samples_per_prompt, rows)
    else:
        sizes = RecipeSizes(P, bucket_length(r.max_new_tokens), cfg.batch_size, cfg.batch_size, 0, 1,
                            cfg.batch_size)
    accum = cfg.optimizer.grad_accum_steps
    if sizes.update_rows < 1 or sizes.update_rows % accum:
        raise ConfigError(f"one update has {sizes.update_rows} rows ({sizes.sequences} per step / "
                          f"rollout.minibatches={r.minibatches if composition.samples else 1}), which optimizer."
                          f"grad_accum_steps={accum} does not split evenly")
    return sizes


def update_batch(composition: Composition, sizes: RecipeSizes) -> Any:
    """One optimizer update's batch, abstract, as the objective declares it."""
    shape = BatchShape(sizes.update_rows, sizes.prompt_len, sizes.response_len, sizes.sequences,
                       max(sizes.sampler_prompts, 1))
    return composition.objective.abstract_batch(shape)
