"""Where the trainer's arrays live when there is more than one device: the mesh side of Trainer.

    train state      params, optimizer state, step, RNG on the (data, fsdp, tensor) mesh by the recipe's
                     logical-axis rules (`mesh:` section); the update is jax.jit with explicit in/out
                     shardings (pf_jax.sharding.mesh.shard_train_step), traced under activation_sharding
    batches          each process builds the rows it loaded (BatchIterator shards rows by process); the
                     global batch is assembled with jax.make_array_from_process_local_data, rows of
                     process p = rows [p*b, (p+1)*b) of the global batch
    sampler layout   one explicit transfer per rollout: single process, the weights move to the sampler
                     rules (no fsdp, tensor kept) on the same mesh, where the sampler splits its rows
                     over (data, fsdp) (pf_jax.sampling.layout); several processes, each process gets a
                     whole copy on each of its local devices, as one mesh of its own, and samples its own
                     prompts split over them (the sampler code is per-process Python: prompts differ
                     between processes). With mixed precision
                     (`sampler_dtype`) the policy's weight matrices travel in the compute dtype: the decoder
                     casts every matrix to it before use, so the sampled tokens are the same and the copy
                     is half the size
    checkpoints      the trainer's restore target carries the state's shardings, so orbax reads each
                     process's shards (and reshards a checkpoint written on another mesh)
    rollout group    rollout.devices = n (one process): the update's mesh holds the first devices, the
                     sampler's (data = n) the last n; the sampler layout is then a copy on the rollout
                     mesh (cast on the training mesh, one jax.device_put across), its seconds added to
                     `transfer_s`

`MeshPlacement.from_config(cfg.mesh)` is None on one device in one process: the trainer then keeps its
original unsharded jit path (same speed as before).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pf_jax.config import ConfigError
from pf_jax.sharding.mesh import (
    MeshConfig,
    batch_shardings,
    make_mesh,
    replicated,
    sampler_rules,
    shard_train_step,
    state_shardings,
    train_state_shardings,
    transfer,
)
from pf_jax.training.step import TrainState

StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def host_to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A value every process holds identically (same seed, same checkpoint) -> a global array laid out by
    `sharding`; each process supplies only its own shards. Typed PRNG keys keep their type."""
    if _is_key(x):
        data = host_to_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class MeshPlacement:
    """The trainer's mesh, its rules and the shardings of its state; see the module doc."""

    def __init__(self, cfg: MeshConfig, devices: list[jax.Device] | None = None, *,
                 sampler_dtype: Any = None, rollout_devices: list[jax.Device] | None = None) -> None:
        self.mesh = make_mesh(cfg, devices)
        self.rollout_mesh = None if not rollout_devices else make_mesh((len(rollout_devices), 1, 1), rollout_devices)
        self.transfer_s = 0.0  # seconds spent moving weights to the rollout group (read and reset by the trainer)
        self.sampler_dtype = sampler_dtype
        self.rules = cfg.logical_rules()
        self.sampler_rules = sampler_rules(self.rules)
        self.process_count = jax.process_count()
        self.state_shardings: Any = None
        self._step_fn: StepFn | None = None
        self._compiled: dict[Any, Any] = {}

    @classmethod
    def from_config(cls, cfg: MeshConfig, *, sampler_dtype: Any = None, rollout_devices: int | None = None
                    ) -> MeshPlacement | None:
        """A placement over all devices of all processes, or None for one device in one process. A mesh
        shape that does not fit the devices is a ConfigError, on one device too (mesh.data=3 is a mistake
        there, not a request to ignore). rollout_devices: the last n devices form the rollout group."""
        if rollout_devices:
            return cls._split(cfg, rollout_devices, sampler_dtype)
        cfg.shape(jax.device_count())
        if jax.device_count() == 1 and jax.process_count() == 1:
            return None
        placement = cls(cfg, sampler_dtype=sampler_dtype)
        if jax.process_index() == 0:
            print(f"[pf_jax] {placement.describe()}")
        return placement

    @classmethod
    def _split(cls, cfg: MeshConfig, n: int, sampler_dtype: Any) -> MeshPlacement:
        devices = jax.devices()
        if jax.process_count() > 1:
            raise ConfigError("rollout.devices splits the devices of one process; with several processes the "
                              "rollout shares the mesh (set rollout.devices=null)")
        if n >= len(devices):
            raise ConfigError(f"rollout.devices={n} leaves none of the {len(devices)} devices to the update; "
                              f"give the rollout at most {len(devices) - 1}")
        cfg.shape(len(devices) - n)  # the update's mesh must fit the devices left to it
        placement = cls(cfg, devices[: len(devices) - n], sampler_dtype=sampler_dtype, rollout_devices=devices[-n:])
        print(f"[pf_jax] {placement.describe()}")
        return placement

    def describe(self) -> str:
        axes = ", ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        where = f"mesh ({axes}) over {self.mesh.size} devices in {self.process_count} process(es)"
        return where if self.rollout_mesh is None else f"update on {where}, rollout on {self.rollout_mesh.size} others"

    # -- state --------------------------------------------------------------------------------------
    def place_state(self, state: TrainState) -> TrainState:
        """The train state (identical on every process) laid out on the mesh by the logical rules."""
        self.state_shardings = train_state_shardings(jax.eval_shape(lambda: state), self.mesh, self.rules)
        return self._place(state, self.state_shardings)

    def place_params(self, params: Any, *, sampler: bool = False) -> Any:
        """Parameters (e.g. the frozen reference) on the mesh in the training or the sampler layout."""
        rules = self.sampler_rules if sampler else self.rules
        return self._place(params, state_shardings(jax.eval_shape(lambda: params), self.mesh, rules))

    def keep_layout(self, state: TrainState) -> TrainState:
        """`state` (already on the mesh, e.g. after an eager edit of one parameter) back in the training
        shardings the compiled step expects; one jitted identity."""
        key = ("keep_layout", jax.tree_util.tree_structure(state))
        if key not in self._compiled:
            self._compiled[key] = jax.jit(lambda s: s, out_shardings=self.state_shardings)
        return self._compiled[key](state)

    def _place(self, tree: Any, shardings: Any) -> Any:
        if self.process_count == 1:
            return transfer(tree, shardings)
        return jax.tree_util.tree_map(host_to_global, tree, shardings)

    # -- the update ---------------------------------------------------------------------------------
    def shard_step(self, step_fn: StepFn) -> StepFn:
        """`step(state, local_batch)`: assembles the global batch from this process's rows, then runs the
        step jitted with explicit shardings (one compiled function per batch tree and rank)."""
        self._step_fn = step_fn
        return self.step

    def global_batch(self, local: Any) -> tuple[Any, Any]:
        """(global batch, its shardings) from this process's rows (leading dim = local batch)."""
        n = jax.tree_util.tree_leaves(local)[0].shape[0]
        shapes = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((n * self.process_count, *np.shape(x)[1:]) if np.ndim(x) else (),
                                           x.dtype), local)
        shardings = batch_shardings(shapes, self.mesh, self.rules)
        if self.process_count == 1:
            return jax.device_put(local, shardings), shardings

        def build(x: Any, shape: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x), shape.shape)

        return jax.tree_util.tree_map(build, local, shapes, shardings), shardings

    def step(self, state: TrainState, local_batch: Any, frozen: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update of the placed state on this process's rows; `frozen`: placed frozen parameters."""
        if self._step_fn is None or self.state_shardings is None:
            raise RuntimeError("MeshPlacement.step needs place_state(...) and shard_step(...) first")
        batch, shardings = self.global_batch(local_batch)
        key = (jax.tree_util.tree_structure(batch), tuple(s.spec for s in jax.tree_util.tree_leaves(shardings)))
        compiled = self._compiled.get(key)
        if compiled is None:
            frozen_shardings = None if frozen is None else jax.tree_util.tree_map(lambda x: x.sharding, frozen)
            compiled = shard_train_step(self._step_fn, self.state_shardings, shardings, rules=self.rules,
                                        frozen_shardings=frozen_shardings)
            self._compiled[key] = compiled
        return compiled(state, batch) if frozen is None else compiled(state, batch, frozen)

    # -- sampling, evaluation, export ---------------------------------------------------------------
    def sampler_params(self, params: Any, *, cast: bool = False) -> Any:
        """The explicit transfer to the sampler's layout (see the module doc): sampler rules on the mesh
        (one process) or a whole copy on each local device, on a mesh of this process's devices (several
        processes; the sampler splits its rows over them). cast:
        floating leaves of rank >= 2 (a decoder's matrices) in `sampler_dtype`, when one is set."""
        if params is None:
            return None
        if self.rollout_mesh is not None:
            return self.to_rollout_group(params, cast=cast)
        if self.process_count == 1:
            return self.place_params_from_mesh(params, self.sampler_rules, cast=cast)
        whole = self.place_params_from_mesh(params, None, cast=cast)  # every device holds a whole copy
        local = make_mesh((jax.local_device_count(), 1, 1), devices=jax.local_devices())
        replicated_here = NamedSharding(local, PartitionSpec())
        order = list(local.devices.flat)

        def on_local_mesh(x: jax.Array) -> jax.Array:  # the copies already on this process's devices, no transfer
            shards = {s.device: s.data for s in x.addressable_shards}
            return jax.make_array_from_single_device_arrays(x.shape, replicated_here, [shards[d] for d in order])

        return jax.tree_util.tree_map(on_local_mesh, whole)

    def to_rollout_group(self, params: Any, *, cast: bool = False) -> Any:
        """The weights on the rollout mesh in the sampler layout: cast (if `cast`) where they are, then one
        jax.device_put across the groups; its wall time (waited for) is added to transfer_s. Arrays already
        on the rollout mesh (the frozen reference, placed once) stay."""
        if all(getattr(x, "sharding", None) is not None and getattr(x.sharding, "mesh", None) == self.rollout_mesh
               for x in jax.tree_util.tree_leaves(params)):
            return params
        t0 = time.perf_counter()
        if cast and self.sampler_dtype is not None:
            params = self.place_params_from_mesh(params, self.rules, cast=True)
        shapes = jax.eval_shape(lambda: params)
        moved = jax.block_until_ready(jax.device_put(params, state_shardings(shapes, self.rollout_mesh, self.sampler_rules)))
        self.transfer_s += time.perf_counter() - t0
        return moved

    def place_params_from_mesh(self, params: Any, rules: Any, *, cast: bool = False) -> Any:
        """Re-lay global `params` by `rules` (None: fully replicated) with one jitted identity (or cast)."""
        dtype = self.sampler_dtype if cast else None
        key = ("relayout", jax.tree_util.tree_structure(params), rules is None, dtype)
        relayout = self._compiled.get(key)
        if relayout is None:
            shapes = jax.eval_shape(lambda: params)
            target = (jax.tree_util.tree_map(lambda _: replicated(self.mesh), shapes) if rules is None
                      else state_shardings(shapes, self.mesh, rules))

            def convert(x: jax.Array) -> jax.Array:
                matrix = dtype is not None and x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating)
                return x.astype(dtype) if matrix else x

            relayout = self._compiled[key] = jax.jit(lambda p: jax.tree_util.tree_map(convert, p),
                                                     out_shardings=target)
        return relayout(params)
