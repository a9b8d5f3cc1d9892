"""`--dry-run --topology v5p:4x4x4`: every program a recipe runs, compiled by XLA's TPU compiler for that
slice from abstract inputs (nnx.eval_shape / ShapeDtypeStruct with NamedShardings; no weights, no data),
in the spirit of MaxText's train_compile: an out-of-memory shows up on any host before a slice is booked.
A program that does not build for the slice (out of HBM, or a kernel / shape failure) is reported with the
compiler's message, not raised.

The programs, built by the code the run itself uses:
    train step         make_train_step over the recipe's loss, heads, optimizer, grad_accum micro-batches,
                       remat and compute dtype (pf_jax.training.update), jitted by shard_train_step with the
                       trainer's state / batch shardings, on one update's batch (abstract_batches)
    reference scoring  log-probs of a rollout under the frozen reference (methods that keep one)
    policy scoring     the policy's log-probs of a rollout (sampling methods; the trainer takes behaviour
                       log-probs from the decode loop and runs this pass for a value head or the entropy
                       reward only: otherwise it is shown, not counted in the peak)
    sampler prefill    sampler.prefill and the decode loop sampler._decode at one sampler call's rows,
    sampler decode     prompt bucket and rollout.max_new_tokens, weights in the sampler layout
The model takes the TPU implementation (splash attention, pf_jax.models.ops.select_ops("tpu")).

Memory per device: `resident` holds what lives across programs (parameters, optimizer state, reference,
the sampler's copies, KV cache) at the exact sizes of their shards; each program names the items alive
while it runs, and adds its own transient bytes (XLA's temporaries, its generated code, arguments and
outputs that are not resident). The run's peak is the largest program's. Train-step FLOPs come from the
traced jaxpr (matmuls, loops times their trip count): XLA's cost analysis counts a loop body once. See
compiled_report for the table, the verdict and the JSON.
"""

from __future__ import annotations

import math
import re
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from qwix import QArray

from pf_jax.config import ConfigError
from pf_jax.config.recipe import TrainConfig
from pf_jax.methods.batches import abstract_sequences
from pf_jax.methods.compose import Composition, compose
from pf_jax.models.decoder import Decoder
from pf_jax.planning.abstract_batches import RecipeSizes, recipe_sizes, update_batch
from pf_jax.planning.memory_plan import MemoryPlan
from pf_jax.planning.recipe_plan import plan_recipe, recipe_model_config
from pf_jax.sharding.mesh import (
    DEFAULT_RULES,
    batch_shardings,
    kv_cache_shardings,
    make_mesh,
    replicated,
    sampler_rules,
    shard_train_step,
    state_shardings,
    train_state_shardings,
)
from pf_jax.sharding.topology import Topology, tpu_topology
from pf_jax.training.async_rollouts import parameter_versions
from pf_jax.training.model_source import with_adapters
from pf_jax.training.step import TrainState
from pf_jax.training.update import RecipeUpdate, build_update

SDS = jax.ShapeDtypeStruct
TRAIN_ALIVE = ("parameters", "optimizer state", "reference", "async parameter versions")
ROLLOUT_ALIVE = (*TRAIN_ALIVE, "sampler policy copy", "sampler reference copy")
SAMPLER_ALIVE = (*ROLLOUT_ALIVE, "sampler layer copy", "KV cache")


@dataclass(frozen=True)
class ProgramPlan:
    """One compiled program: XLA's per-device memory (bytes) and cost, and which resident items are alive
    while it runs. resident_in / resident_out: bytes of its arguments / outputs that are resident items
    (counted there, not again). error: the compiler's out-of-memory message (temp_bytes then comes from it)."""

    name: str
    note: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    alias_bytes: int
    flops: float | None  # per device, as XLA's cost analysis counts them
    bytes_accessed: float | None
    compile_s: float
    alive: tuple[str, ...]
    resident_in: int
    resident_out: int = 0
    error: str | None = None
    out_of_memory: bool = False  # the error is the compiler's: the program needs more HBM than the chip has
    kernels: int = 0  # Pallas (Mosaic) custom calls in the program: splash or paged attention where they apply
    runs: bool = True  # False: compiled for the record, but this recipe's trainer never calls it

    @property
    def transient_bytes(self) -> int:
        """Its own bytes beyond the resident items: temporaries, code, non-resident arguments and outputs."""
        return (self.temp_bytes + self.code_bytes + max(0, self.argument_bytes - self.resident_in)
                + max(0, self.output_bytes - self.alias_bytes - self.resident_out))

    def peak_bytes(self, resident: dict[str, int]) -> int:
        return sum(resident.get(k, 0) for k in self.alive) + self.transient_bytes


@dataclass(frozen=True)
class CompiledPlan:
    """The recipe's programs on one TPU slice, its resident memory, and the analytic plan beside it."""

    recipe: str
    topology: Topology
    mesh: dict[str, int]
    sizes: RecipeSizes
    programs: tuple[ProgramPlan, ...]
    resident: dict[str, int]
    num_params: int  # the policy's
    train_matmul_flops: float | None  # one update, all devices: jaxpr dot_generals x loop trip counts
    analytic: MemoryPlan
    assumed: str

    @property
    def peak_program(self) -> ProgramPlan:
        return max((p for p in self.programs if p.runs), key=lambda p: p.peak_bytes(self.resident))

    @property
    def peak_bytes(self) -> int:
        return self.peak_program.peak_bytes(self.resident)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.topology.hbm_bytes and not any(p.error for p in self.programs if p.runs)

    @property
    def tokens_per_update(self) -> int:
        return self.sizes.update_rows * self.sizes.length


@dataclass
class AbstractRecipe:
    """Everything abstract the programs are built from (see compile_recipe)."""

    cfg: TrainConfig
    composition: Composition
    topology: Topology
    mesh: Mesh
    rules: dict[str, tuple[str, ...]]
    sizes: RecipeSizes
    sampling: bool
    reference: bool
    update: RecipeUpdate
    state: TrainState  # abstract, with the trainer's shardings
    sampler_weights: Any  # the policy as the sampler / scorers read it (scanned)
    frozen: dict[str, Any] = field(default_factory=dict)  # LoRA's frozen base, placed (a step argument)
    resident: dict[str, int] = field(default_factory=dict)


def device_bytes(tree: Any) -> int:
    """Bytes on one device of a pytree of ShapeDtypeStructs with shardings (unsharded leaves: whole)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def _placed(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: SDS(x.shape, x.dtype, sharding=s), tree, shardings)


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: SDS(x.shape, x.dtype), tree)


def tpu_ops() -> Any:
    """The TPU implementation of the decoder's ops (splash attention), None before pf_jax.models.ops exists."""
    try:
        from pf_jax.models.ops import select_ops
    except ImportError:
        return None
    return select_ops("tpu")


def abstract_decoder(cfg: TrainConfig, *, scan_layers: bool | None = None, ops: Any = None) -> Decoder:
    """The recipe's policy as nnx.eval_shape builds it (ShapeDtypeStructs), with the TPU ops (or `ops`,
    e.g. pf_jax.models.ops.XlaOps() to measure the einsum attention instead of splash); its layers laid out
    as model.scan_layers says, unless `scan_layers` is given."""
    scan_layers = cfg.model.scan_layers if scan_layers is None else scan_layers
    model_cfg = recipe_model_config(cfg.model, runs_dir=cfg.logging.runs_dir)
    dtype = lambda name: jnp.bfloat16 if name == "bfloat16" else jnp.float32
    def build() -> Decoder:
        model = Decoder(model_cfg, rngs=nnx.Rngs(0), dtype=dtype(cfg.model.dtype),
                        param_dtype=dtype(cfg.model.param_dtype), remat=cfg.model.remat, scan_layers=scan_layers)
        return model if cfg.model.lora is None else with_adapters(model, cfg.model.lora)

    model = nnx.eval_shape(build)
    ops = ops or tpu_ops()
    if ops is not None:
        model.ops = ops
    return model


def _sampler_view(params: Any, mesh: Mesh, rules: Any, dtype: Any) -> Any:
    """The trainer's explicit transfer to the sampler (MeshPlacement.sampler_params): sampler rules (no
    fsdp), floating matrices in the compute dtype under mixed precision."""
    cast = lambda x: SDS(x.shape, dtype if dtype is not None and len(x.shape) >= 2
                         and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)
    params = jax.tree_util.tree_map(cast, params)
    return _placed(params, state_shardings(params, mesh, sampler_rules(rules)))


def abstract_recipe(cfg: TrainConfig, topology: Topology, *, ops: Any = None) -> AbstractRecipe:
    """The recipe's update, train state and sampler weights, abstract and placed on the slice's mesh
    (`ops`: the decoder's implementation, default the TPU one)."""
    composition = compose(cfg)
    sampling, reference = composition.samples, composition.reference
    mesh = make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices=topology.devices)
    rules = cfg.mesh.logical_rules()
    update = build_update(cfg, composition, abstract_decoder(cfg, ops=ops))
    params = _abstract(update.params)
    state = TrainState(step=SDS((), jnp.int32), params=params, opt_state=jax.eval_shape(update.tx.init, params),
                       rng=jax.eval_shape(lambda: jax.random.key(cfg.seed)))
    state = _placed(state, train_state_shardings(state, mesh, rules))
    frozen = {k: _placed(v, state_shardings(v, mesh, rules)) for k, v in _abstract(update.frozen).items()}
    policy = nnx.merge_state(state.params["policy"], frozen["policy"]) if frozen else state.params["policy"]
    copies = mesh.size > 1  # one device: the sampler and scorers read the training arrays themselves
    weights = _sampler_view(policy, mesh, rules, update.compute_dtype) if copies else policy
    recipe = AbstractRecipe(cfg, composition, topology, mesh, rules, recipe_sizes(cfg, composition),
                            sampling, reference, update, state, weights, frozen)
    recipe.resident.update({"parameters": device_bytes(state.params) + device_bytes(frozen),
                            "optimizer state": device_bytes(state.opt_state),
                            "reference": device_bytes(policy) if reference and not frozen else 0,  # LoRA: the base
                            "sampler policy copy": device_bytes(weights) if copies else 0,
                            "sampler reference copy": device_bytes(weights) if copies and reference else 0,
                            "async parameter versions": parameter_versions(cfg.rollout, sampling) * device_bytes(state.params)})
    return recipe


def _oom_temp_bytes(message: str) -> int:
    """The temporaries' size from XLA's out-of-memory message ('... HLO temporaries (1.51T) exceeds ...')."""
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
    match = re.search(r"temporaries \((\d+(?:\.\d+)?)([KMGTP]?)", message) or re.search(
        r"(\d+(?:\.\d+)?)([KMGTP])", message)
    return int(float(match.group(1)) * units[match.group(2)]) if match else 0


def _compile(name: str, trace: Callable[[], Any], args: Any, *, alive: tuple[str, ...], resident_in: int,
             resident_out: int = 0, note: str = "") -> tuple[ProgramPlan, Any]:
    """(the plan of `trace()` lowered and compiled for the slice, the traced program or None). A program
    that does not build is reported, not raised: out of HBM (temp_bytes from the compiler's message), or
    any other failure to trace / lower / compile (a kernel without a partitioning rule, a shape bug)."""
    started, traced, kernels = time.perf_counter(), None, 0
    try:
        traced = trace()
        lowered = traced.lower()
        kernels = lowered.as_text().count("tpu_custom_call")  # Pallas (Mosaic) kernels: splash, paged attention
        compiled = lowered.compile()
    except ConfigError:
        raise
    except Exception as error:  # the finding of a dry run, not a crash of it
        text = str(error).strip()
        oom = "RESOURCE_EXHAUSTED" in text
        return ProgramPlan(name, note, device_bytes(args), 0, _oom_temp_bytes(text) if oom else 0, 0, 0, None, None,
                           time.perf_counter() - started, alive, resident_in, resident_out,
                           error=f"{type(error).__name__}: {text.splitlines()[0] if text else ''}", out_of_memory=oom,
                           kernels=kernels), traced
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return ProgramPlan(name, note, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                       int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes), int(m.alias_size_in_bytes),
                       cost.get("flops"), cost.get("bytes accessed"), time.perf_counter() - started, alive,
                       resident_in, resident_out, kernels=kernels), traced


def train_step_program(r: AbstractRecipe) -> tuple[Any, tuple[Any, Any]]:
    """(the train step jitted by shard_train_step with the trainer's shardings, its abstract arguments)."""
    batch = update_batch(r.composition, r.sizes)
    try:
        b_shard = batch_shardings(batch, r.mesh, r.rules)
    except ValueError as error:
        raise ConfigError(f"one update's batch on mesh {dict(r.mesh.shape)}: {error} (rollout.minibatches, "
                          f"rollout.prompts_per_step or batch_size set it)") from error
    s_shard = jax.tree_util.tree_map(lambda x: x.sharding, r.state)
    if not r.frozen:
        return shard_train_step(r.update.step_fn, s_shard, b_shard, rules=r.rules), (r.state, _placed(batch, b_shard))
    f_shard = jax.tree_util.tree_map(lambda x: x.sharding, r.frozen)
    step = shard_train_step(r.update.step_fn, s_shard, b_shard, rules=r.rules, frozen_shardings=f_shard)
    return step, (r.state, _placed(batch, b_shard), r.frozen)


def compile_train_step(r: AbstractRecipe) -> tuple[ProgramPlan, float | None]:
    """(the train step's plan, its matmul FLOPs per update over all devices, from the traced jaxpr)."""
    step, args = train_step_program(r)
    s = r.sizes
    note = (f"{s.update_rows} x {s.length} tokens, {r.cfg.optimizer.grad_accum_steps} micro-batch(es), "
            f"remat={r.cfg.model.remat}")
    resident = r.resident["parameters"] + r.resident["optimizer state"]
    plan, traced = _compile("train step", lambda: step.trace(*args), args, alive=TRAIN_ALIVE, resident_in=resident,
                            note=note)
    return plan, None if traced is None else matmul_flops(traced.jaxpr.jaxpr)


def _rows(x: SDS, layout: Any, mesh: Mesh) -> SDS:
    """x laid out as the sampler places rows (RowLayout.place_rows): split when they divide, else replicated."""
    if layout.mesh is None or x.shape[0] % layout.shards:
        return SDS(x.shape, x.dtype, sharding=replicated(mesh))
    spec = PartitionSpec(layout.axes[0] if len(layout.axes) == 1 else layout.axes)
    return SDS(x.shape, x.dtype, sharding=NamedSharding(layout.mesh, spec))


def compile_scoring(r: AbstractRecipe, name: str, *, rows: int, entropy: bool, note: str, runs: bool = True) -> ProgramPlan:
    """Teacher-forced log-probs of `rows` rollout rows (pf_jax.methods.scoring._score) over the sampler-layout weights."""
    from pf_jax.methods.scoring import _score, weights_mesh
    from pf_jax.sampling.layout import RowLayout

    layout = RowLayout.of(r.sampler_weights)
    split = r.sampling and r.composition.kind != "env"  # sampled rows stay split; packed rows come from the host
    seq = jax.tree_util.tree_map(lambda x: _rows(x, layout if split else RowLayout(), r.mesh),
                                 abstract_sequences(rows, r.sizes.prompt_len, r.sizes.response_len))
    trace = lambda: _score.trace(r.update.graphdefs["policy"], r.sampler_weights, seq, r.cfg.model.logprob_chunk,
                                 entropy, weights_mesh(r.sampler_weights))
    plan, _ = _compile(name, trace, (r.sampler_weights, seq), alive=ROLLOUT_ALIVE,
                       resident_in=device_bytes(r.sampler_weights), note=note)
    return replace(plan, runs=runs)


def matmul_flops(jaxpr: Any) -> float:
    """2·M·N·K summed over the jaxpr's dot_generals, a scan's body times its length, a shard_map's body times
    its shards, a cond's costliest branch; a while loop's body once; Pallas kernels not counted."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            continue
        if name == "pallas_call":
            continue
        inner = [matmul_flops(j) for value in eqn.params.values() for j in _jaxprs(value)]
        if name == "cond":
            total += max(inner, default=0.0)
            continue
        times = eqn.params["length"] if name == "scan" else 1
        if name == "shard_map":
            times = math.prod(eqn.params["mesh"].shape[a] for a in eqn.params.get("newly_manual_axes", ()))
        total += times * sum(inner)
    return total


def _jaxprs(value: Any) -> list[Any]:
    if isinstance(value, ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, Jaxpr):
        return [value]
    if isinstance(value, tuple | list):
        return [j for v in value for j in _jaxprs(v)]
    return []


def _sampler_model(r: AbstractRecipe) -> tuple[Decoder, nnx.GraphDef, Any]:
    """(model, graphdef, weights) as generate() runs them: the layers re-laid one by one (it unrolls a
    scanned model), in the sampler layout and dtype; resident sizes of the layer copy recorded."""
    model = abstract_decoder(r.cfg, scan_layers=False)
    graphdef, state = nnx.split(model)
    copies = r.mesh.size > 1
    state = _sampler_view(state, r.mesh, r.rules if copies else DEFAULT_RULES, r.update.compute_dtype if copies else None)
    r.resident["sampler layer copy"] = device_bytes(state["layers"])
    return model, graphdef, state


def compile_sampler(r: AbstractRecipe) -> list[ProgramPlan]:
    """The sampler's prefill and decode loop as generate() calls them for the recipe's rollout.batching
    (SAMPLER_PROGRAMS): weights in the sampler layout, rows split over the mesh's batch axes (RowLayout)."""
    return SAMPLER_PROGRAMS[r.cfg.rollout.batching](r)


def _decode_setup(r: AbstractRecipe, model: Decoder) -> tuple[Any, Any]:
    """(the resolved GenerationConfig, the random key argument) of the planned decode loop. No tokenizer is
    loaded for a plan, so the stop strings spell no token sequences here: the planned loop leaves out their
    few compares per step."""
    from pf_jax.sampling.texts import generation_config

    codec = types.SimpleNamespace(eos_ids=model.cfg.eos_token_ids, pad_id=model.cfg.pad_token_id or 0,
                                  encode_response=lambda text: [], decode_response=lambda ids: "")
    config = generation_config(r.cfg.rollout, codec).resolved(model)
    key = SDS((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated(r.mesh))
    return config, key


def _compile_prefill(r: AbstractRecipe, model: Decoder, state: Any, layout: Any, prompts: int, *, n: int,
                     rows: str) -> tuple[ProgramPlan, Any]:
    """sampler.prefill of `prompts` left-padded prompts into a cache of prompt bucket + max_new_tokens
    slots, each row repeated n times; (its plan, its abstract (hidden, cache) outputs)."""
    from pf_jax.sampling.sampler import prefill

    s, length = r.sizes, r.sizes.prompt_len + r.cfg.rollout.max_new_tokens
    tokens = _rows(SDS((prompts, s.prompt_len), jnp.int32), layout, r.mesh)
    mask = _rows(SDS((prompts, s.prompt_len), jnp.bool_), layout, r.mesh)
    graphdef = nnx.graphdef(model)
    trace = lambda: prefill.trace(graphdef, state, tokens, mask, cache_len=length, n=n, layout=layout)
    plan, traced = _compile("sampler prefill", trace, (state, tokens, mask), alive=SAMPLER_ALIVE,
                            resident_in=device_bytes(state), resident_out=r.resident["KV cache"], note=rows)
    if traced is not None:
        return plan, traced.out_info
    # it does not build: the decode loop continues from a fresh cache's shapes
    return plan, (SDS((prompts * n, model.cfg.hidden_size), model.dtype),
                  jax.eval_shape(lambda: _cache_shape(model, prompts * n, length)))


def _static_sampler(r: AbstractRecipe) -> list[ProgramPlan]:
    """sampler.prefill and sampler._decode: prompts padded to the row shards, every sample a row of a cache
    of prompt bucket + max_new_tokens slots."""
    from pf_jax.sampling.layout import RowLayout, padded_prompt_count
    from pf_jax.sampling.sampler import _decode

    model, graphdef, state = _sampler_model(r)
    layout, s, max_new = RowLayout.of(state), r.sizes, r.cfg.rollout.max_new_tokens
    prompts = padded_prompt_count(s.sampler_prompts, s.samples, layout.shards)
    rows = f"{s.sampler_prompts} prompts x {s.samples} samples, {s.prompt_len} + {max_new} slots"
    cache = jax.eval_shape(lambda: _cache_shape(model, prompts * s.samples, s.prompt_len + max_new))
    r.resident["KV cache"] = device_bytes(_placed(cache, _cache_shardings(cache, layout, r.mesh)))
    prefill_plan, (hidden, cache) = _compile_prefill(r, model, state, layout, prompts, n=s.samples, rows=rows)
    cache = _placed(_abstract(cache), _cache_shardings(cache, layout, r.mesh))
    hidden = _rows(SDS(hidden.shape, hidden.dtype), layout, r.mesh)
    lengths = _rows(SDS((hidden.shape[0],), jnp.int32), layout, r.mesh)
    config, key = _decode_setup(r, model)
    trace = lambda: _decode.trace(graphdef, state, hidden, cache, lengths, key, None, config=config, layout=layout)
    decode_plan, _ = _compile("sampler decode", trace, (state, hidden, cache, lengths), alive=SAMPLER_ALIVE,
                              resident_in=device_bytes(state) + r.resident["KV cache"],
                              note=f"{rows}; a while loop of {max_new} steps (XLA's cost: one step)")
    return [prefill_plan, decode_plan]


def _continuous_sampler(r: AbstractRecipe) -> list[ProgramPlan]:
    """sampler.prefill of each prompt once, then continuous._decode_continuous: rollout.slots rows (rounded
    up to the row shards) whose cache of prompt bucket + max_new_tokens slots lives inside the loop (its
    temporaries), the prompts' cache (their first prompt-bucket slots) the resident KV cache."""
    from pf_jax.sampling.continuous import _bucket_prompts, _decode_continuous
    from pf_jax.sampling.layout import RowLayout, padded_prompt_count
    from pf_jax.sampling.prompts import bucket_length
    from pf_jax.sampling.slot_caches import SLOT_CACHES

    model, graphdef, state = _sampler_model(r)
    layout, s, max_new = RowLayout.of(state), r.sizes, r.cfg.rollout.max_new_tokens
    prompts, samples = padded_prompt_count(s.sampler_prompts, 1, layout.shards), s.sampler_prompts * s.samples
    slots = layout.padded_rows(samples if r.cfg.rollout.slots is None else r.cfg.rollout.slots)
    kv = SLOT_CACHES[r.cfg.rollout.kv_cache](r.cfg.rollout, s.prompt_len)
    rows = (f"{s.sampler_prompts} prompts x {s.samples} samples in {slots} slots, "
            f"{kv.memory(model, slots, bucket_length(prompts, minimum=1))[1]}")
    mask = np.ones((prompts, s.prompt_len), bool)
    prompt = jax.eval_shape(lambda h, c: _bucket_prompts(c, h, mask, s.prompt_len, layout.shards),
                            SDS((prompts, model.cfg.hidden_size), model.dtype),
                            jax.eval_shape(lambda: _cache_shape(model, prompts, s.prompt_len + max_new)))
    prompt = (_prompt_cache_placed(prompt[0], model, layout, r.mesh), _rows(prompt[1], layout, r.mesh))
    r.resident["KV cache"] = device_bytes(prompt[0])
    prefill_plan, _ = _compile_prefill(r, model, state, layout, prompts, n=1, rows=rows)
    config, key = _decode_setup(r, model)
    count = SDS((), jnp.int32, sharding=replicated(r.mesh))
    trace = lambda: _decode_continuous.trace(graphdef, state, prompt[1], prompt[0], key, count, count, count, None,
                                             config=config, layout=layout, slots=slots,
                                             capacity=bucket_length(samples, minimum=1))
    decode_plan, _ = _compile("sampler decode", trace, (state, *prompt), alive=SAMPLER_ALIVE,
                              resident_in=device_bytes(state) + r.resident["KV cache"],
                              note=f"{rows}; continuous batching, a while loop until every sample ends "
                                   f"(XLA's cost: one step)")
    return [prefill_plan, decode_plan]


SAMPLER_PROGRAMS = {"static": _static_sampler, "continuous": _continuous_sampler}


def _prompt_cache_placed(prompt: dict[str, Any], model: Decoder, layout: Any, mesh: Mesh) -> dict[str, Any]:
    """The prompts' cache slots (continuous._bucket_prompts) laid out as the sampler's cache: rows split,
    kv heads on tensor; their lengths as rows."""
    rows, length = prompt["valid"].shape
    cache = _cache_shardings(jax.eval_shape(lambda: _cache_shape(model, rows, length)), layout, mesh)
    placed = dict(k=cache.k, v=cache.v, valid=cache.valid, positions=cache.positions)
    return {name: SDS(x.shape, x.dtype, sharding=placed[name]) if name in placed else _rows(x, layout, mesh)
            for name, x in prompt.items()}


def _cache_shape(model: Decoder, rows: int, slots: int) -> Any:
    from pf_jax.models.kv_cache import KVCache

    return KVCache.init(model.cfg, rows, slots, model.dtype)


def _cache_shardings(cache: Any, layout: Any, mesh: Mesh) -> Any:
    """The sampler's cache layout (RowLayout.constrain_cache): rows over the row axes, kv heads on tensor."""
    if layout.mesh is None:
        return jax.tree_util.tree_map(lambda _: replicated(mesh), cache)
    return kv_cache_shardings(cache, layout.mesh, {**DEFAULT_RULES, "batch": layout.axes})


def compile_recipe(cfg: TrainConfig, topology: str) -> CompiledPlan:
    """Compile every program of the recipe for TPU slice `topology` (see the module doc)."""
    slice_ = tpu_topology(topology)
    r = abstract_recipe(cfg, slice_)
    train, flops = compile_train_step(r)
    programs = [train]
    s = r.sizes
    needs = r.composition.objective.needs
    if r.reference and needs.reference_logp:  # RFT samples from the reference, scores nothing
        programs.append(compile_scoring(r, "reference scoring", rows=s.scored_rows, entropy=False,
                                        note=f"{s.scored_rows} x {s.length} tokens, frozen reference"))
    if r.sampling:  # the trainer scores its own samples for a value head or the entropy reward only
        runs = needs.values or cfg.reward.name == "entropy"
        why = "" if runs else "; not run by this recipe (behaviour log-probs come from the decode loop)"
        programs.append(compile_scoring(r, "policy scoring", rows=s.sequences, entropy=runs, runs=runs,
                                        note=f"{s.sequences} x {s.length} tokens, entropy={runs}{why}"))
        programs += compile_sampler(r)
    analytic, assumed = plan_recipe(cfg, device_count=slice_.size, compile_step=False)
    base = r.frozen.get("policy", r.state.params["policy"])  # with LoRA the model is the base (6·N·tokens)
    quantized = lambda x: isinstance(x, QArray)
    num_params = sum(math.prod((x.qvalue if quantized(x) else x).shape)
                     for x in jax.tree_util.tree_leaves(base, is_leaf=quantized))
    return CompiledPlan(f"{cfg.method.name} on {cfg.model.name}", slice_, dict(r.mesh.shape), s, tuple(programs),
                        dict(r.resident), num_params, flops, analytic, assumed)
