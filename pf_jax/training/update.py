"""The recipe's update as the trainer builds it: the trained modules (policy + heads), the method's loss,
the optimizer and the (not yet jitted) step function.

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

from pf_jax.config import ConfigError
from pf_jax.config.recipe import TrainConfig
from pf_jax.losses import get_loss_method
from pf_jax.models.heads import LogPartitionHead, ValueHead
from pf_jax.tasks.instructions.classifier import ConstraintClassifierHead
from pf_jax.training.methods import MethodSpec
from pf_jax.training.objective import LossFn, bind_loss, build_loss_fn
from pf_jax.training.optimizer import build_optimizer
from pf_jax.training.step import TrainState, make_train_step

StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]


@dataclass(frozen=True)
class RecipeUpdate:
    """What one optimizer update needs: graph definitions and parameters of every trained module, the loss,
    the optax transformation, the step function and the compute dtype it casts to (None: none)."""

    graphdefs: dict[str, nnx.GraphDef]
    params: dict[str, nnx.State]
    loss_fn: LossFn
    tx: optax.GradientTransformation
    step_fn: StepFn
    compute_dtype: Any
    updates_per_step: int


def trained_heads(cfg: TrainConfig, spec: MethodSpec, hidden_size: int) -> dict[str, nnx.Module]:
    """The heads trained beside the policy: log Z'(q) (GFlowNet, method.log_z=head), the value head (PPO),
    the constraint classifier (reward_model)."""
    heads: dict[str, nnx.Module] = {}
    if spec.log_z_head and cfg.method.log_z == "head":
        heads["log_z"] = LogPartitionHead(hidden_size, cfg.model.log_z_width, rngs=nnx.Rngs(cfg.seed + 1))
    if spec.value_head:
        heads["value"] = ValueHead(hidden_size, rngs=nnx.Rngs(cfg.seed + 2))
    if spec.family == "reward_model":
        heads["classifier"] = ConstraintClassifierHead(hidden_size, cfg.reward_model.mlp_dim,
                                                       rngs=nnx.Rngs(cfg.seed + 3))
    return heads


def recipe_loss_fn(cfg: TrainConfig, spec: MethodSpec) -> LossFn:
    """`loss_fn(modules, batch)` of the recipe: the method's registry loss with method.loss bound (the
    GFlowNet exponent from method.alpha), over the policy's chunked log-probs, plus entropy / value terms."""
    loss_overrides = dict(cfg.method.loss)
    if spec.family == "gflownet":
        if "alpha" in loss_overrides:
            raise ConfigError("set the GFlowNet target exponent with method.alpha, not method.loss.alpha")
        if spec.loss == "powerflow":
            loss_overrides["alpha"] = cfg.method.alpha
    try:
        loss = bind_loss(spec.loss, loss_overrides)
    except ValueError as error:
        raise ConfigError(f"method.loss: {error}") from error
    value_coef = cfg.method.value_coef
    if value_coef is None:
        value_coef = get_loss_method(spec.loss).value_coef
    if spec.family == "reward_model":
        from pf_jax.tasks.instructions.reward_model import classifier_loss_fn

        return classifier_loss_fn(loss, freeze_backbone=cfg.reward_model.freeze_backbone)
    return build_loss_fn(spec, loss, chunk_size=cfg.model.logprob_chunk, entropy_coef=cfg.method.entropy_coef,
                         value_coef=value_coef)


def compute_dtype(cfg: TrainConfig) -> Any:
    """bfloat16 for mixed precision (bf16 compute over fp32 master weights), else None (no cast)."""
    return jnp.bfloat16 if (cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32") else None


def updates_per_step(cfg: TrainConfig, sampling: bool) -> int:
    """Optimizer updates per training step: every minibatch of every reuse of a rollout batch."""
    r = cfg.rollout
    return (r.updates_per_batch * r.minibatches) if sampling else 1


def build_update(cfg: TrainConfig, spec: MethodSpec, policy: nnx.Module, *, sampling: bool,
                 frozen_policy: bool = False) -> RecipeUpdate:
    """The recipe's update around `policy` (a loaded Decoder, or an abstract one from nnx.eval_shape).

    frozen_policy: the policy is a frozen backbone (only a head trains): its update is zero, no state."""
    modules: dict[str, nnx.Module] = {"policy": policy, **trained_heads(cfg, spec, policy.cfg.hidden_size)}
    split = {k: nnx.split(m, nnx.Param) for k, m in modules.items()}
    graphdefs = {k: g for k, (g, _) in split.items()}
    params = {k: p for k, (_, p) in split.items()}
    loss_fn = recipe_loss_fn(cfg, spec)
    per_step = updates_per_step(cfg, sampling)
    labels = {name: jax.tree_util.tree_map(lambda _, n=name: n, p) for name, p in params.items()}
    tx = build_optimizer(cfg.optimizer, cfg.steps * per_step, param_labels=labels,
                         frozen_groups=frozenset({"policy"}) if frozen_policy else frozenset())
    dtype = compute_dtype(cfg)
    step_fn = make_train_step(graphdefs, loss_fn, tx, microbatches=cfg.optimizer.grad_accum_steps,
                              compute_dtype=dtype)
    return RecipeUpdate(graphdefs, params, loss_fn, tx, step_fn, dtype, per_step)
