"""Continuous batching: a fixed number of decode rows (slots); when a slot's sample ends (EOS, a stop id or
stop sequence, max_new_tokens), the next waiting sample takes the slot at the next step, until every sample is done.

The prompts are prefilled once, as the static sampler prefills them (one batch, the same cache length),
and each prompt's first P cache slots are kept; admitting sample m copies its prompt's slots into the
slot's cache row. Each slot keeps its own write index, RoPE positions and token count (KVCache with a
per-row index), laid out like the static sampler's row: prompt in slots [0, P), response token j at
P + j, the slots past it invalid. So a sample's attention reads the values a static row reads.

Token j of sample m draws with fold_in(fold_in(key, m), j) (sampler.sample_step_keys), so the samples do
not depend on the slot count or on which samples share a step: a static run with sample_keys=True
returns the same tokens and log-probs.

On a mesh the slots are split over the row axes, and so are the prompts: shard d holds prompts d,
d + shards, d + 2 shards, ... and its slots admit only their samples, in order, from its own queue (the
admission runs in a shard_map over the row axes). No device holds another's prompt cache, and the
samples stay those of one device, whichever slot draws them.

With GenerationConfig.kv_cache "paged" (one device), the slots keep their keys and values in a pool of
pages instead (pf_jax.sampling.slot_caches.PagedSlots): each prompt's pages are written once and shared
by its samples, a sample takes a page each time it writes past its pages and frees them when it ends;
when pages run out the youngest samples are preempted and start again later (the same draws). The tokens
and lengths are the dense cache's (log-probs to float rounding: the attention sums over other padding).
The paged loop also returns how many preemptions there were (out["preempted"]).

Static shapes: the loop's buffers have the prompt count and the sample count rounded up to powers of
two, so runs with other counts in the same bucket reuse its program.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from jax.sharding import PartitionSpec

from pf_jax.config.errors import ConfigError
from pf_jax.models.decoder import Decoder
from pf_jax.models.kv_cache import KVCache
from pf_jax.sampling.layout import RowLayout
from pf_jax.sampling.prompts import bucket_length
from pf_jax.sampling.result import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SampleResult
from pf_jax.sampling.sampler import (
    BATCHED_DECODERS,
    GenerationConfig,
    completes_sequence,
    decode_packing,
    excluded_ends,
    prefill,
    prepare_prompts,
    sample_rows,
    sample_step_keys,
)
from pf_jax.sampling.slot_caches import SLOT_CACHES


def continuous_generate(model: Decoder, prompts: Sequence[Sequence[int]], key: Array, config: GenerationConfig,
                        *, n: int, first_sample: int = 0) -> SampleResult:
    """generate(..., n) with config.batching "continuous" (unrolled layers; see the module docstring)."""
    args, kwargs, (layout, tokens, mask) = continuous_call(model, prompts, key, config, n=n, first_sample=first_sample)
    out = _decode_continuous(*args, **kwargs)
    out.pop("preempted", None)
    return layout.result(out, tokens, mask, num_prompts=len(prompts), n=n)


def continuous_call(model: Decoder, prompts: Sequence[Sequence[int]], key: Array, config: GenerationConfig,
                    *, n: int, first_sample: int = 0) -> tuple[tuple, dict, tuple[RowLayout, np.ndarray, np.ndarray]]:
    """The prompts prefilled (once each, n = 1; the list padded until it divides by the row shards) and the
    slots' KV memory checked: (args, kwargs) of the decode loop _decode_continuous(*args, **kwargs), and
    (layout, tokens, mask) for its result."""
    config, graphdef, state, layout, tokens, mask = prepare_prompts(model, prompts, config, 1)
    samples = len(prompts) * n
    slots = layout.padded_rows(samples if config.slots is None else config.slots)
    kv = SLOT_CACHES[config.kv_cache](config, tokens.shape[1])
    check_kv_memory(model, kv, slots, bucket_length(len(prompts), minimum=1), shards=layout.shards)
    length = tokens.shape[1] + config.max_new_tokens
    hidden, cache = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), cache_len=length, n=1,
                            layout=layout)
    # only the prompts' first prompt-bucket slots are kept: their full-length cache is freed on return
    prompt_cache, hidden = _bucket_prompts(cache, hidden, mask, tokens.shape[1], layout.shards)
    args = (graphdef, state, hidden, prompt_cache, key, jnp.int32(samples), jnp.int32(n), jnp.int32(first_sample),
            decode_packing(model, layout, slots))
    kwargs = dict(config=config, layout=layout, slots=slots, capacity=bucket_length(samples, minimum=1))
    return args, kwargs, (layout, tokens, mask)


def free_memory_bytes() -> int | None:
    """Memory free on the default device: the accelerator's limit minus its use, or on CPU the host's
    available physical memory; None where neither is known."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_kv_memory(model: Decoder, kv, slots: int, prompts: int, free: int | None = None, shards: int = 1) -> None:
    """ConfigError when the slots' KV cache (kv: pf_jax.sampling.slot_caches; split over `shards` row
    shards) does not fit in one device's free memory (free: bytes, default free_memory_bytes())."""
    free = free_memory_bytes() if free is None else free
    total, sizes = kv.memory(model, slots, prompts)
    need = total // shards
    if free is not None and need > free:
        cfg = model.cfg
        split = f" / {shards} row shards" if shards > 1 else ""
        raise ConfigError(
            f"rollout.slots={slots} needs a KV cache of {need / 2**30:.2f} GiB per device ({sizes}{split} x "
            f"{cfg.num_layers} layers x {cfg.num_kv_heads} kv heads x {cfg.head_dim} dims x 2 (keys, values) x "
            f"{jnp.dtype(model.dtype).itemsize} bytes), more than the {free / 2**30:.2f} GiB free",
            hint="lower rollout.slots or rollout.max_new_tokens (or rollout.kv_pages with kv_cache=paged)")


def _bucket_prompts(cache: KVCache, hidden: Array, mask: np.ndarray, prompt_len: int, shards: int = 1
                    ) -> tuple[dict[str, Array], Array]:
    """The prompts' first prompt_len cache slots, their last hidden states and lengths, with the prompt
    count padded to a power of two (copies of row 0; then to a multiple of `shards`) so that the decode
    program is shared. The rows are dealt to the row shards: shard d's block of rows holds prompts
    d, d + shards, d + 2 shards, ... (prompt_of_row), so each shard admits the samples of its own prompts."""
    rows = bucket_length(hidden.shape[0], minimum=1)
    rows = -(-rows // shards) * shards
    prompt = prompt_of_row(np.arange(rows), rows // shards, shards)
    take = np.where(prompt < hidden.shape[0], prompt, 0)
    out = dict(k=cache.k[:, take, :prompt_len], v=cache.v[:, take, :prompt_len],
               valid=cache.valid[take, :prompt_len], positions=cache.positions[take, :prompt_len],
               lengths=jnp.asarray(mask.sum(-1)[take], jnp.int32))
    return out, hidden[take]


def prompt_of_row(row: np.ndarray, per_shard: int, shards: int) -> np.ndarray:
    """The prompt held by row `row` of the prompt cache: row d * per_shard + j holds prompt j * shards + d."""
    return (row % per_shard) * shards + row // per_shard


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "layout", "slots", "capacity"))
def _decode_continuous(graphdef: nnx.GraphDef, state: nnx.State, hidden: Array, prompt: dict[str, Array],
                       key: Array, samples: Array, n: Array, first_sample: Array,
                       packed: tuple[dict[str, Array], ...] | None = None, *,
                       config: GenerationConfig, layout: RowLayout, slots: int, capacity: int) -> dict[str, Array]:
    """Every sample m < `samples` (prompt m // n) decoded in `slots` rows; outputs [capacity + 1, M] by
    sample (row `capacity` collects the writes of idle slots). Each step: one decode step of every slot,
    then free slots take waiting samples of their shard's prompts (their hidden state the prompt's), then
    every slot draws."""
    if config.kv_cache == "paged" and layout.mesh is not None:
        raise ConfigError("rollout.kv_cache=paged runs the sampler on one device for now (its page pool is not "
                          "split over a mesh yet)", hint="use rollout.kv_cache=dense on a mesh")
    model = nnx.merge(graphdef, state)
    ops = layout.decode_ops(model.ops.on_mesh(layout.mesh), packed)
    steps, kv = config.max_new_tokens, SLOT_CACHES[config.kv_cache](config, prompt["k"].shape[2])
    kv_state = kv.init(model, slots, prompt, capacity)
    kv_state["cache"] = layout.constrain_cache(kv_state["cache"])
    rows = layout.constrain_rows(dict(hidden=jnp.zeros((slots, hidden.shape[-1]), hidden.dtype),
                                      sample=jnp.full((slots,), capacity, jnp.int32), j=jnp.zeros((slots,), jnp.int32),
                                      last=jnp.zeros((slots,), jnp.int32), running=jnp.zeros((slots,), bool),
                                      prompt_length=jnp.zeros((slots,), jnp.int32)))
    queue = _shard_queues(samples // n, n, hidden.shape[0], layout)
    carry = dict(**kv_state, **rows, **queue, out=_outputs(capacity + 1, steps, config.pad_token_id))
    admit = _sharded_admit(layout, capacity, kv)

    def step(c: dict) -> dict:
        c = kv.grow(c)
        at = jnp.maximum(c["prompt_length"] + c["j"] - 1, 0)
        h, cache = model(c["last"][:, None], at[:, None], None, kv.for_step(c), ops=ops)
        c = admit(dict(c, cache=layout.constrain_cache(cache), hidden=h[:, 0]), prompt, hidden, n)
        out = _emit(model, ops, c, key, first_sample, config, layout)
        return kv.release(out, c["running"] & ~out["running"])

    more = lambda c: jnp.any(c["running"]) | jnp.any(c["next"] < c["queued"]) | kv.pending(c)
    carry = jax.lax.while_loop(more, step, carry)
    return dict(carry["out"], **{k: carry[k] for k in ("preempted",) if k in carry})


def _shard_queues(prompts: Array, n: Array, rows: int, layout: RowLayout) -> dict[str, Array]:
    """Each row shard's queue: next (samples admitted so far) and queued (its samples: n for each of its
    prompts d, d + shards, ... below `prompts`), int32 [shards]."""
    shards = layout.shards
    d = jnp.arange(shards, dtype=jnp.int32)
    owned = jnp.clip((prompts - d + shards - 1) // shards, 0, rows // shards)
    return layout.constrain_rows(dict(next=jnp.zeros((shards,), jnp.int32), queued=owned * n))


SLOT_FIELDS = ("cache", "hidden", "sample", "j", "running", "prompt_length", "next", "queued")


def _sharded_admit(layout: RowLayout, capacity: int, kv) -> Callable[..., dict]:
    """_admit on each row shard's own slots, queue and prompts (jax.shard_map over the row axes; other mesh
    axes stay automatic); unsplit, _admit itself."""
    if layout.mesh is None:
        return lambda c, prompt, hidden, n: _admit(c, prompt, hidden, n, capacity, 0, 1, kv)
    rows, cache_rows = layout.row_spec(), layout.row_spec(axis=1)
    specs = {f: rows for f in SLOT_FIELDS}
    prompt_specs = dict(k=cache_rows, v=cache_rows, valid=rows, positions=rows, lengths=rows)

    def local(slots: dict, prompt: dict, hidden: Array, n: Array) -> dict:
        shard = jax.lax.axis_index(layout.axes)
        return _admit(slots, prompt, hidden, n, capacity, shard, layout.shards, kv)

    def admit(c: dict, prompt: dict, hidden: Array, n: Array) -> dict:
        slots = {f: c[f] for f in SLOT_FIELDS}
        cache_specs = c["cache"].replace(k=cache_rows, v=cache_rows, valid=rows, positions=rows, index=rows)
        mapped = jax.shard_map(local, mesh=layout.mesh, in_specs=({**specs, "cache": cache_specs}, prompt_specs, rows,
                                                                  PartitionSpec()),
                               out_specs={**specs, "cache": cache_specs}, axis_names=set(layout.axes))
        return dict(c, **mapped(slots, prompt, hidden, n))

    return admit


def _admit(c: dict, prompt: dict[str, Array], prompt_hidden: Array, n: Array, capacity: int, shard: Array | int,
           shards: int, kv) -> dict:
    """One row shard's admission (`c`: its slots' cache and state, its queue; `prompt`: its block of
    prompt rows, prompt_of_row): its free slots, lowest first, take its waiting samples in order (as many as
    the slot cache `kv` can take), their prompts' cache (kv.admit), hidden states and lengths, token count 0;
    slots left free become idle (sample = capacity). One select per slot row, no dynamic row index."""
    free = ~c["running"]
    rank = jnp.cumsum(free.astype(jnp.int32)) - 1  # a free slot's place among the free slots
    retry, retries = kv.retries(c)  # preempted samples first (their shard-local indexes), then the queue
    admitted = free & (rank < jnp.minimum(retries + c["queued"][0] - c["next"][0], kv.admissible(c)))
    retried = admitted & (rank < retries)

    def admit(c: dict) -> dict:
        # the shard's own sample index: its j-th prompt's i-th sample
        waiting = jnp.where(retried, retry[jnp.clip(rank, 0, rank.shape[0] - 1)], c["next"][0] + rank - retries)
        row = jnp.minimum(waiting // n, prompt_hidden.shape[0] - 1)
        sample = (row * shards + shard) * n + waiting % n
        c = kv.admit(c, admitted, row, prompt, retried, waiting)
        return dict(c, hidden=jnp.where(admitted[:, None], prompt_hidden[row], c["hidden"]),
                    prompt_length=jnp.where(admitted, prompt["lengths"][row], c["prompt_length"]),
                    sample=jnp.where(admitted, sample, c["sample"]), j=jnp.where(admitted, 0, c["j"]),
                    running=c["running"] | admitted,
                    next=c["next"] + jnp.sum(admitted & ~retried, dtype=jnp.int32))

    c = jax.lax.cond(jnp.any(admitted), admit, lambda c: c, c)
    return dict(c, sample=jnp.where(c["running"], c["sample"], capacity))


def _emit(model: Decoder, ops, c: dict, key: Array, first_sample: Array, config: GenerationConfig,
          layout: RowLayout) -> dict:
    """Every running slot draws token j of its sample (keyed by sample id and j; on a mesh each row shard
    draws its own slots) and records it; a sample ends on an EOS ("eos"), a stop id or stop sequence
    ("stop") or its max_new_tokens-th token ("length")."""
    logits = model.logits(c["hidden"][:, None], ops=ops)[:, 0]
    excluded = excluded_ends(c["j"], config, model.cfg.vocab_size)
    keys = sample_step_keys(key, first_sample + c["sample"], c["j"])
    draw = layout.rowwise(lambda rows: sample_rows(rows[0], rows[1], config, rows[2]))
    token, policy_logp, sample_logp = draw((keys, logits, excluded))
    running, sample, j = c["running"], c["sample"], c["j"]
    is_eos = jnp.isin(token, jnp.asarray(config.eos_token_ids, jnp.int32))
    is_stop = jnp.isin(token, jnp.asarray(config.stop_token_ids, jnp.int32))
    is_stop = is_stop | completes_sequence(c["out"]["tokens"][sample], j, token, config.stop_sequences)
    full = j + 1 >= config.max_new_tokens
    ended = running & (is_eos | is_stop | full)
    reason = jnp.where(is_eos, FINISH_EOS, jnp.where(is_stop, FINISH_STOP, FINISH_LENGTH))
    out = c["out"]
    put = lambda buf, value: buf.at[sample, j].set(value, mode="drop")  # idle slots write row `capacity`
    out = dict(tokens=put(out["tokens"], token), response_mask=put(out["response_mask"], running),
               policy_logprobs=put(out["policy_logprobs"], policy_logp),
               sampling_logprobs=put(out["sampling_logprobs"], sample_logp),
               lengths=out["lengths"].at[sample].set(j + 1, mode="drop"),
               finish_reason=out["finish_reason"].at[sample].set(reason, mode="drop"))
    return dict(c, out=out, last=token, j=j + running.astype(jnp.int32), running=running & ~ended)


def _outputs(rows: int, steps: int, pad: int) -> dict[str, Array]:
    """The outputs by sample before any token: all padding."""
    return dict(tokens=jnp.full((rows, steps), pad, jnp.int32), response_mask=jnp.zeros((rows, steps), bool),
                policy_logprobs=jnp.zeros((rows, steps), jnp.float32),
                sampling_logprobs=jnp.zeros((rows, steps), jnp.float32),
                lengths=jnp.zeros((rows,), jnp.int32), finish_reason=jnp.full((rows,), FINISH_LENGTH, jnp.int32))


BATCHED_DECODERS["continuous"] = continuous_generate
