"""A pure function of pf_jax.losses with a method's default keyword arguments (TRL / verl / paper values),
and the recipe's overrides bound on top, checked against the function's signature."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pf_jax.config import ConfigError


@dataclass(frozen=True)
class Bound:
    """`fn` with `defaults`; `bind(overrides)` is fn with both bound as keyword arguments."""

    fn: Callable[..., Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def bind(self, overrides: Mapping[str, Any] = MappingProxyType({}), *, what: str = "") -> Callable[..., Any]:
        """fn with the defaults, then `overrides`, bound; an argument fn does not take is a ConfigError
        naming the nearest one (`what` says where the overrides came from, e.g. "method.loss")."""
        params = inspect.signature(self.fn).parameters
        for key in overrides:
            if key not in params:
                close = difflib.get_close_matches(key, list(params), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = f"{what}: " if what else ""
                raise ConfigError(f"{where}{self.fn.__name__} has no argument {key!r}{hint}")
        return functools.partial(self.fn, **{**self.defaults, **overrides})

    def accepts(self, name: str) -> bool:
        """fn takes a keyword argument `name`."""
        return name in inspect.signature(self.fn).parameters

    def value(self, name: str, overrides: Mapping[str, Any] = MappingProxyType({}), default: Any = None) -> Any:
        """The keyword argument `name` as bound: the override, else the default, else `default`."""
        return overrides.get(name, self.defaults.get(name, default))
