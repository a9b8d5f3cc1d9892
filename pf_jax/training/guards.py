"""Checks that stop a run early with a message instead of training on, or from, something broken.

- `check_writable`: the run and checkpoint directories can be written (before any step is spent);
- `check_prompts_fit`: the longest prompt (plus the tokens to sample) fits the model's context;
- `check_slots_fit`: continuous batching's slots of KV cache fit in memory;
- `SkipGuard`: too many steps in a row whose every update was skipped (non-finite loss, gradient or
  update; see training/step.py), or a run whose every step was skipped, stops with the likely cause.
  The trainer's error path then saves the last finished step, and nothing is exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pf_jax.config.errors import ConfigError, UserError
from pf_jax.config.recipe import TrainConfig
from pf_jax.models.config import ModelConfig
from pf_jax.sampling.prompts import bucket_length
from pf_jax.training.run_storage import probe_writable

PROMPT_BUCKET = 8  # the trainer's sampler buckets prompt lengths to powers of two from 8 (experience.py)


class TrainingStalledError(UserError):
    """Updates kept being skipped because the loss, gradients or update were not finite."""


def check_writable(cfg: TrainConfig) -> None:
    """The run directory and the checkpoint directory accept a write."""
    run_dir = Path(cfg.logging.runs_dir) / cfg.logging.run_name
    probe_writable(run_dir)
    probe_writable(Path(cfg.checkpoint.dir) if cfg.checkpoint.dir is not None else run_dir / "checkpoints")


def check_prompts_fit(rows: Sequence[Mapping[str, Any]], count_tokens: Callable[[str], int], model: ModelConfig,
                      cfg: TrainConfig, *, sampling: bool) -> None:
    """ConfigError when the longest prompt, padded to its bucket, plus rollout.max_new_tokens (sampling
    methods) is longer than the model's context. Prompts are counted only when data.max_prompt_tokens
    does not already bound them."""
    new_tokens = cfg.rollout.max_new_tokens if sampling else 0
    context = model.max_position_embeddings
    if bucket_length(cfg.data.max_prompt_tokens, minimum=PROMPT_BUCKET) + new_tokens <= context:
        return
    prompts = [row["prompt"] for row in rows if isinstance(row, Mapping) and isinstance(row.get("prompt"), str)]
    tokens = max(map(count_tokens, prompts), default=0)
    if bucket_length(tokens, minimum=PROMPT_BUCKET) + new_tokens > context:
        raise ConfigError(
            f"the longest prompt of data.source '{cfg.data.source}' has {tokens} tokens (padded to "
            f"{bucket_length(tokens, minimum=PROMPT_BUCKET)}), which with rollout.max_new_tokens={new_tokens} "
            f"exceeds the model's context of {context} tokens (max_position_embeddings); "
            f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} lets it through",
            hint=f"set data.max_prompt_tokens to at most {context - new_tokens} to skip such prompts")


def check_slots_fit(policy: Any, cfg: TrainConfig, *, sampling: bool) -> None:
    """ConfigError, before any step, when continuous batching's KV cache (rollout.slots rows of prompt bucket of
    data.max_prompt_tokens + rollout.max_new_tokens slots each, or rollout.kv_cache=paged's pool) does not fit
    in free memory."""
    rollout = cfg.rollout
    if not sampling or rollout.batching != "continuous":
        return
    from pf_jax.sampling.continuous import check_kv_memory
    from pf_jax.sampling.slot_caches import SLOT_CACHES

    slots = rollout.slots or rollout.prompts_per_step * rollout.samples_per_prompt
    kv = SLOT_CACHES[rollout.kv_cache](rollout, bucket_length(cfg.data.max_prompt_tokens, minimum=PROMPT_BUCKET))
    check_kv_memory(policy, kv, slots, bucket_length(rollout.prompts_per_step, minimum=1))


class SkipGuard:
    """Stops a run whose updates keep being skipped. `observe(step, metrics)` once per finished step, whose
    `skipped` metric counts the step's skipped updates (of `updates_per_step`)."""

    def __init__(self, max_consecutive: int, total_steps: int, updates_per_step: int, lr: float) -> None:
        self.max_consecutive, self.total_steps, self.lr = max_consecutive, total_steps, lr
        self.updates_per_step = updates_per_step
        self.consecutive = 0
        self.any_applied = False

    @classmethod
    def from_config(cls, cfg: TrainConfig, updates_per_step: int) -> SkipGuard:
        return cls(cfg.training.max_consecutive_skips, cfg.steps, updates_per_step, cfg.optimizer.lr)

    def observe(self, step: int, metrics: Mapping[str, float]) -> None:
        """Report step `step` (1-based) when any of its updates was skipped; raise TrainingStalledError after
        max_consecutive steps in a row with no update applied, or at the last step if none ever was."""
        skipped = int(metrics.get("skipped", 0.0))
        if skipped:
            print(f"[pf_jax] step {step}: {skipped} of {self.updates_per_step} update(s) skipped: non-finite loss, "
                  f"gradient or update (loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')})")
        if skipped < self.updates_per_step:
            self.consecutive, self.any_applied = 0, True
            return
        loss, grad_norm = metrics.get("loss", math.nan), metrics.get("grad_norm", math.nan)
        self.consecutive += 1
        stalled = self.consecutive >= self.max_consecutive
        if not stalled and not (step == self.total_steps and not self.any_applied):
            return
        first = step - self.consecutive + 1
        raise TrainingStalledError(
            f"every update of steps {first}-{step} was skipped ({self.consecutive} steps in a row, "
            f"training.max_consecutive_skips={self.max_consecutive}): {self._cause(loss, grad_norm)}. The run "
            "stopped before exporting; no skipped step changed the parameters",
            hint="fix the cause and rerun the same command: it resumes from the last checkpoint")

    def _cause(self, loss: float, grad_norm: float) -> str:
        if not math.isfinite(loss):
            return (f"the loss is {loss}: likely NaN/inf or overflowing weights in the model, or a NaN reward "
                    "or data value")
        if not math.isfinite(grad_norm):
            return (f"the gradient norm is {grad_norm}: likely an overflow in the backward pass (bfloat16 compute, "
                    "or a large method.alpha or reward.scale)")
        return (f"the loss ({loss:.4g}) and gradients are finite but the update is not: likely "
                f"optimizer.lr={self.lr:g} is too high")
