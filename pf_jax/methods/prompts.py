"""Prompt sources: the rows a response source reads, and the resumable iterator that yields them.

    dataset rows   prompts (+ reference answers), SFT pairs, preference pairs, KTO rows or classifier
                   rows of `data.source`, by the response source's kind; a deterministic, process-sharded
                   BatchIterator over them (pf_jax.data.iterator)
    curriculum     the instruction tasks' constraint-count curriculum (pf_jax.tasks.instructions)
    task pool      an environment's (task, seed) rows (pf_jax.methods.env_rollouts)
"""

from __future__ import annotations

import logging
from typing import Any

from pf_jax.config import ConfigError
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.codec import TextCodec
from pf_jax.data.examples import encode_example, sft_example
from pf_jax.data.holdout import split_held_out
from pf_jax.data.iterator import BatchIterator
from pf_jax.methods.env_rollouts import task_pool_rows
from pf_jax.methods.protocols import PromptSource
from pf_jax.tasks.instructions.reward_model import load_classifier_rows
from pf_jax.tasks.instructions.rows import curriculum_batches, instruction_source_kind, load_instruction_rows
from pf_jax.tasks.sources import load_kto_rows, load_preference_rows, load_prompt_rows

SAMPLED = frozenset({"policy", "reference", "sample_pairs", "env"})
_PHASE = logging.getLogger("pf_jax.phase")  # what a CLI shows while it starts (pf_jax.phases)


def training_rows(cfg: TrainConfig, kind: str, codec: TextCodec) -> list[dict[str, Any]]:
    """The validated rows a response source of `kind` reads (see pf_jax.methods.registry.ResponseKind)."""
    _PHASE.info("reading the training rows (%s)", cfg.env.name if kind == "env" else cfg.data.source)
    if kind == "env":
        return task_pool_rows(cfg.env)
    if kind == "labelled":
        return load_classifier_rows(cfg.data, cfg.reward_model.synthetic_examples)
    if instruction_source_kind(cfg.data) is not None:
        if kind not in SAMPLED:
            raise ConfigError(f"data.source '{cfg.data.source}' gives instruction prompts without responses; method "
                              f"{cfg.method.name!r} trains on dataset responses (use a sampling method, e.g. grpo)")
        return load_instruction_rows(cfg.data, cfg.curriculum.synthetic_instructions)
    count = lambda prompt: len(codec.encode_prompt(prompt))
    if kind == "kto":
        rows = load_kto_rows(cfg.data, count, render=lambda row: sft_example(codec, row, "completion"))
    elif kind == "pairs":
        rows = load_preference_rows(cfg.data, count, render=lambda row: [
            encode_example(codec, row["prompt"], row[side]) for side in ("chosen", "rejected")])
    else:
        render = (lambda row: sft_example(codec, row, "answer")) if kind == "dataset" else None
        rows = load_prompt_rows(cfg.data, count, targets_in_messages=kind == "dataset", render=render)
    if rows.report.skipped:
        print(f"[pf_jax] data: {rows.report.summary()}")
    return without_held_out(cfg, list(rows.rows))


def without_held_out(cfg: TrainConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows left to train on once eval.fraction's hash-chosen share is held out for evaluation."""
    if cfg.eval.fraction is None:
        return rows
    train, test = split_held_out(rows, cfg.eval.fraction)
    if not train or not test:
        raise ConfigError(f"eval.fraction={cfg.eval.fraction} of the {len(rows)} rows of {cfg.data.source} leaves "
                          f"{len(train)} to train on and {len(test)} to evaluate; both need at least one row")
    print(f"[pf_jax] data: {len(test)} of {len(rows)} rows held out for evaluation (eval.fraction={cfg.eval.fraction})")
    return train


def rows_per_step(cfg: TrainConfig, kind: str) -> int:
    """Rows of one step's global batch: environment tasks, prompts to sample from, or dataset rows."""
    if kind == "env":
        return cfg.env.tasks_per_step
    return cfg.rollout.prompts_per_step if kind in SAMPLED else cfg.batch_size


def prompt_source(cfg: TrainConfig, kind: str, rows: list[dict[str, Any]], *, process_index: int = 0,
                  process_count: int = 1) -> PromptSource:
    """The curriculum for a sampled instruction source with levels, else the batch iterator over `rows`."""
    per_step = rows_per_step(cfg, kind)
    iterator = BatchIterator(rows, per_step, seed=cfg.data.shuffle_seed, shuffle=cfg.data.shuffle,
                             process_index=process_index, process_count=process_count)
    if kind in SAMPLED and kind != "env":
        curriculum = curriculum_batches(cfg, per_step, process_index=process_index, process_count=process_count)
        return curriculum or iterator
    return iterator
