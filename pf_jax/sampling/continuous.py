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

Static shapes: the loop's buffers have the prompt count and the sample count rounded up to powers of
two, so runs with other counts in the same bucket reuse its program.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

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


def continuous_generate(model: Decoder, prompts: Sequence[Sequence[int]], key: Array, config: GenerationConfig,
                        *, n: int, first_sample: int = 0) -> SampleResult:
    """generate(..., n) with config.batching "continuous" (unrolled layers; see the module docstring)."""
    # prefilled once per prompt (n = 1): the prompt list padded until it divides by the row shards
    config, graphdef, state, layout, tokens, mask = prepare_prompts(model, prompts, config, 1)
    samples = len(prompts) * n
    slots = layout.padded_rows(samples if config.slots is None else config.slots)
    check_kv_memory(model, slots, tokens.shape[1], config.max_new_tokens, shards=layout.shards)
    length = tokens.shape[1] + config.max_new_tokens
    hidden, cache = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), cache_len=length, n=1,
                            layout=layout)
    prompt_cache, hidden = _bucket_prompts(cache, hidden, mask, tokens.shape[1])
    del cache  # the prompts' full-length cache: only their first prompt-bucket slots are kept
    out = _decode_continuous(graphdef, state, hidden, prompt_cache, key, jnp.int32(samples), jnp.int32(n),
                             jnp.int32(first_sample), decode_packing(model, layout, slots), config=config,
                             layout=layout, slots=slots,
                             capacity=bucket_length(samples, minimum=1))
    return layout.result(out, tokens, mask, num_prompts=len(prompts), n=n)


def kv_cache_bytes(model: Decoder, rows: int, length: int) -> int:
    """Bytes of a KV cache of `rows` rows of `length` slots (keys and values of every layer)."""
    cfg = model.cfg
    return 2 * cfg.num_layers * rows * length * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(model.dtype).itemsize


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


def check_kv_memory(model: Decoder, slots: int, prompt_len: int, max_new_tokens: int,
                    free: int | None = None, shards: int = 1) -> None:
    """ConfigError when the slots' KV cache (slots x (prompt bucket + max_new_tokens) slots, split over
    `shards` row shards) does not fit in one device's free memory (free: bytes, default free_memory_bytes())."""
    free = free_memory_bytes() if free is None else free
    need = kv_cache_bytes(model, slots, prompt_len + max_new_tokens) // shards
    if free is not None and need > free:
        cfg = model.cfg
        split = f" / {shards} row shards" if shards > 1 else ""
        raise ConfigError(
            f"rollout.slots={slots} needs a KV cache of {need / 2**30:.2f} GiB per device ({slots} slots{split} x "
            f"({prompt_len} prompt + {max_new_tokens} new tokens) x {cfg.num_layers} layers x {cfg.num_kv_heads} kv "
            f"heads x {cfg.head_dim} dims x 2 (keys, values) x {jnp.dtype(model.dtype).itemsize} bytes), more than "
            f"the {free / 2**30:.2f} GiB free", hint="lower rollout.slots or rollout.max_new_tokens")


def _bucket_prompts(cache: KVCache, hidden: Array, mask: np.ndarray, prompt_len: int
                    ) -> tuple[dict[str, Array], Array]:
    """The prompts' first prompt_len cache slots, their last hidden states and lengths, with the prompt
    count padded to a power of two (copies of row 0) so that the decode program is shared."""
    rows = bucket_length(hidden.shape[0], minimum=1)
    take = np.minimum(np.arange(rows), hidden.shape[0] - 1) if rows > hidden.shape[0] else np.arange(rows)
    prompt = dict(k=cache.k[:, take, :prompt_len], v=cache.v[:, take, :prompt_len],
                  valid=cache.valid[take, :prompt_len], positions=cache.positions[take, :prompt_len],
                  lengths=jnp.asarray(mask.sum(-1)[take], jnp.int32))
    return prompt, hidden[take]


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "layout", "slots", "capacity"))
def _decode_continuous(graphdef: nnx.GraphDef, state: nnx.State, hidden: Array, prompt: dict[str, Array],
                       key: Array, samples: Array, n: Array, first_sample: Array,
                       packed: tuple[dict[str, Array], ...] | None = None, *,
                       config: GenerationConfig, layout: RowLayout, slots: int, capacity: int) -> dict[str, Array]:
    """Every sample m < `samples` (prompt m // n) decoded in `slots` rows; outputs [capacity + 1, M] by
    sample (row `capacity` collects the writes of idle slots). Each step: one decode step of every slot,
    then free slots take waiting samples (their hidden state the prompt's), then every slot draws."""
    model = nnx.merge(graphdef, state)
    ops = layout.decode_ops(model.ops.on_mesh(layout.mesh), packed)
    steps, prompt_len = config.max_new_tokens, prompt["k"].shape[2]
    prompt, hidden = layout.whole((prompt, hidden))  # each device admits its own slots from a whole copy
    cache = layout.constrain_cache(KVCache.init(model.cfg, slots, prompt_len + steps, model.dtype, per_row=True))
    rows = layout.constrain_rows(dict(hidden=jnp.zeros((slots, hidden.shape[-1]), hidden.dtype),
                                      sample=jnp.full((slots,), capacity, jnp.int32), j=jnp.zeros((slots,), jnp.int32),
                                      last=jnp.zeros((slots,), jnp.int32), running=jnp.zeros((slots,), bool)))
    carry = dict(cache=cache, **rows, next=jnp.zeros((), jnp.int32), out=_outputs(capacity + 1, steps, config.pad_token_id))

    def step(c: dict) -> dict:
        lengths = prompt["lengths"][jnp.minimum(c["sample"] // n, hidden.shape[0] - 1)]
        at = jnp.maximum(lengths + c["j"] - 1, 0)
        cache = c["cache"].replace(index=prompt_len + jnp.maximum(c["j"] - 1, 0))
        h, cache = model(c["last"][:, None], at[:, None], None, cache, ops=ops)
        c = _admit(dict(c, cache=layout.constrain_cache(cache), hidden=h[:, 0]), prompt, hidden, samples, n, capacity)
        return _emit(model, ops, c, key, first_sample, config, layout)

    carry = jax.lax.while_loop(lambda c: jnp.any(c["running"]) | (c["next"] < samples), step, carry)
    return carry["out"]


def _admit(c: dict, prompt: dict[str, Array], prompt_hidden: Array, samples: Array, n: Array, capacity: int) -> dict:
    """Free slots, lowest first, take the waiting samples in order: their prompts' cache slots, hidden
    states, token count 0; slots left free when none waits become idle (sample = capacity). One select per
    slot row, no dynamic row index: on a mesh each device fills its own slots (the prompt cache is whole
    on every device)."""
    free = ~c["running"]
    rank = jnp.cumsum(free.astype(jnp.int32)) - 1  # a free slot's place among the free slots
    admitted = free & (rank < samples - c["next"])

    def admit(c: dict) -> dict:
        sample = c["next"] + rank
        b = jnp.minimum(sample // n, prompt_hidden.shape[0] - 1)
        cache, P = c["cache"], prompt["k"].shape[2]
        take = lambda old, new, axis: jnp.where(admitted.reshape((-1,) + (1,) * (old.ndim - axis - 1)), new, old)
        k = cache.k.at[:, :, :P].set(take(cache.k[:, :, :P], prompt["k"][:, b], 1))
        v = cache.v.at[:, :, :P].set(take(cache.v[:, :, :P], prompt["v"][:, b], 1))
        fill = lambda buf, head: take(buf, jnp.zeros_like(buf).at[:, :P].set(head), 0)
        cache = cache.replace(k=k, v=v, valid=fill(cache.valid, prompt["valid"][b]),
                              positions=fill(cache.positions, prompt["positions"][b]))
        return dict(c, cache=cache, hidden=take(c["hidden"], prompt_hidden[b], 0),
                    sample=jnp.where(admitted, sample, c["sample"]), j=jnp.where(admitted, 0, c["j"]),
                    running=c["running"] | admitted, next=c["next"] + jnp.sum(admitted, dtype=jnp.int32))

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
