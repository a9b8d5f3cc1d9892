"""The user's own reward functions, and what happens when a reward fails on a row.

`reward.name: my_pkg.rewards:score` names an importable function with TRL's reward_funcs convention:

    score(prompts: list, completions: list[str], **fields) -> list[float]

one call per batch, where `fields` holds each other field of the prompt rows (e.g. `answer`) as a list
aligned with the completions. `pf_jax.training.run.train(cfg, reward_fn=score)` passes one from Python.

Every reward, named or the user's, runs under `reward.on_error`: a call that raises, or a value that is
not a finite number, is traced to its row (a raising batch is retried one response at a time) and then
either stops the run naming the row, the prompt, the completion and the error (`stop`), or gives that
row reward 0, counted in the metric `reward/errors` and printed (`zero`). Never silently.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pf_jax.config.errors import ConfigError
from pf_jax.rewards.errors import RewardOutputError
from pf_jax.rewards.text_rewards import RewardFn, RewardOutput

IN_PROCESS: dict[str, Callable[..., Any]] = {}  # reward_fn given to train(): name -> function
ON_ERROR_HINT = ("fix the reward function, or set reward.on_error=zero to give such rows reward 0 and count them "
                 "(reward/errors)")
SHOWN_ERRORS = 3


def is_custom(name: str | None) -> bool:
    """A `module:function` reward name (or the name a function given to train() is registered under)."""
    return bool(name) and (":" in name or name in IN_PROCESS)


def register(fn: Callable[..., Any]) -> str:
    """The name `fn` goes by in a recipe: `module:qualname` (importable again when the run resumes, if
    it is a module-level function), kept in this process for the functions that are not."""
    if not callable(fn):
        raise ConfigError(f"reward_fn must be a function (prompts, completions, **fields) -> floats, got {fn!r:.80}")
    name = f"{getattr(fn, '__module__', 'python')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
    IN_PROCESS[name] = fn
    return name


def resolve(name: str) -> Callable[..., Any]:
    """The function a `module:function` name stands for; a ConfigError says what is missing."""
    if name in IN_PROCESS:
        return IN_PROCESS[name]
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"reward.name={name!r}: a custom reward is written 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward.name={name!r}: cannot import module {module_name!r} ({error})",
                          hint="put its folder on PYTHONPATH or pip install its package") from None
    fn: Any = module
    for part in attribute.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"reward.name={name!r}: module {module_name!r} has no function {attribute!r}")
    return fn


def custom_reward(name: str) -> RewardFn:
    """The RewardFn of a user function with TRL's convention (see the module)."""
    fn = resolve(name)

    def reward(rows: Sequence[Mapping[str, Any]], responses: Sequence[str], group_ids: np.ndarray) -> RewardOutput:
        chosen = [rows[int(g)] for g in group_ids]
        fields = {k: [r.get(k) for r in chosen] for k in dict.fromkeys(k for r in chosen for k in r) if k != "prompt"}
        values = fn([r["prompt"] for r in chosen], list(responses), **fields)
        try:
            rewards = np.asarray([np.nan if v is None else v for v in values], np.float64)
        except (TypeError, ValueError):
            raise RewardOutputError(f"reward {name!r} must return one float per completion, got {values!r:.120}",
                                    hint=ON_ERROR_HINT) from None
        return RewardOutput(rewards.astype(np.float32), [None] * len(responses))

    return reward


def guarded(name: str, fn: RewardFn, on_error: str) -> RewardFn:
    """`fn` under the on_error policy (see the module)."""

    def reward(rows, responses, group_ids):
        failed: dict[int, str] = {}
        try:
            out = fn(rows, responses, group_ids)
        except RewardOutputError:
            raise
        except Exception as error:  # the user's code: anything; traced to its rows below
            out, failed = _row_by_row(name, fn, rows, responses, group_ids, error)
        rewards = np.asarray(out.rewards, np.float32)
        if rewards.shape != (len(responses),):
            raise RewardOutputError(f"reward {name!r} returned {rewards.size} values for {len(responses)} completions",
                                    hint="a reward function returns one float per completion")
        failed.update({int(i): f"returned {rewards[i]}" for i in np.flatnonzero(~np.isfinite(rewards)) if i not in failed})
        if failed:
            _apply_policy(name, on_error, failed, rows, responses, group_ids)
            rewards = np.where(np.isin(np.arange(len(rewards)), list(failed)), 0.0, rewards).astype(np.float32)
        out.rewards = rewards
        out.metrics = {**out.metrics, "errors": float(len(failed))}
        return out

    return reward


def _row_by_row(name, fn, rows, responses, group_ids, batch_error: Exception) -> tuple[RewardOutput, dict[int, str]]:
    """Each response scored alone, to find which ones make `fn` raise: (the rewards, {row: why})."""
    rewards, answers, failures = np.zeros(len(responses), np.float32), [None] * len(responses), {}
    for i in range(len(responses)):
        try:
            one = fn(rows, [responses[i]], np.asarray(group_ids)[i : i + 1])
            rewards[i] = np.asarray(one.rewards, np.float32).reshape(-1)[0]
        except Exception as error:
            failures[i] = f"raised {type(error).__name__}: {error}"
    if not failures:  # the batch failed but no row alone does: nothing to blame a row for
        raise RewardOutputError(f"reward {name!r} raised {type(batch_error).__name__}: {batch_error} on a batch of "
                                f"{len(responses)} completions, and on none of them alone", hint=ON_ERROR_HINT)
    return RewardOutput(rewards, answers), failures


def _apply_policy(name, on_error, failed, rows, responses, group_ids) -> None:
    lines = []
    for i, why in sorted(failed.items()):
        prompt = rows[int(group_ids[i])]["prompt"]
        lines.append(f"response {i} (prompt row {int(group_ids[i])}: {prompt!r:.80}; completion {responses[i]!r:.80}) {why}")
    if on_error == "stop":
        raise RewardOutputError(f"reward {name!r} failed on {len(failed)} of {len(responses)} completions; first: "
                                f"{lines[0]}", hint=ON_ERROR_HINT)
    for line in lines[:SHOWN_ERRORS]:
        print(f"[pf_jax] reward {name!r}: {line}; reward 0 (reward.on_error=zero)", file=sys.stderr)
    if len(lines) > SHOWN_ERRORS:
        print(f"[pf_jax] reward {name!r}: {len(lines) - SHOWN_ERRORS} more failed completions got reward 0", file=sys.stderr)
