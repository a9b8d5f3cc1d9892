"""The `mesh` section of a recipe: the (data, fsdp, tensor) shape over all devices and the logical-axis
rules that map parameter and activation axes onto it (used by pf_jax.sharding)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import Field, field_validator, model_validator

from pf_jax.config.loading import ConfigError
from pf_jax.config.sections import Section

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "norm")

# logical axis -> mesh axes (a tuple; () = replicated)
Rules = Mapping[str, tuple[str, ...]]

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
    "norm": (),
}


class MeshConfig(Section):
    """Mesh shape and logical-axis rules. One of data/fsdp/tensor may be -1: it takes the remaining devices.

    `rules` overrides entries of DEFAULT_RULES, e.g. `mesh.rules={embed: [], vocab: [fsdp, tensor]}`.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("data", "fsdp", "tensor")
    @classmethod
    def _positive_or_fill(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"mesh axis size must be >= 1 or -1 (fill the remaining devices), got {v}")
        return v

    @model_validator(mode="after")
    def _one_fill_and_known_rules(self) -> MeshConfig:
        fills = [a for a in MESH_AXES if getattr(self, a) == -1]
        if len(fills) > 1:
            raise ValueError(f"only one mesh axis may be -1, got {fills}")
        for logical, axes in self.rules.items():
            if logical not in LOGICAL_AXES:
                raise ValueError(f"mesh.rules has unknown logical axis {logical!r}; known: {list(LOGICAL_AXES)}")
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ValueError(f"mesh.rules.{logical} names mesh axes {bad}; mesh axes are {list(MESH_AXES)}")
        return self

    def shape(self, device_count: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for `device_count` devices; -1 filled. ConfigError if it does not fit."""
        return resolve_mesh_shape((self.data, self.fsdp, self.tensor), device_count)

    def logical_rules(self) -> dict[str, tuple[str, ...]]:
        return {**DEFAULT_RULES, **{k: tuple(v) for k, v in self.rules.items()}}


def resolve_mesh_shape(shape: Sequence[int], device_count: int) -> tuple[int, int, int]:
    """Fill the one -1 entry of (data, fsdp, tensor) so that the product is `device_count`."""
    if len(shape) != 3:
        raise ConfigError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {tuple(shape)}")
    known = math.prod(s for s in shape if s != -1)
    named = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
    if -1 in shape:
        if device_count % known:
            raise ConfigError(
                f"mesh ({named}): the fixed axes' product {known} does not divide the {device_count} devices"
            )
        out = tuple(device_count // known if s == -1 else s for s in shape)
    else:
        out = tuple(shape)
    if math.prod(out) != device_count:
        raise ConfigError(
            f"mesh ({named}) has {math.prod(out)} devices but there are {device_count} devices; "
            "set one axis to -1 to use all of them"
        )
    return out  # type: ignore[return-value]
