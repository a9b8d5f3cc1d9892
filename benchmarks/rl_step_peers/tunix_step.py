"""Tunix's side of bench_rl_step.py: GRPO steps of Tunix's GrpoLearner on the shared spec, a JSON line each.

    .venv-tunix/bin/python benchmarks/rl_step_peers/tunix_step.py SPEC.json

Setup (Tunix 0.1.7, one CPU device, a 1x1 ('fsdp', 'tp') mesh shared by every role):
- model: tunix.models.gemma3 ModelConfig.gemma3_270m() with param_dtype = spec dtype, loaded from model_dir's
  safetensors by params_safetensors.create_model_from_safe_tensors in that dtype; the reference model is a
  second load of the same checkpoint (frozen: RLCluster never trains it). Actor and rollout share one mesh, so
  RLCluster's vanilla rollout samples with the trained model itself (no weight sync).
- prompts: the first P rows, rendered by the tokenizer's chat template (generation prompt); every batch of the
  dataset is these P prompts with their answers, one batch per step.
- rollout (RolloutConfig, rollout_engine="vanilla": tunix.generate.sampler.Sampler): G samples per prompt
  (GRPOConfig.num_generations), temperature 1.0, top_p 1.0 and top_k None (the sampler then draws from the
  full-vocabulary categorical), max_tokens_to_generate T, prompts left-padded to the longest prompt
  (max_prompt_length), a KV cache of exactly max_prompt_length + T, and a new seed per step.
  Fixed length: eos_tokens is an id outside the vocabulary, which the sampler can never draw, so no row is
  ever "done" and every completion is exactly T tokens (Tunix's vanilla rollout has no min_new_tokens or
  EOS-suppression option). Deviation: pf_jax and TRL exclude EOS from the distribution (min_new_tokens);
  here an EOS token may be drawn and the row simply goes on. The tokens decoded and trained on are as many.
- reward: the shared reward.py function (reward_fns); advantages: Tunix's "grpo" estimator (group mean / std).
- loss (GRPOConfig): Tunix's "grpo" policy loss, epsilon 0.2, num_iterations 1 (so no old-policy pass: the
  ratio is exp(logp - stop_gradient(logp)) = 1), beta = spec beta with kl_loss_mode "low_var_kl" (the k3
  estimator exp(ref - logp) - (ref - logp) - 1; Tunix's default "kl" would be k1), loss_agg_mode
  "sequence-mean-token-mean" (Tunix's default; with fixed-length completions it equals the token mean).
  Tunix's loss also computes the token entropy of the logits (logged, not in the loss).
- update (RLTrainingConfig): optax.MultiSteps(chain(clip_by_global_norm(1.0), adamw(lr, weight_decay=0)))
  via mini_batch_size = P prompts (one optimizer update per step, over all P*G sequences) and
  train_micro_batch_size = micro_batch / G prompts (= micro_batch sequences; Tunix derives
  gradient_accumulation_steps = P*G / micro_batch and averages the micro-batch gradients before the clip).
  Tunix counts micro-batches in prompts: when micro_batch is not a multiple of G dividing P*G, the nearest
  whole number of prompts is used (train_micro_prompts, logged).
  rollout_micro_batch_size = P (one sampler call over all P*G sequences, like pf_jax and TRL);
  compute_logps_micro_batch_size = train_micro_batch_size (the reference scores micro_batch sequences a call).

A step = one GrpoLearner global step (`_run_global_step`): the rollout (sampling, reward, advantages, the
reference's log-probs: `_generate_and_compute_advantage`, timed as rollout_s after block_until_ready on its
TrainExample) then grad_accum_steps actor train steps (the rest, update_s), step_s ending after
block_until_ready on the actor's parameters. The learner is driven by GrpoLearner.train over warmup + steps
batches (max_steps = warmup + steps); the first warmup steps include compilation. The loss printed is the mean
of the step's micro-batch losses (the actor trainer's metrics buffer). Logs go to stderr.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from transformers import AutoTokenizer
from tunix.models.gemma3 import model as gemma3_model
from tunix.models.gemma3 import params_safetensors
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_reward(name: str):
    """`module:function` from this worker's directory (the shared reward.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def load_model(model_dir: str, dtype: jnp.dtype, mesh: jax.sharding.Mesh) -> nnx.Module:
    config = gemma3_model.ModelConfig.gemma3_270m()
    config.param_dtype = dtype
    return params_safetensors.create_model_from_safe_tensors(model_dir, config, mesh=mesh, dtype=dtype)


def prompt_batch(spec: dict, tokenizer) -> tuple[dict, int]:
    """The first P rows as one batch {prompts: rendered text, answer}, and the longest prompt in tokens."""
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()[: spec["prompts"]]]
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
             for r in rows]
    # The rendered text starts with <bos>; Tunix's sampler deduplicates the <bos> its encode() adds.
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"prompts": texts, "answer": [str(r["answer"]) for r in rows]}, longest


def train_micro_prompts(spec: dict) -> int:
    """Prompts per gradient-accumulation micro-batch (Tunix splits a batch by prompt, with its G samples):
    micro_batch / G, else the divisor of P whose micro-batch is nearest to micro_batch sequences."""
    prompts, samples = spec["prompts"], spec["samples"]
    divisors = [d for d in range(1, prompts + 1) if prompts % d == 0]
    nearest = min(divisors, key=lambda d: abs(d * samples - spec["micro_batch"]))
    if nearest * samples != spec["micro_batch"]:
        log(f"tunix: micro_batch {spec['micro_batch']} is not a whole number of prompts x G={samples}; "
            f"using {nearest * samples} sequences per micro-batch")
    return nearest


def rollout_config(spec: dict, max_prompt_length: int, vocab: int) -> base_rollout.RolloutConfig:
    return base_rollout.RolloutConfig(
        max_tokens_to_generate=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=None,
        max_prompt_length=max_prompt_length, kv_cache_size=max_prompt_length + spec["max_new_tokens"],
        eos_tokens=[vocab],  # an id the sampler never draws: no early stop, exactly T tokens per completion
    )


def training_config(spec: dict) -> rl_cluster_lib.RLTrainingConfig:
    micro = train_micro_prompts(spec)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(spec["lr"], weight_decay=0.0))
    return rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=spec["warmup"] + spec["steps"],
        mini_batch_size=spec["prompts"], train_micro_batch_size=micro,
        rollout_micro_batch_size=spec["prompts"], compute_logps_micro_batch_size=micro,
    )


class TimedGrpoLearner(grpo_learner.GrpoLearner):
    """GrpoLearner that prints each global step's wall time (rollout / update split) as one JSON line."""

    def __init__(self, *args, warmup: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.warmup, self.step, self.rollout_s = warmup, 0, 0.0

    def _generate_and_compute_advantage(self, training_input, mode=rl_cluster_lib.Mode.TRAIN):
        start = time.perf_counter()
        example = jax.block_until_ready(super()._generate_and_compute_advantage(training_input, mode))
        self.rollout_s += time.perf_counter() - start
        lengths = np.asarray(example.completion_mask).sum(axis=-1)
        ref_logp = float(np.mean(np.asarray(example.ref_per_token_logps)))
        log(f"tunix step {self.step}: completions {tuple(example.completion_ids.shape)}, {lengths.min()}.."
            f"{lengths.max()} tokens each, reference log-prob per token {ref_logp:.2f}, "
            f"advantages {np.asarray(example.advantages).round(3)}")
        return example

    def _run_global_step(self, *args, **kwargs):
        # A fresh sampling key each step (with seed None, Tunix's sampler would reuse PRNGKey(0) every step).
        self.rl_cluster.cluster_config.rollout_config.seed = self.step
        self.rollout_s, start = 0.0, time.perf_counter()
        super()._run_global_step(*args, **kwargs)
        jax.block_until_ready(nnx.state(self.rl_cluster.actor_trainer.model, nnx.Param))
        step_s = time.perf_counter() - start
        print(json.dumps({"step": self.step, "warmup": self.step < self.warmup, "step_s": step_s,
                          "rollout_s": self.rollout_s, "update_s": step_s - self.rollout_s,
                          "loss": self.last_loss()}), flush=True)
        self.step += 1

    def last_loss(self) -> float:
        buffer = getattr(self.rl_cluster.actor_trainer, "_prev_buffered_train_metrics", None)
        return float(buffer.loss) if buffer is not None else float("nan")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    dtype = jnp.dtype(spec["dtype"])
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)  # Tunix's models assume Auto axes
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    batch, longest = prompt_batch(spec, tokenizer)
    actor = load_model(spec["model_dir"], dtype, mesh)
    reference = load_model(spec["model_dir"], dtype, mesh)
    roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT)
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, tokenizer=tokenizer,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={role: mesh for role in roles}, rollout_engine="vanilla",
            training_config=training_config(spec),
            rollout_config=rollout_config(spec, longest, actor.config.num_embed)))
    algo = grpo_learner.GrpoConfig(num_generations=spec["samples"], num_iterations=1, beta=spec["beta"],
                                   epsilon=0.2, kl_loss_mode="low_var_kl")
    learner = TimedGrpoLearner(rl_cluster=cluster, algo_config=algo, reward_fns=load_reward(spec["reward"]),
                               warmup=spec["warmup"])
    accumulation = cluster.actor_trainer.config.gradient_accumulation_steps
    log(f"tunix: P={spec['prompts']} G={spec['samples']} T={spec['max_new_tokens']} {dtype}, prompt length "
        f"{longest}, gradient_accumulation_steps={accumulation} (spec {spec['grad_accum_steps']}), "
        f"weight sync {learner.should_sync_weights}")
    learner.train([batch] * (spec["warmup"] + spec["steps"]))


if __name__ == "__main__":
    main()
