"""Where the sampler's rows live: split over the batch axes of the mesh that holds the weights.

The sampler runs where its weights are. Weights on one device (or whole on each process's first device,
as the trainer places them across processes) sample there. Weights on a mesh of several devices in one
process, e.g. the trainer's sampler layout (`MeshPlacement.sampler_params`: tensor parallelism kept, no
fsdp), get their rows (prompts x samples) split over the mesh axes of the "batch" rule (data, fsdp), so
that each device decodes 1/shards of the rows instead of all of them.

The row count must divide by the shard count, so the prompt list is padded with copies of its last
prompt (at most shards - 1 extra prompts), and the padded rows are dropped from the result. The padded
rows come last and the sampler's random draws are prefix-consistent over rows (threefry is
partitionable), so the kept rows are the ones an unsharded call returns.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pf_jax.models.ops import XlaOps, select_ops
from pf_jax.sampling.result import SampleResult
from pf_jax.sharding.mesh import DEFAULT_RULES, kv_cache_shardings


def padded_prompt_count(prompts: int, n: int, shards: int) -> int:
    """The smallest count >= prompts whose rows (count * n) divide by shards."""
    step = shards // math.gcd(n, shards)
    return -(-prompts // step) * step


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """The mesh and the mesh axes that split the sampler's rows; mesh None = no split. one_device: every
    weight is on a single device, so per-device kernels without a sharding rule (pf_jax.kernels) may run;
    cpu: and that device is a CPU (the decode loop may pack the projections for pf_jax.kernels.matmul_packed).

    Hashable: a static argument of the sampler's jitted functions.
    """

    mesh: Mesh | None = None
    axes: tuple[str, ...] = ()
    one_device: bool = False
    cpu: bool = False

    @classmethod
    def of(cls, weights: Any) -> RowLayout:
        """The layout for weights (an nnx.State or any pytree of arrays): split over the batch-rule axes of
        size > 1 of the mesh holding the first array placed on a multi-device mesh, else no split."""
        leaves = jax.tree_util.tree_leaves(weights)
        for leaf in leaves:
            sharding = getattr(leaf, "sharding", None)
            if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
                mesh_shape = dict(sharding.mesh.shape)
                axes = tuple(a for a in DEFAULT_RULES["batch"] if mesh_shape.get(a, 1) > 1)
                return cls(sharding.mesh, axes) if axes else cls()
        placed = [leaf.sharding.device_set for leaf in leaves if hasattr(leaf, "sharding")]
        one_device = all(len(devices) == 1 for devices in placed)
        return cls(one_device=one_device, cpu=one_device and all(d.platform == "cpu" for ds in placed for d in ds))

    def decode_ops(self, default: XlaOps, packed: tuple[dict[str, jax.Array], ...] | None = None) -> XlaOps:
        """The decode steps' implementation: the CPU decode kernels where every weight is on one CPU device
        (with the projections packed for them when given), else `default` (the model's)."""
        return select_ops("cpu", one_device=True, packed=packed) if self.cpu else default

    @property
    def shards(self) -> int:
        """Number of row groups (1 = unsplit)."""
        if self.mesh is None:
            return 1
        return math.prod(dict(self.mesh.shape)[a] for a in self.axes)

    def padded_rows(self, rows: int) -> int:
        """The smallest multiple of the shard count >= rows (e.g. continuous batching's slots)."""
        return -(-rows // self.shards) * self.shards

    def pad_prompts(self, prompts: Sequence[Sequence[int]], n: int) -> list[Sequence[int]]:
        """The prompts followed by copies of the last one, so that the rows (prompts x n) divide by the
        shard count (see padded_prompt_count)."""
        extra = padded_prompt_count(len(prompts), n, self.shards) - len(prompts)
        return [*prompts, *([prompts[-1]] * extra if extra else [])]

    def result(self, out: dict[str, Any], tokens: np.ndarray, mask: np.ndarray, *, num_prompts: int,
               n: int) -> SampleResult:
        """The SampleResult of num_prompts * n rows from the sampler's outputs over the padded prompts
        (tokens, mask [B_padded, P]): padded rows dropped, prompt arrays laid out like the outputs."""
        rows = num_prompts * n
        keep = lambda x: x[:rows] if x.shape[0] > rows else x
        prompt = self.place_rows({"prompt_tokens": np.repeat(tokens, n, axis=0)[:rows],
                                  "prompt_mask": np.repeat(mask, n, axis=0)[:rows],
                                  "prompt_index": np.repeat(np.arange(num_prompts, dtype=np.int32), n)})
        return SampleResult(**{k: jnp.asarray(v) for k, v in prompt.items()},
                            **{k: keep(v) for k, v in out.items()})

    def row_spec(self, axis: int = 0) -> PartitionSpec:
        """The PartitionSpec of an array whose dim `axis` is rows (e.g. 1 for a KV cache's keys), split over
        the row axes; for shard_map's in_specs / out_specs."""
        return PartitionSpec(*([None] * axis), self._row_axes)

    @property
    def _row_axes(self) -> str | tuple[str, ...]:
        """The row axes as one PartitionSpec entry."""
        return self.axes[0] if len(self.axes) == 1 else self.axes

    def _rows(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(self._row_axes, *([None] * (ndim - 1))))

    def place_rows(self, tree: Any) -> Any:
        """Host arrays whose leading dim is rows -> device arrays split over the row axes (or unchanged
        when unsplit). A leading dim that does not divide is replicated (e.g. prompts before the n-repeat)."""
        if self.mesh is None:
            return tree

        def place(x: Any) -> Any:
            if x.ndim == 0 or x.shape[0] % self.shards:
                return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))
            return jax.device_put(x, self._rows(x.ndim))

        return jax.tree_util.tree_map(place, tree)

    def constrain_rows(self, tree: Any) -> Any:
        """Inside jit: every array of the tree split over the row axes along its leading dim (rows)."""
        if self.mesh is None:
            return tree
        return jax.tree_util.tree_map(
            lambda x: x if x.ndim == 0 else jax.lax.with_sharding_constraint(x, self._rows(x.ndim)), tree)

    def rowwise(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Inside jit: fn (row-wise: row i of the output depends on row i of the input only) applied to
        each row shard on its own devices (jax.shard_map over the row axes; other mesh axes stay
        automatic). For ops that XLA's partitioner would otherwise gather over the batch (lax.top_k)."""
        if self.mesh is None:
            return fn
        spec = self.row_spec()
        return jax.shard_map(fn, mesh=self.mesh, in_specs=spec, out_specs=spec, axis_names=set(self.axes))

    def constrain_cache(self, cache: Any) -> Any:
        """Inside jit: a KVCache split over the row axes (batch), kv heads on tensor as the weights are."""
        if self.mesh is None:
            return cache
        rules = {**DEFAULT_RULES, "batch": self.axes}
        return jax.lax.with_sharding_constraint(cache, kv_cache_shardings(cache, self.mesh, rules))
