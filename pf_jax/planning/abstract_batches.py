"""A recipe's batches as jax.ShapeDtypeStruct (no data): what its compiled programs are traced with.

    recipe_sizes      the padded shapes a run produces: prompt bucket P, response length R, rows of a
                      rollout, of one optimizer update and of one sampler call (see RecipeSizes)
    update_batch      one optimizer update's batch with the keys the method family's loss reads, as
                      ExperienceMaker / AgenticExperience / classifier_batch fill them (see
                      pf_jax.training.objective.build_loss_fn for the keys by family)
    sequence_batch    a SequenceBatch of B rows (a rollout, for the scoring passes)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pf_jax.config import ConfigError
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.sequences import SequenceBatch, bucket_length
from pf_jax.training.experience import compute_advantages, last_token_rewards
from pf_jax.training.methods import MethodSpec

SDS = jax.ShapeDtypeStruct


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


def recipe_sizes(cfg: TrainConfig, spec: MethodSpec, *, sampling: bool) -> RecipeSizes:
    """The shapes of the recipe's batches (the largest prompt bucket its prompts may fall in)."""
    r, P = cfg.rollout, bucket_length(cfg.data.max_prompt_tokens, minimum=8)
    if spec.responses == "env":  # one row per step taken, rows bucketed; the sampler runs each turn
        e = cfg.env
        episodes = e.tasks_per_step * e.group_size
        rows = bucket_length(episodes * e.max_steps, minimum=e.min_row_bucket)
        sizes = RecipeSizes(P, bucket_length(r.max_new_tokens), rows, rows // r.minibatches, episodes, 1, rows)
    elif sampling:
        n = r.prompts_per_step * r.samples_per_prompt
        pairs = spec.pairs_from_samples  # online DPO: one (chosen, rejected) pair per prompt
        rows = r.prompts_per_step if pairs else n
        sizes = RecipeSizes(P, r.max_new_tokens, n, rows // r.minibatches, r.prompts_per_step,
                            r.samples_per_prompt, rows)
    else:
        sizes = RecipeSizes(P, bucket_length(r.max_new_tokens), cfg.batch_size, cfg.batch_size, 0, 1,
                            cfg.batch_size)
    accum = cfg.optimizer.grad_accum_steps
    if sizes.update_rows < 1 or sizes.update_rows % accum:
        raise ConfigError(f"one update has {sizes.update_rows} rows ({sizes.sequences} per step / "
                          f"rollout.minibatches={r.minibatches if sampling else 1}), which optimizer."
                          f"grad_accum_steps={accum} does not split evenly")
    return sizes


def sequence_batch(rows: int, prompt_len: int, response_len: int) -> SequenceBatch:
    """Left-padded prompts [rows, P] next to right-padded responses [rows, R] (training/batch.py)."""
    tokens = lambda n: SDS((rows, n), jnp.int32)
    mask = lambda n: SDS((rows, n), jnp.bool_)
    return SequenceBatch(tokens(prompt_len), mask(prompt_len), tokens(response_len), mask(response_len))


def update_batch(cfg: TrainConfig, spec: MethodSpec, sizes: RecipeSizes, *, reference: bool,
                 sampling: bool) -> dict[str, Any]:
    """One optimizer update's batch for the method's family (keys as the response sources fill them)."""
    B, R = sizes.update_rows, sizes.response_len
    f32 = lambda *shape: SDS(shape, jnp.float32)
    if spec.family == "reward_model":
        from pf_jax.tasks.instructions.classifier_files import classifier_length_bucket

        T = classifier_length_bucket(cfg.reward_model.max_length, cfg.reward_model.max_length)
        return {"tokens": SDS((B, T), jnp.int32), "mask": SDS((B, T), jnp.bool_), "labels": f32(B)}
    seq = sequence_batch(B, sizes.prompt_len, R)
    ref = {"ref_logp": f32(B, R)} if reference else {}
    if spec.family == "preference":
        refs = {"ref_chosen_logp": f32(B, R), "ref_rejected_logp": f32(B, R)} if reference else {}
        return {"chosen": seq, "rejected": seq, **refs}
    if spec.family == "kto":
        return {"seq": seq, "ref_logp": f32(B, R), "desirable": SDS((B,), jnp.bool_)}
    if spec.family == "supervised":  # RFT / online RFT weight each sample by its correctness
        return {"seq": seq, "weights": f32(B)} if sampling else {"seq": seq}
    if spec.family == "gflownet":
        batch = {"seq": seq, "old_logp": f32(B, R), "base_logp": f32(B, R), "format_penalty": f32(B),
                 "log_reward": f32(B)}
        return {**batch, "log_z_prime": f32(B)} if cfg.method.log_z == "group" else batch
    if spec.responses == "env":  # step advantages broadcast over each row's tokens
        return {"seq": seq, "old_logp": f32(B, R), "advantages": f32(B, R), **ref}
    values = {"old_values": f32(B, R)} if spec.value_head else {}
    return {"seq": seq, "old_logp": f32(B, R), **ref, **values, **_estimates(cfg, spec, sizes, B)}


def _estimates(cfg: TrainConfig, spec: MethodSpec, sizes: RecipeSizes, rows: int) -> dict[str, SDS]:
    """advantages (and returns) shaped by the method's own estimator, traced abstractly over a rollout,
    then cut to one update's rows."""
    G, n, R = sizes.samples, sizes.sequences, sizes.response_len
    group_ids = np.repeat(np.arange(sizes.sampler_prompts), G)
    per_token = spec.loss in ("ppo", "reinforce_pp")
    step = None
    if spec.loss == "grpo_process":
        step = {"step_rewards": SDS((n, R), jnp.float32), "step_mask": SDS((n, R), jnp.bool_),
                "step_end": SDS((n, R), jnp.int32)}

    def estimate(rewards, mask, values, step):
        return compute_advantages(
            spec, cfg.method.advantage, rewards=rewards, group_ids=group_ids, num_groups=sizes.sampler_prompts,
            mask=mask, token_rewards=last_token_rewards(rewards, mask) if per_token else None, values=values,
            step_rewards=step)

    values = SDS((n, R), jnp.float32) if spec.value_head else None
    advantages, returns = jax.eval_shape(estimate, SDS((n,), jnp.float32), SDS((n, R), jnp.bool_), values, step)
    cut = lambda x: SDS((rows, *x.shape[1:]), x.dtype)
    return {"advantages": cut(advantages), **({"returns": cut(returns)} if returns is not None else {})}
