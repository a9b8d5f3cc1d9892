"""The one jitted parameter update every method shares.

A method contributes only `loss_fn(modules, batch) -> (loss, metrics)`; this module turns it into a
compiled step with micro-batch gradient accumulation, an optax update, and a skip-and-report guard:
when the loss, any gradient, or any updated parameter or optimizer-state entry is not finite (a learning
rate that overflows float32 gives finite gradients but an inf update), the parameters and optimizer state
are left unchanged and the step reports `skipped = 1` with the offending `loss` / `grad_norm` (both
finite when only the update was not); nothing non-finite is ever applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from pf_jax.models.lora import training_dropout

Params = dict[str, nnx.State]
LossFn = Callable[[dict[str, nnx.Module], Any], tuple[jax.Array, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position: step, parameters, optimizer, RNG."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array


def split_microbatches(batch: Any, n: int) -> Any:
    """[B, ...] leaves -> [n, B/n, ...]; B must divide evenly (static shapes inside jit)."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} micro-batches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree_util.tree_map(split, batch)


def all_finite(*trees: Any) -> jax.Array:
    leaves = [x for t in trees for x in jax.tree_util.tree_leaves(t)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def accumulated_grads(grad_fn: Callable, params: Params, batch: Any, frozen: Params, key: jax.Array | None,
                      microbatches: int):
    """`grad_fn(params, batch, frozen, key)`'s ((loss, metrics), grads), averaged over `microbatches` slices
    of the batch in one scan (the dropout key folded with the slice's index)."""
    if microbatches == 1:
        return grad_fn(params, batch, frozen, key)
    mbs = split_microbatches(batch, microbatches)

    def accumulate(carry, xs):
        mb, i = xs
        (loss_mb, m), g = grad_fn(params, mb, frozen, None if key is None else jax.random.fold_in(key, i))
        return jax.tree_util.tree_map(jnp.add, carry, (loss_mb, m, g)), None

    first = jax.tree_util.tree_map(lambda x: x[0], mbs)
    shapes = jax.eval_shape(grad_fn, params, first, frozen, key)
    (l0, m0), g0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss, metrics, grads), _ = jax.lax.scan(accumulate, (l0, m0, g0), (mbs, jnp.arange(microbatches)))
    loss, metrics, grads = jax.tree_util.tree_map(lambda x: x / microbatches, (loss, metrics, grads))
    return (loss, metrics), grads


def params_loss(graphdefs: dict[str, nnx.GraphDef], loss_fn: LossFn, compute_dtype: jnp.dtype | None = None
                ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """`loss_fn` as a function of the trained parameters: `(params, batch, frozen, dropout_key) -> (loss,
    metrics)`, the modules merged from graphdefs, params and frozen (cast to compute_dtype when set)."""

    def loss_of(params: Params, mb: Any, frozen: Params, key: jax.Array | None):
        if compute_dtype is not None:
            params = jax.tree_util.tree_map(
                lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
            )
        modules = {k: nnx.merge(graphdefs[k], params[k], *([frozen[k]] if k in frozen else [])) for k in graphdefs}
        with training_dropout(key):
            return loss_fn(modules, mb)

    return loss_of


def make_train_step(
    graphdefs: dict[str, nnx.GraphDef],
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    microbatches: int = 1,
    compute_dtype: jnp.dtype | None = None,
    dropout: bool = False,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build `step(state, batch, frozen=None) -> (state, metrics)` (not yet jitted: the caller picks
    shardings).

    frozen: per module, parameters merged in but neither differentiated nor updated (LoRA's frozen base:
        the state then holds only the adapters, and the step's inputs no base gradient or moments).
    microbatches: the batch is cut into this many slices whose gradients are averaged before one
        optimizer update (gradient accumulation: same result as the full batch for mean losses).
    compute_dtype: when set (e.g. bfloat16), parameters are cast to it for the forward/backward pass
        while the optimizer keeps and updates the float32 master copy held in the state.
    dropout: the modules' dropout (LoRA's) is on, keyed by fold_in(state.rng, state.step) per update.
    """

    grad_fn = jax.value_and_grad(params_loss(graphdefs, loss_fn, compute_dtype), has_aux=True)

    def step(state: TrainState, batch: Any, frozen: Params | None = None):
        frozen = frozen or {}
        key = jax.random.fold_in(state.rng, state.step) if dropout else None
        (loss, metrics), grads = accumulated_grads(grad_fn, state.params, batch, frozen, key, microbatches)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        finite = all_finite(loss, grads, new_params, new_opt_state)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            rng=state.rng,
        )
        metrics = dict(metrics)
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), skipped=(~finite).astype(jnp.float32))
        return new_state, metrics

    return step
