"""The recipe's update as the trainer builds it: the trained modules (policy + the objective's heads), the
objective's loss, the optimizer and the (not yet jitted) step function.

One builder for the two users that must agree: Trainer.__init__ runs it on the loaded policy, and the
compiled dry run (pf_jax.planning.compiled_plan) on an abstract one (nnx.eval_shape) to compile the very
step the run would execute for a TPU topology.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pf_jax.config.recipe import TrainConfig
from pf_jax.methods.compose import Composition
from pf_jax.models.lora import LoraParam, graphdef_without_adapters
from pf_jax.training.optimizer import build_optimizer
from pf_jax.training.step import LossFn, TrainState, make_train_step

StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]


@dataclass(frozen=True)
class RecipeUpdate:
    """What one optimizer update needs: graph definitions and parameters of every trained module, the loss,
    the optax transformation, the step function and the compute dtype it casts to (None: none). With LoRA
    the policy's trained parameters are its adapters and its base is frozen; base_graphdef is the policy
    without adapters (the reference / base model the base parameters make on their own)."""

    graphdefs: dict[str, nnx.GraphDef]
    params: dict[str, nnx.State]
    frozen: dict[str, nnx.State]  # per module, parameters merged in but not trained (LoRA's base)
    loss_fn: LossFn
    tx: optax.GradientTransformation
    step_fn: StepFn
    compute_dtype: Any
    updates_per_step: int
    base_graphdef: nnx.GraphDef | None = None


def compute_dtype(cfg: TrainConfig) -> Any:
    """bfloat16 for mixed precision (bf16 compute over fp32 master weights), else None (no cast)."""
    return jnp.bfloat16 if (cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32") else None


def updates_per_step(cfg: TrainConfig, sampling: bool) -> int:
    """Optimizer updates per training step: every minibatch of every reuse of a rollout batch."""
    r = cfg.rollout
    return (r.updates_per_batch * r.minibatches) if sampling else 1


def build_update(cfg: TrainConfig, composition: Composition, policy: nnx.Module) -> RecipeUpdate:
    """The recipe's update around `policy` (a loaded Decoder, or an abstract one from nnx.eval_shape): the
    policy and the objective's heads trained by its loss. A policy that does not train (a frozen backbone
    under the classifier's head) gets a zero update and no optimizer state."""
    objective = composition.objective
    modules: dict[str, nnx.Module] = {"policy": policy, **objective.heads(policy.cfg.hidden_size, cfg.seed)}
    split = {k: nnx.split(m, nnx.Param) for k, m in modules.items()}
    graphdefs = {k: g for k, (g, _) in split.items()}
    params = {k: p for k, (_, p) in split.items()}
    frozen, base_graphdef = {}, None
    if policy.lora is not None:  # only the adapters train; the base is frozen and is the reference
        graphdefs["policy"], params["policy"], frozen["policy"] = nnx.split(policy, LoraParam, nnx.Param)
        base_graphdef = graphdef_without_adapters(policy)
    loss_fn = objective.loss
    frozen_policy = not composition.trains_policy
    per_step = updates_per_step(cfg, composition.samples)
    labels = {name: jax.tree_util.tree_map(lambda _, n=name: n, p) for name, p in params.items()}
    tx = build_optimizer(cfg.optimizer, cfg.steps * per_step, param_labels=labels,
                         frozen_groups=frozenset({"policy"}) if frozen_policy else frozenset())
    dtype = compute_dtype(cfg)
    dropout = policy.lora is not None and policy.lora.dropout > 0
    step_fn = make_train_step(graphdefs, loss_fn, tx, microbatches=cfg.optimizer.grad_accum_steps,
                              compute_dtype=dtype, dropout=dropout)
    return RecipeUpdate(graphdefs, params, frozen, loss_fn, tx, step_fn, dtype, per_step, base_graphdef)
