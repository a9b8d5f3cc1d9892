"""Checks of a whole recipe against its method, before any weights or data load: keys set for another
method (a recipe whose method.name was switched keeps the keys of the old one), loss and advantage
arguments the method's functions do not take, parameter groups of heads the method does not have.

A method-specific key counts as set when its value differs from the schema's default, so setting it back
to the default (or `{}` for a mapping) is how a user clears it. Every problem is named in one ConfigError:
the key, its value, and the methods it belongs to.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flax import nnx

from pf_jax.config import ConfigError
from pf_jax.config.recipe import MethodSection, TrainConfig
from pf_jax.methods.bound import Bound
from pf_jax.methods.policy_gradient import Estimator
from pf_jax.methods.registry import METHODS, Method, is_gflownet, is_policy_gradient
from pf_jax.tasks.rewards import check_reward_name


def _gflownet_method(m: Method, cfg: TrainConfig) -> bool:
    return is_gflownet(m)


def _pg_method(m: Method, cfg: TrainConfig) -> bool:
    return is_policy_gradient(m)


def _estimator(m: Method) -> Estimator | None:
    return m.estimator if isinstance(m.estimator, Estimator) else None


@dataclass(frozen=True)
class KeyRule:
    """`key` applies to a method when `applies(method, cfg)`; `owners` says to whom, in a message."""

    key: str
    applies: Callable[[Method, TrainConfig], bool]
    owners: str


RULES = (
    KeyRule("method.alpha", _gflownet_method, "the GFlowNet methods"),
    KeyRule("method.log_z", _gflownet_method, "the GFlowNet methods"),
    KeyRule("reward.format_penalty", _gflownet_method, "the GFlowNet methods"),
    KeyRule("method.entropy_coef", lambda m, c: _pg_method(m, c) or m.responses == "env",
            "the policy-gradient and agentic methods"),
    KeyRule("method.reward_kl_coef", lambda m, c: _pg_method(m, c) and bool(_estimator(m) and _estimator(m).token_rewards),
            "the methods whose advantages read token rewards"),
    KeyRule("method.value_coef", lambda m, c: bool(_estimator(m) and _estimator(m).values), "the methods with a value head"),
    KeyRule("method.dynamic_sampling", _pg_method, "the policy-gradient methods"),
    KeyRule("method.overlong_max_tokens", _pg_method, "the policy-gradient methods"),
    KeyRule("method.overlong_cache_tokens", _pg_method, "the policy-gradient methods"),
    KeyRule("env", lambda m, c: m.responses == "env", "the agentic methods"),
    KeyRule("data.packing", lambda m, c: (c.method.responses or m.responses) == "dataset", "SFT on dataset responses"),
    KeyRule("data.packed_length", lambda m, c: (c.method.responses or m.responses) == "dataset",
            "SFT on dataset responses"),
    KeyRule("reward_model", lambda m, c: m.responses == "labelled", "the classifier method"),
)


def check_keys_apply(cfg: TrainConfig, m: Method) -> None:
    """A ConfigError listing every key of the recipe that does not apply to method `m` (see the module)."""
    try:  # the reward exists (a user's module:function imports) before any weights load
        check_reward_name(cfg.reward.name, cfg.reward.soft_scorer)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"reward.name: {error}") from None
    problems = [*_rule_problems(cfg, m), *_argument_problems(cfg, m), *_group_problems(_taken_only(cfg, m), m)]
    if problems:
        raise ConfigError(f"keys that do not apply to method {m.name!r}:\n" + "\n".join(problems),
                          hint="remove them from the recipe or set each back to its default")


def _value(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = getattr(tree, part)
    return tree


def _set_keys(cfg: TrainConfig, key: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of the leaves under `key` whose value differs from the schema default."""
    value, default = _value(cfg, key), _value(TrainConfig(), key)
    if hasattr(value, "model_fields"):
        for name in type(value).model_fields:
            yield from _set_keys(cfg, f"{key}.{name}")
    elif value != default:
        yield key, value


def _owners(test: Callable[[Method], bool]) -> str:
    names = [name for name, method in METHODS.items() if test(method)]
    return ", ".join(names) if names else "no method"


def _rule_problems(cfg: TrainConfig, m: Method) -> Iterator[str]:
    for rule in RULES:
        if rule.applies(m, cfg):
            continue
        for key, value in _set_keys(cfg, rule.key):
            yield f"{key}={value!r} belongs to {rule.owners} ({_owners(lambda x, r=rule: r.applies(x, cfg))})"


def _argument_problems(cfg: TrainConfig, m: Method) -> Iterator[str]:
    """method.loss / method.advantage keys the method's loss / estimator does not take."""
    estimator = _estimator(m)
    for section, bound, all_bounds in (
        ("method.loss", m.loss, lambda x: x.loss),
        ("method.advantage", estimator.fn if estimator else None, lambda x: _estimator(x) and _estimator(x).fn),
    ):
        for key in getattr(cfg.method, section.split(".")[1]):
            if bound is not None and bound.accepts(key):
                continue
            owners = _owners(lambda x, k=key, b=all_bounds: bool(b(x)) and b(x).accepts(k))
            yield f"{section}.{key}: {_not_taken(m, bound, key)}; {key!r} is taken by {owners}"


def _not_taken(m: Method, bound: Bound | None, key: str) -> str:
    if bound is None:
        return f"{m.name} has no advantage estimator"
    params = list(inspect.signature(bound.fn).parameters)
    close = difflib.get_close_matches(key, params, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{bound.fn.__name__} ({m.name}) has no argument {key!r}{hint}"


def _taken_only(cfg: TrainConfig, m: Method) -> TrainConfig:
    """cfg with only the loss / advantage arguments the method takes (its objective can then be built)."""
    estimator = _estimator(m)
    loss = {k: v for k, v in cfg.method.loss.items() if m.loss.accepts(k)}
    advantage = {k: v for k, v in cfg.method.advantage.items() if estimator and estimator.fn.accepts(k)}
    return cfg.model_copy(update={"method": cfg.method.model_copy(update={"loss": loss, "advantage": advantage})})


def parameter_groups(cfg: TrainConfig, m: Method) -> set[str]:
    """The parameter groups optimizer.group_lr may name: the policy and the objective's heads (built
    abstractly, no weights)."""
    objective = m.build(cfg, m)
    heads = nnx.eval_shape(lambda: objective.heads(8, 0))
    return {"policy", *heads}


def _group_problems(cfg: TrainConfig, m: Method) -> Iterator[str]:
    unknown = sorted(set(cfg.optimizer.group_lr) - parameter_groups(cfg, m))
    for group in unknown:
        owners = _owners(lambda x, g=group: _has_group(cfg, x, g))
        yield (f"optimizer.group_lr.{group}: {m.name} has no parameter group {group!r} (its groups: "
               f"{', '.join(sorted(parameter_groups(cfg, m)))}); {group!r} belongs to {owners}")


def _has_group(cfg: TrainConfig, m: Method, group: str) -> bool:
    other = cfg.model_copy(update={"method": MethodSection(name=m.name)})
    try:
        return group in parameter_groups(other, m)
    except ConfigError:
        return False


def method_notes(cfg: TrainConfig) -> dict[str, str]:
    """--print-config's notes on method.loss / method.advantage: the method's functions, their defaults
    and the arguments they take."""
    m = METHODS.get(cfg.method.name)
    if m is None:
        return {}
    notes = {"method.loss": _bound_note(m.name, m.loss)}
    estimator = _estimator(m)
    notes["method.advantage"] = _bound_note(m.name, estimator.fn) if estimator else f"{m.name} has no estimator"
    return notes


def _bound_note(name: str, bound: Bound) -> str:
    taken = [n for n, p in inspect.signature(bound.fn).parameters.items() if p.default is not inspect.Parameter.empty]
    defaults = ", ".join(f"{k}={v!r}" for k, v in bound.defaults.items()) or "none"
    return f"{name}: {bound.fn.__name__}, defaults {defaults}; takes {', '.join(taken)}"
