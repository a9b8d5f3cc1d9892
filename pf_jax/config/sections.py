"""Config sections shared by every recipe: optimizer, checkpoints, logging, data.

Every section is a frozen pydantic model that forbids unknown keys; a trainer schema composes them as
fields (`optimizer: OptimizerConfig = OptimizerConfig()`), and method-specific sections subclass `Section`.
"""

import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FLOAT32_MAX = float(np.finfo(np.float32).max)


class Section(BaseModel):
    """Base of every config section: immutable, unknown keys rejected, defaults validated too. Every float
    (typed fields and the values inside free-form mappings such as `method.loss`) must be finite and
    within float32's range: the arrays that carry them are float32, where 1e39 is already inf."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _floats_fit_float32(cls, value: Any) -> Any:
        for where, x in _floats(value, ""):
            at = f" (at {where.lstrip('.')})" if where else ""
            if not math.isfinite(x):
                raise ValueError(f"{x} is not a finite number{at}")
            if abs(x) > FLOAT32_MAX:
                raise ValueError(f"{x:g} does not fit in float32, largest {FLOAT32_MAX:.3g}{at}")
        return value


def _floats(value: Any, where: str) -> Iterator[tuple[str, float]]:
    """(dotted place, value) of every float in a field value (inside mappings and lists too)."""
    if isinstance(value, BaseModel):
        return  # a nested section checks its own fields
    if isinstance(value, float):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floats(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _floats(item, f"{where}[{i}]")


MAX_LR = 10.0  # far above any learning rate that trains (1e-6 .. 1e-2); above it an update only overflows


class OptimizerConfig(Section):
    """An optax optimizer and its learning-rate schedule (built by `pf_jax.training.optimizer`).

    The schedule ramps linearly from 0 to `lr` over `warmup_steps`, then stays (`constant`) or decays to
    `lr * final_lr_ratio` at `decay_steps` (`cosine` / `linear`); `decay_steps=None` means the run's total
    number of optimizer steps. `group_lr` gives parameter groups (labels from the trainer's label function,
    e.g. `{"log_z": 1e-3}`) their own peak learning rate; all other hyperparameters are shared.
    `grad_accum_steps` micro-batches are summed into one optimizer step by the trainer.
    """

    name: Literal["adamw", "adam", "sgd", "lion"] = "adamw"
    lr: float = Field(1e-5, gt=0.0, le=MAX_LR)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    decay_steps: int | None = Field(None, gt=0)
    final_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.999, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip_norm: float | None = Field(1.0, gt=0.0)
    grad_accum_steps: int = Field(1, ge=1)
    group_lr: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _group_lrs_positive(self) -> "OptimizerConfig":
        for group, lr in self.group_lr.items():
            if not 0.0 < lr <= MAX_LR:
                raise ValueError(f"group_lr.{group} must be a positive learning rate of at most {MAX_LR:g}, got {lr}")
        return self


class CheckpointConfig(Section):
    """Orbax checkpoints: saved every `every_steps` steps and at the end, the last `keep` kept.

    `dir=None` puts them under `<runs_dir>/<run_name>/checkpoints`; `resume` restores the latest good one.
    """

    dir: str | None = None
    every_steps: int = Field(100, ge=1)
    keep: int = Field(3, ge=1)
    async_save: bool = True
    resume: bool = True


class LoggingConfig(Section):
    """Per-step metrics to the terminal, `<runs_dir>/<run_name>/metrics.jsonl`, TensorBoard, optional wandb."""

    run_name: str = Field("pf_jax", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    runs_dir: str = "runs"
    every_steps: int = Field(1, ge=1)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str | None = None
    progress_bar: bool = True
    plots: bool = True
    completions_every: int = Field(0, ge=0)
    completions_count: int = Field(4, ge=1)

    @field_validator("run_name")
    @classmethod
    def _inside_runs_dir(cls, name: str) -> str:
        if name in (".", ".."):  # the pattern admits no '/', so these are the only escapes
            raise ValueError(f"{name!r} names no directory inside runs_dir; use a plain name such as 'my-run'")
        return name


class DataConfig(Section):
    """Where prompts (or preference pairs) come from and what to do with a malformed row.

    `source` is a synthetic task name, a local `.jsonl`/`.json`/`.parquet` path, or a hub dataset name;
    `format="auto"` decides by the file suffix, then the synthetic registry, then the hub. A row may be
    conversational (TRL / the hub's format): `{"messages": [{"role", "content"}, ...]}`, or prompt /
    chosen / rejected / completion fields holding message lists; it is rendered with the tokenizer's
    chat template, and `assistant_only_loss` trains on the assistant turns only. `packing` packs several
    SFT rows into each sequence of `packed_length` tokens, no row attending to another.
    """

    source: str = "arithmetic"
    format: Literal["auto", "synthetic", "jsonl", "parquet", "hub"] = "auto"
    split: str = "train"
    prompt_field: str = "prompt"
    answer_field: str | None = "answer"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_prompt_tokens: int = Field(512, ge=1)
    on_bad_row: Literal["skip", "stop"] = "skip"
    shuffle: bool = True
    shuffle_seed: int = 0
    messages_field: str = "messages"
    assistant_only_loss: bool = True
    packing: bool = False
    packed_length: int = Field(1024, ge=8)
