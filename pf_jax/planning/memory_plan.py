"""Dry-run memory plan: per-device bytes of a training setup, built abstractly (no weights, no data).

Everything is shaped with jax.eval_shape / nnx.eval_shape and placed with the same logical-axis rules the
real run uses (pf_jax.sharding.mesh), so the numbers are the sizes of the shards the run would allocate:

    policy parameters   fp32 master weights (param_dtype), training layout
    optimizer state     optax state of the real optimizer builder (adamw: mu and nu, fp32), same layout
    gradients           one fp32 copy of the parameters, alive during the update (an estimate; the
                        compiled step's temporary memory includes it when reported)
    reference model     frozen base model in reference_dtype (bf16), training layout
    sampler copy        the policy in compute_dtype in the sampler layout (no fsdp) when it differs
    KV cache            [L, B, S, KVH, Dh] keys and values (kv_dtype) in the sampler layout
    compiled step       XLA's temporary bytes for one train step (activations, gradients, collectives'
                        buffers) from jit(...).lower(abstract).compile().memory_analysis(), when this
                        process has at least as many devices as the mesh (e.g. simulated CPU devices:
                        XLA_FLAGS=--xla_force_host_platform_device_count=64); else "not reported"

`plan_memory(...) -> MemoryPlan` and `format_plan(plan) -> str` are what `python -m pf_jax.train
--dry-run` prints; `python -m pf_jax.planning.memory_plan --model config.json --mesh 1,64,1` runs it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from qwix import QArray

from pf_jax.config import OptimizerConfig
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.models.kv_cache import KVCache
from pf_jax.models.lora import LoraParam
from pf_jax.sharding.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    Rules,
    logical_to_spec,
    resolve_mesh_shape,
    sampler_rules,
)

GiB = 1024**3
ACCELERATORS: dict[str, float] = {  # device memory in GiB
    "TPU v5p": 95.0,
    "TPU v6e": 32.0,
    "H100": 80.0,
    "H200": 141.0,
    "A100": 80.0,
}


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    name: str
    global_bytes: int
    per_device_bytes: int
    note: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    model: str
    num_params: int
    mesh: dict[str, int]
    rows: tuple[MemoryRow, ...]
    compiled_temp_bytes: int | None  # per device; None when not reported
    compiled_note: str
    accelerators: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(ACCELERATORS))

    @property
    def per_device_bytes(self) -> int:
        """Persistent rows, plus the compiled step's temporary memory when reported, else the gradients."""
        persistent = sum(r.per_device_bytes for r in self.rows if r.name != "gradients")
        if self.compiled_temp_bytes is not None:
            return persistent + self.compiled_temp_bytes
        return persistent + sum(r.per_device_bytes for r in self.rows if r.name == "gradients")

    def fits(self) -> dict[str, bool]:
        """Accelerator -> per-device total <= its memory."""
        return {name: self.per_device_bytes <= gib * GiB for name, gib in self.accelerators.items()}


def _spec_divisor(spec: Any, mesh_shape: Mapping[str, int]) -> list[int]:
    out = []
    for entry in spec:
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(math.prod(mesh_shape[a] for a in axes))
    return out


def sharded_bytes(tree: Any, mesh_shape: Mapping[str, int], rules: Rules = DEFAULT_RULES,
                  logical: Sequence[str | None] | None = None) -> tuple[int, int]:
    """(global bytes, bytes on one device) of a pytree of nnx.Variables / arrays / ShapeDtypeStructs.

    A Variable's logical names come from its metadata; `logical` names the dims of plain leaves (e.g.
    the KV cache); leaves with neither are replicated. Shards are exact because logical_to_spec only
    splits a dim that divides.
    """
    total = per_device = 0

    def add(shape: tuple[int, ...], dtype: Any, names: Sequence[str | None] | None) -> None:
        nonlocal total, per_device
        bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else np.dtype(dtype).itemsize * 8
        size = math.prod(shape) * bits // 8  # int4 / NF4 codes: two a byte
        total += size
        if names is None or len(names) != len(shape):
            per_device += size
            return
        per_device += size // math.prod(_spec_divisor(logical_to_spec(names, shape, mesh_shape, rules), mesh_shape))

    def visit(x: Any) -> None:
        names = logical
        if isinstance(x, nnx.Variable):
            meta = x.get_metadata()
            names = meta.get("out_sharding") or meta.get("sharding_names")
            x = x.get_value()
        if isinstance(x, QArray):  # a quantised weight: its integers split like the weight, its scales small
            add(tuple(x.qvalue.shape), x.qvalue.dtype, names)
            add(tuple(x.scale.shape), x.scale.dtype, None)
            return
        add(tuple(np.shape(x)), x.dtype, names)

    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        visit(leaf)
    return total, per_device


def abstract_params(cfg: ModelConfig, dtype: Any) -> nnx.State:
    """The decoder's parameters as ShapeDtypeStructs with their logical-axis metadata (no memory)."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype))
    return nnx.state(model, nnx.Param)


def abstract_lora_params(cfg: ModelConfig, dtype: Any, lora: Any) -> tuple[nnx.State, nnx.State]:
    """(adapters, frozen base) of the decoder with the recipe's model.lora applied, as ShapeDtypeStructs."""
    from pf_jax.training.model_source import with_adapters

    model = nnx.eval_shape(lambda: with_adapters(Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype), lora))
    _, adapters, base = nnx.split(model, LoraParam, nnx.Param)
    return adapters, base


def plan_memory(
    cfg: ModelConfig,
    mesh_shape: Sequence[int] = (1, -1, 1),
    *,
    device_count: int | None = None,
    optimizer: OptimizerConfig | None = None,
    frozen_policy: bool = False,
    param_dtype: Any = jnp.float32,
    compute_dtype: Any = jnp.bfloat16,
    reference: bool = True,
    reference_dtype: Any = jnp.bfloat16,
    sampler_copy: bool = True,
    kv_cache: tuple[int, int] | None = None,
    kv_dtype: Any = jnp.bfloat16,
    train_batch: tuple[int, int] | None = None,
    remat: bool = True,
    compile_step: bool = True,
    rules: Rules = DEFAULT_RULES,
    name: str = "",
    lora: Any = None,
    async_versions: int = 0,
) -> MemoryPlan:
    """Per-device memory of training `cfg` on a (data, fsdp, tensor) mesh; nothing is allocated.

    mesh_shape may hold one -1, filled from device_count (default: the product must be given, or
    jax.device_count() is used). kv_cache = (batch, max_len) of the sampler's cache; train_batch =
    (batch, seq_len) of one optimizer step, used to compile the step when enough devices exist.
    frozen_policy: the policy is not trained (a frozen backbone under a trained head): no optimizer state.
    lora: the recipe's model.lora section: only adapters train over the frozen (maybe quantised) base, which
    is also the reference (no second copy). async_versions: async rollouts' copies (async_versions_row).
    """
    shape = resolve_mesh_shape(mesh_shape, device_count or (
        math.prod(mesh_shape) if -1 not in mesh_shape else jax.device_count()))
    mesh = dict(zip(MESH_AXES, shape))
    optimizer = optimizer or OptimizerConfig(name="adamw")
    from pf_jax.training.optimizer import build_optimizer

    tx = build_optimizer(optimizer, total_steps=1000)
    params = abstract_params(cfg, param_dtype)
    num_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    rows = trained_rows(cfg, mesh, rules, tx, optimizer.name, param_dtype=param_dtype, lora=lora,
                        frozen_policy=frozen_policy)
    if reference and lora is None:  # with LoRA the frozen base is the reference
        ref = abstract_params(cfg, reference_dtype)
        rows.append(MemoryRow("reference model", *sharded_bytes(ref, mesh, rules),
                              f"frozen, {np.dtype(reference_dtype).name}"))
    if async_versions:
        rows.append(async_versions_row(cfg, mesh, rules, async_versions, param_dtype=param_dtype, lora=lora))
    s_rules = sampler_rules(rules)
    if sampler_copy and dict(s_rules) != dict(rules):
        copy = abstract_params(cfg, compute_dtype)
        rows.append(MemoryRow("sampler policy copy", *sharded_bytes(copy, mesh, s_rules),
                              f"{np.dtype(compute_dtype).name}, sampler layout (no fsdp)"))
    if kv_cache is not None:
        rows.append(kv_cache_row(cfg, kv_cache, kv_dtype, mesh, s_rules))

    temp, note = None, "not reported: no train_batch given"
    if train_batch is not None and compile_step:
        temp, note = compiled_step_temp_bytes(cfg, shape, tx, train_batch, param_dtype=param_dtype,
                                              compute_dtype=compute_dtype, remat=remat, rules=rules)
    return MemoryPlan(name or f"{cfg.architecture} ({num_params / 1e9:.2f}B params)", num_params, mesh,
                      tuple(rows), temp, note)


def trained_rows(cfg: ModelConfig, mesh: Mapping[str, int], rules: Rules, tx: Any, optimizer_name: str, *,
                 param_dtype: Any, lora: Any, frozen_policy: bool) -> list[MemoryRow]:
    """The policy's parameters (or LoRA's frozen base and adapters), the optimizer state of what trains and
    its gradients."""
    params = abstract_params(cfg, param_dtype)
    rows = [MemoryRow("policy parameters", *sharded_bytes(params, mesh, rules), f"{np.dtype(param_dtype).name} master")]
    if lora is not None:  # the base is frozen (and is the reference); the adapters train
        adapters, base = abstract_lora_params(cfg, param_dtype, lora)
        kind = f"{lora.quantize} QLoRA" if lora.quantize else np.dtype(param_dtype).name
        rows = [MemoryRow("frozen base", *sharded_bytes(base, mesh, rules), f"{kind}, also the reference"),
                MemoryRow("LoRA adapters", *sharded_bytes(adapters, mesh, rules), f"rank {lora.rank}, trained")]
        params = adapters
    if frozen_policy:  # optax.set_to_zero: no state for the policy's parameters
        rows.append(MemoryRow("optimizer state", 0, 0, "none: the policy is frozen (only a head trains)"))
    else:
        rows.append(MemoryRow("optimizer state", *sharded_bytes(jax.eval_shape(tx.init, params), mesh, rules),
                              f"{optimizer_name}, mirrors the trained params"))
    rows.append(MemoryRow("gradients", *sharded_bytes(params, mesh, rules),
                          "estimate: one fp32 copy of the trained params during the update"))
    return rows


def async_versions_row(cfg: ModelConfig, mesh: Mapping[str, int], rules: Rules, versions: int, *,
                       param_dtype: Any, lora: Any) -> MemoryRow:
    """rollout.mode=async: `versions` copies of the trained parameters (LoRA: the adapters) kept for the
    rollouts in flight, in the training layout."""
    trained = abstract_params(cfg, param_dtype) if lora is None else abstract_lora_params(cfg, param_dtype, lora)[0]
    total, per_device = sharded_bytes(trained, mesh, rules)
    return MemoryRow("async parameter versions", versions * total, versions * per_device,
                     f"{versions} copies of the trained params for the rollouts in flight")


def kv_cache_row(cfg: ModelConfig, kv_cache: tuple[int, int], kv_dtype: Any, mesh: Mapping[str, int],
                 rules: Rules) -> MemoryRow:
    """The sampler's KV cache of (batch, slots): keys and values [L, B, S, KVH, Dh], valid flags and positions."""
    batch, max_len = kv_cache
    cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, max_len, kv_dtype))
    kv_names = ("layers", "batch", "length", "kv_heads", "head_dim")
    k_total, k_dev = sharded_bytes(cache.k, mesh, rules, kv_names)
    m_total, m_dev = sharded_bytes((cache.valid, cache.positions), mesh, rules, ("batch", "length"))
    return MemoryRow("KV cache", 2 * k_total + m_total, 2 * k_dev + m_dev,
                     f"batch {batch} x {max_len} slots, {np.dtype(kv_dtype).name}")


def compiled_step_temp_bytes(cfg: ModelConfig, mesh_shape: Sequence[int], tx: Any, train_batch: tuple[int, int],
                             *, param_dtype: Any, compute_dtype: Any, remat: bool,
                             rules: Rules = DEFAULT_RULES) -> tuple[int | None, str]:
    """Compile one policy train step (NLL of the batch, fwd + bwd + optimizer) for the mesh from abstract
    inputs and return (temporary bytes per device, note), or (None, reason) when it cannot be measured."""
    from pf_jax.models.logprobs import sequence_logprobs
    from pf_jax.sharding.mesh import batch_shardings, make_mesh, shard_train_step, train_state_shardings
    from pf_jax.training.step import TrainState, make_train_step

    n = math.prod(mesh_shape)
    if jax.device_count() < n:
        return None, f"not reported: {jax.device_count()} devices here, mesh needs {n}"
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=compute_dtype,
                                           remat=remat))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(modules: dict[str, Any], batch: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
        logp = sequence_logprobs(modules["policy"], batch["tokens"], batch["mask"])
        m = batch["mask"][:, 1:].astype(jnp.float32)
        return -(logp * m).sum() / jnp.maximum(m.sum(), 1.0), {}

    step = make_train_step({"policy": graphdef}, loss_fn, tx, compute_dtype=compute_dtype)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params={"policy": params},
                       opt_state=jax.eval_shape(tx.init, {"policy": params}),
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    b, t = train_batch
    batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32), "mask": jax.ShapeDtypeStruct((b, t), jnp.bool_)}
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    s_shard = train_state_shardings(state, mesh, rules)
    b_shard = batch_shardings(batch, mesh, rules)
    compiled = shard_train_step(step, s_shard, b_shard, rules=rules).lower(state, batch).compile()
    stats = compiled.memory_analysis()
    if stats is None or getattr(stats, "temp_size_in_bytes", None) is None:
        return None, f"not reported by the {jax.default_backend()} backend"
    return int(stats.temp_size_in_bytes), f"{jax.default_backend()} backend, batch {b} x {t}, remat={remat}"


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GiB:,.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """A rich table of the plan (per-device GiB per row, total, and which accelerators it fits)."""
    from rich.console import Console
    from rich.table import Table

    mesh = ", ".join(f"{k}={v}" for k, v in plan.mesh.items())
    table = Table(title=f"{plan.model} on mesh ({mesh}), {math.prod(plan.mesh.values())} devices")
    table.add_column("item")
    table.add_column("global GiB", justify="right")
    table.add_column("per device GiB", justify="right")
    table.add_column("note")
    for r in plan.rows:
        table.add_row(r.name, _gib(r.global_bytes), _gib(r.per_device_bytes), r.note)
    table.add_row("compiled step temp", "", _gib(plan.compiled_temp_bytes), plan.compiled_note)
    table.add_row("[bold]total per device[/bold]", "", f"[bold]{_gib(plan.per_device_bytes)}[/bold]",
                  "persistent + compiled temp" if plan.compiled_temp_bytes is not None
                  else "persistent + gradients (no activations)")
    fits = plan.fits()
    verdict = "  ".join(f"{name} ({plan.accelerators[name]:g} GiB): {'fits' if ok else 'does NOT fit'}"
                        for name, ok in fits.items())
    buf = io.StringIO()
    console = Console(file=buf, width=130, force_terminal=False, color_system=None)
    console.print(table)
    console.print(f"policy parameters: {plan.num_params:,}")
    console.print(verdict)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pf_jax.planning.memory_plan", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF config.json of the model")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (one may be -1)")
    ap.add_argument("--devices", type=int, help="device count that -1 fills (default: this machine's)")
    ap.add_argument("--kv-cache", default=None, help="batch,max_len of the sampler's KV cache")
    ap.add_argument("--train-batch", default=None, help="batch,seq_len of one optimizer step (compiles the step)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-sampler-copy", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    cfg = ModelConfig.from_hf(json.loads(Path(args.model).read_text()))
    pair = lambda s: tuple(int(x) for x in s.split(",")) if s else None
    plan = plan_memory(cfg, pair(args.mesh), device_count=args.devices, kv_cache=pair(args.kv_cache),
                       train_batch=pair(args.train_batch), reference=not args.no_reference,
                       sampler_copy=not args.no_sampler_copy, compile_step=not args.no_compile,
                       name=Path(args.model).stem)
    print(format_plan(plan))


if __name__ == "__main__":
    main()
