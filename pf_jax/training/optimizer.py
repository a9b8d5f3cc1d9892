"""Build the optax optimizer and learning-rate schedules described by an `OptimizerConfig`."""

from collections.abc import Callable
from typing import Any

import jax
import optax

from pf_jax.config import ConfigError, OptimizerConfig

DEFAULT_GROUP = "default"


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int, peak_lr: float | None = None) -> optax.Schedule:
    """lr(step): linear warmup 0 -> peak over `warmup_steps`, then constant / cosine / linear decay.

    Decay runs from `peak_lr` (default `cfg.lr`) to `peak_lr * final_lr_ratio` over
    `decay_steps` (default `total_steps`) counted from step 0, warmup included:
      cosine: lr = final + (peak - final) * (1 + cos(pi * s / S)) / 2,  s = step - warmup, S = decay - warmup
      linear: lr = peak + (final - peak) * s / S
    """
    peak = cfg.lr if peak_lr is None else peak_lr
    decay_steps = cfg.decay_steps or total_steps
    if cfg.schedule != "constant" and decay_steps <= cfg.warmup_steps:
        raise ConfigError(
            f"optimizer.decay_steps ({decay_steps}) must exceed optimizer.warmup_steps ({cfg.warmup_steps}) "
            f"for the '{cfg.schedule}' schedule"
        )
    final = peak * cfg.final_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps - cfg.warmup_steps, alpha=cfg.final_lr_ratio)
    else:
        after = optax.linear_schedule(peak, final, decay_steps - cfg.warmup_steps)
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _base_optimizer(cfg: OptimizerConfig, lr: optax.Schedule, decay_mask: Any) -> optax.GradientTransformation:
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.name == "lion":
        return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    # adam and sgd: weight decay is coupled L2 (added to the gradient before the update rule).
    if cfg.name == "adam":
        rule = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        rule = optax.sgd(lr, momentum=cfg.momentum or None)
    if cfg.weight_decay == 0.0:
        return rule
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask), rule)


def build_optimizer(
    cfg: OptimizerConfig,
    total_steps: int,
    param_labels: Any | Callable[[Any], Any] | None = None,
    decay_mask: Any | Callable[[Any], Any] | None = None,
    frozen_groups: frozenset[str] = frozenset(),
) -> optax.GradientTransformation:
    """The optax transformation: clip by global norm (over all parameters), then the chosen update rule.

    With `param_labels` (a pytree of group names matching the params, or a function params -> that
    pytree), each group gets the same rule with its own peak learning rate via `optax.multi_transform`:
    `cfg.group_lr[label]`, or `cfg.lr` for labels not listed (e.g. `"default"`). A `group_lr` entry that
    no label uses is a ConfigError at `init`. `decay_mask` (pytree of bools or function) selects which
    parameters weight decay applies to (all by default). `frozen_groups`: labels whose update is zero
    (optax.set_to_zero: no optimizer state, no weight decay), e.g. a frozen backbone.
    """
    if param_labels is None:
        if frozen_groups:
            raise ValueError(f"frozen_groups {sorted(frozen_groups)} need param_labels")
        if cfg.group_lr:
            raise ConfigError(
                f"optimizer.group_lr names groups {sorted(cfg.group_lr)} but the trainer gave no parameter labels"
            )
        rule = _base_optimizer(cfg, learning_rate_schedule(cfg, total_steps), decay_mask)
    else:
        rule = _grouped_optimizer(cfg, total_steps, param_labels, decay_mask, frozen_groups)
    if cfg.grad_clip_norm is None:
        return rule
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), rule)


def _grouped_optimizer(
    cfg: OptimizerConfig, total_steps: int, param_labels: Any, decay_mask: Any, frozen_groups: frozenset[str]
) -> optax.GradientTransformation:
    def labels_of(params: Any) -> Any:
        return param_labels(params) if callable(param_labels) else param_labels

    def transforms_for(labels: Any) -> dict[str, optax.GradientTransformation]:
        names = set(jax.tree.leaves(labels))
        unused = sorted(set(cfg.group_lr) - names)
        if unused:
            raise ConfigError(
                f"optimizer.group_lr names groups {unused} that no parameter has; labels are {sorted(names)}"
            )
        return {
            name: optax.set_to_zero() if name in frozen_groups else _base_optimizer(
                cfg, learning_rate_schedule(cfg, total_steps, cfg.group_lr.get(name, cfg.lr)), decay_mask
            )
            for name in sorted(names)
        }

    def init(params: Any) -> Any:
        labels = labels_of(params)
        return optax.multi_transform(transforms_for(labels), labels).init(params)

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        labels = labels_of(params if params is not None else updates)
        return optax.multi_transform(transforms_for(labels), labels).update(updates, state, params)

    return optax.GradientTransformation(init, update)
