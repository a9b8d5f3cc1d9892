"""Named TPU topologies as compile-only devices: XLA's TPU compiler (libtpu) on any host, no chip needed.

    tpu_topology("v5p:4x4x4")  ->  Topology(64 "TPU v5" devices, 95 GiB HBM each)

A name is `<generation>:<chips per axis>`: v5e and v6e slices are 2-D (v5e:2x2 = 4 chips), v5p and v4
slices 3-D (v5p:4x4x4 = 64 chips). One device per chip (v4 and v5p in megacore mode, as they are
deployed). The devices come from jax.experimental.topologies.get_topology_desc; jit(...).lower(...)
.compile() over a mesh of them gives the per-device memory and cost of the program on that slice.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from pf_jax.config import ConfigError

GiB = 1024**3
TPU_EXTRA = "pip install 'pf_jax[tpu]'"


@dataclass(frozen=True)
class Generation:
    dims: int  # 2-D or 3-D chip grid
    accelerator_type: str  # TPU_ACCELERATOR_TYPE prefix; the number after it counts TensorCores
    cores_per_chip: int
    hbm_gib: float  # per chip (= per device)
    known: tuple[str, ...]  # slice shapes accepted (libtpu accepts other multiples of the host too)
    chip_config: str = "default"


_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16", "16x16x16")
GENERATIONS: dict[str, Generation] = {
    "v5e": Generation(2, "v5litepod", 1, 16.0, _2D),
    "v6e": Generation(2, "v6e", 1, 32.0, _2D),
    "v5p": Generation(3, "v5p", 2, 95.0, _3D, "megacore"),
    "v4": Generation(3, "v4", 2, 32.0, _3D[:-1], "megacore"),
}
HBM_GIB = {"TPU v5 lite": 16.0, "TPU v6 lite": 32.0, "TPU v5": 95.0, "TPU v4": 32.0}  # by device_kind
_HOST_BOUNDS = (2, 2, 1)  # libtpu's default chips per host


@dataclass(frozen=True)
class Topology:
    name: str
    devices: tuple[Any, ...]  # compile-only jax.Device objects
    device_kind: str
    hbm_bytes: int  # per device

    @property
    def size(self) -> int:
        return len(self.devices)


def known_topologies() -> str:
    """'v5e: 1x1 2x2 ...; v6e: ...' for error messages."""
    return "; ".join(f"{name}: {' '.join(g.known)}" for name, g in GENERATIONS.items())


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """('v5p', (4, 4, 4)) from 'v5p:4x4x4'; a ConfigError listing the known names otherwise."""
    match = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)", name.strip())
    generation = GENERATIONS.get(match.group(1)) if match else None
    dims = tuple(int(d) for d in match.group(2).split("x")) if match else ()
    if generation is None or len(dims) != generation.dims or min(dims) < 1:
        raise ConfigError(f"unknown TPU topology {name!r}; known: {known_topologies()}")
    return match.group(1), dims


def prepare_libtpu_environment(name: str) -> None:
    """Name the slice to libtpu before it loads, so that its host probe (metadata server, worker list) is
    quiet on a machine that is no TPU VM. The lockfile check is skipped: a compile-only client touches no
    chip, and several dry runs (or test workers) may compile at once."""
    generation, dims = parse_topology(name)
    g = GENERATIONS[generation]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{g.accelerator_type}-{math.prod(dims) * g.cores_per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _require_libtpu() -> None:
    try:
        importlib.import_module("libtpu")
    except ImportError as error:
        raise ConfigError(f"--topology needs XLA's TPU compiler (libtpu), which is not installed: {TPU_EXTRA}"
                          ) from error


def tpu_topology(name: str) -> Topology:
    """The compile-only devices of slice `name` (see the module doc) and their HBM per device."""
    generation, dims = parse_topology(name)
    prepare_libtpu_environment(name)
    _require_libtpu()
    from jax.experimental import topologies

    g = GENERATIONS[generation]
    grid = (*dims, 1)[:3]
    kwargs: dict[str, Any] = {"chip_config_name": g.chip_config}
    if any(d < h for d, h in zip(grid, _HOST_BOUNDS)):  # a slice smaller than one host (v5e:1x1)
        kwargs["chips_per_host_bounds"] = tuple(min(d, h) for d, h in zip(grid, _HOST_BOUNDS))
    try:
        devices = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
    except Exception as error:  # JaxRuntimeError from libtpu: a shape it rejects, or a plugin that fails
        raise ConfigError(f"TPU topology {name!r}: libtpu refused it ({str(error).splitlines()[0]}); known: "
                          f"{known_topologies()}") from error
    kind = devices[0].device_kind
    hbm = HBM_GIB.get(kind, g.hbm_gib)
    return Topology(name, tuple(devices), kind, int(hbm * GiB))
