"""Compiled generation: one jitted prefill, one jitted decode loop (lax.while_loop over a donated KV
cache), exact per-token log-probs.

The two jit boundaries below (`prefill`, `_decode`) are the only ones on the hot path. Their static
arguments are the model's graph definition, the padded shapes and the
GenerationConfig, so a run whose prompts fall in the same power-of-two length bucket compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from pf_jax.config.errors import ConfigError
from pf_jax.kernels import packing_pays
from pf_jax.models.decoder import Decoder, with_layer_layout
from pf_jax.models.kv_cache import KVCache
from pf_jax.models.logprobs import positions_from_mask
from pf_jax.models.ops import pack_projections
from pf_jax.sampling.filters import SamplingParams, sample_next_token
from pf_jax.sampling.layout import RowLayout
from pf_jax.sampling.prompts import bucket_length, left_pad
from pf_jax.sampling.result import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SampleResult

BATCHING = ("static", "continuous")
KV_CACHES = ("dense", "paged")  # continuous batching's slot caches (pf_jax.sampling.slot_caches.SLOT_CACHES)
BATCHED_DECODERS: dict[str, Callable[..., SampleResult]] = {}  # batching name -> generate(...); filled by
# pf_jax.sampling.continuous when the package is imported (this module stays below it in the import graph)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Static settings of a generation call (hashable: part of the compiled program's cache key).

    eos_token_ids=None takes the model config's EOS ids. A sequence ends after emitting an EOS id
    (finish reason "eos") or a stop id ("stop"), or after max_new_tokens ("length"). Before
    min_new_tokens tokens, EOS and stop ids are excluded from the sampling distribution (as in
    transformers), which changes sampling_logprobs but not policy_logprobs. A row also ends ("stop") on
    the token that completes one of stop_sequences with the tokens before it: the stop strings' encodings
    (pf_jax.sampling.stops.stop_token_sequences), so that a finished row stops decoding (its slot goes to
    the next sample) instead of running on to be cut afterwards; the text-level cut stays the reference.

    batching "continuous" decodes `slots` rows at a time and refills a row with the next waiting sample
    as soon as its sample ends (pf_jax.sampling.continuous). Its draws are keyed per sample
    (sample_keys): token j of sample m (row m of the result) draws with fold_in(fold_in(key, m), j), so
    they do not depend on the slot; a static run with sample_keys=True returns the same samples. The
    static default keys step i's draws of the whole batch with fold_in(key, i).
    """

    max_new_tokens: int = 64
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] | None = None
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    pad_token_id: int | None = None  # None: the model's pad id, else 0
    min_prompt_bucket: int = 16
    stop_strings: tuple[str, ...] = ()  # cut on the decoded text afterwards (pf_jax.sampling.stops)
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token ids that end a row in the loop (multi-token stops)
    batching: str = "static"  # "static": one batch of every sample; "continuous": pf_jax.sampling.continuous
    slots: int | None = None  # continuous: rows decoded at once (None: one per sample)
    sample_keys: bool = False  # draws keyed by (key, sample id, token index), as continuous batching's are
    kv_cache: str = "dense"  # continuous: the slots' keys and values (pf_jax.sampling.slot_caches): "dense" | "paged"
    page_size: int = 16  # kv_cache "paged": tokens per page
    kv_pages: int | None = None  # kv_cache "paged": pages for the samples (None: every slot's worst case; fewer:
    # the youngest samples are preempted when pages run out, and start again)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.batching not in BATCHING:
            raise ConfigError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.slots is not None and self.slots < 1:
            raise ConfigError(f"slots (rows decoded at once) must be >= 1, got {self.slots}",
                              hint="set rollout.slots to a positive count, or leave it out for one per sample")
        if self.kv_cache not in KV_CACHES:
            raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        for name, least in (("page_size", 1), ("kv_pages", 1)):
            if (value := getattr(self, name)) is not None and value < least:
                raise ConfigError(f"{name} must be >= {least}, got {value}")
        if self.kv_cache == "paged" and self.batching != "continuous":
            raise ConfigError("kv_cache=paged is continuous batching's cache", hint="set batching (rollout.batching) "
                              "to continuous, or kv_cache to dense")
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"GenerationConfig.sampling must be a SamplingParams, got {type(self.sampling).__name__}")

    def resolved(self, model: Decoder) -> GenerationConfig:
        """A copy with the model's EOS / pad ids filled in and id tuples as plain sorted ints."""
        eos = model.cfg.eos_token_ids if self.eos_token_ids is None else self.eos_token_ids
        pad = self.pad_token_id if self.pad_token_id is not None else (model.cfg.pad_token_id or 0)
        vocab = model.cfg.vocab_size
        for name, ids in (("eos_token_ids", eos), ("stop_token_ids", self.stop_token_ids), ("pad_token_id", (pad,))):
            bad = [i for i in ids if not 0 <= int(i) < vocab]
            if bad:
                raise ValueError(f"{name} {bad} outside the model's vocabulary [0, {vocab})")
        bad = [seq for seq in self.stop_sequences if not seq or not all(0 <= int(i) < vocab for i in seq)]
        if bad:
            raise ValueError(f"stop_sequences {bad} are empty or leave the model's vocabulary [0, {vocab})")
        return dataclasses.replace(self, eos_token_ids=tuple(sorted({int(i) for i in eos})),
                                   stop_token_ids=tuple(sorted({int(i) for i in self.stop_token_ids})),
                                   pad_token_id=int(pad))


def generate(model: Decoder, prompts: Sequence[Sequence[int]], key: Array, config: GenerationConfig = GenerationConfig(),
             *, n: int = 1, first_sample: int = 0) -> SampleResult:
    """Sample n continuations of each prompt (token-id lists). The prompts are left-padded to a
    power-of-two bucket and prefilled once; the cache is repeated n times for the samples.

    The model should store its layers unrolled (Decoder(..., scan_layers=False), or
    `with_layer_layout(model, scan_layers=False)` once per set of weights): XLA on CPU copies each
    scanned layer's weights out of the stack at every decode step. A scanned model is converted here,
    at every call (a copy of its layer weights).
    Weights on a mesh of several devices: the rows are split over its batch axes (see
    pf_jax.sampling.layout); the result is the same as on one device.
    Reproducible: the same weights, prompts, key and config give the same result.
    first_sample: the sample id of row 0 for per-sample keys (config.sample_keys, continuous batching):
    calls over consecutive chunks of a prompt list, each passing its first row's index in the whole,
    draw the samples one call over the whole list draws (with the prefill batched otherwise, its float
    rounding may differ, and a near-tie may then go the other way).
    """
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    config = dataclasses.replace(config, stop_strings=())  # text-level, applied by the caller: not a new program
    if model.scan_layers:
        model = with_layer_layout(model, scan_layers=False)
    if config.batching != "static":  # registered by its module, which builds on this one's pieces
        return BATCHED_DECODERS[config.batching](model, prompts, key, config, n=n, first_sample=first_sample)
    config, graphdef, state, layout, tokens, mask = prepare_prompts(model, prompts, config, n)
    hidden, cache = prefill(graphdef, state, *layout.place_rows((tokens, mask)),
                             cache_len=tokens.shape[1] + config.max_new_tokens, n=n, layout=layout)
    prompt_lengths = layout.place_rows(np.repeat(mask.sum(-1), n).astype(np.int32))
    packed = decode_packing(model, layout, hidden.shape[0])
    out, _ = _decode(graphdef, state, hidden, cache, prompt_lengths, key, packed, jnp.int32(first_sample),
                     config=config, layout=layout)
    return layout.result(out, tokens, mask, num_prompts=len(prompts), n=n)


_packings: list[tuple[object, tuple[weakref.ref, ...], tuple[dict[str, Array], ...]]] = []  # the latest only


def decode_packing(model: Decoder, layout: RowLayout, rows: int) -> tuple[dict[str, Array], ...] | None:
    """The decode loop's projection weights packed for the AMX path on CPU (pf_jax.models.ops.pack_projections), or
    None where that path is not taken: weights not on one CPU device, stacked layers, not float32, a row
    count outside pf_jax.kernels.packing_pays, no AMX.

    Packed once per set of weights: the latest packing is kept while the arrays it was packed from are
    alive, so that repeated calls with the same weights (inference, a benchmark) pack once and a training
    run packs once per update; it is dropped when they are freed. Holds one weight-sized copy at most."""
    if not (layout.cpu and not model.scan_layers and model.dtype == jnp.float32 and packing_pays(rows)):
        return None
    arrays = tuple(w for layer in model.layers for w in layer.arrays().values())
    if any(w.dtype != jnp.float32 for w in arrays):
        return None
    for _, refs, packed in _packings:
        if len(refs) == len(arrays) and all(r() is w for r, w in zip(refs, arrays)):
            return packed
    graphdef, state = nnx.split(model)
    packed, token = _pack(graphdef, state), object()
    _packings[:] = [(token, tuple(weakref.ref(w) for w in arrays), packed)]
    weakref.finalize(arrays[0], _drop_packing, token)  # the weights are gone: so is their packing
    return packed


def _drop_packing(token: object) -> None:
    _packings[:] = [entry for entry in _packings if entry[0] is not token]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _pack(graphdef: nnx.GraphDef, state: nnx.State) -> tuple[dict[str, Array], ...]:
    return pack_projections(nnx.merge(graphdef, state))


def prepare_prompts(model: Decoder, prompts: Sequence[Sequence[int]], config: GenerationConfig, n: int
                    ) -> tuple[GenerationConfig, nnx.GraphDef, nnx.State, RowLayout, np.ndarray, np.ndarray]:
    """The set-up shared by generate and power_generate: (config with the model's ids filled in, the
    model's graph and state, the row layout of its weights, left-padded prompt tokens and mask
    [B_padded, P]). P is the prompts' power-of-two bucket; the prompt list is padded to the layout's
    shard count; a P + max_new_tokens beyond the model's positions or an id outside its vocabulary is a
    ValueError."""
    config = config.resolved(model)
    longest = max((len(p) for p in prompts), default=0)
    length = bucket_length(longest, minimum=config.min_prompt_bucket)
    if length + config.max_new_tokens > model.cfg.max_position_embeddings:
        raise ConfigError(f"a prompt of {longest} tokens (padded to {length}) + max_new_tokens {config.max_new_tokens} "
                          f"exceeds the model's context, max_position_embeddings {model.cfg.max_position_embeddings}",
                          hint="lower data.max_prompt_tokens or rollout.max_new_tokens")
    graphdef, state = nnx.split(model)
    layout = RowLayout.of(state)  # weights on a multi-device mesh: rows split over its batch axes
    tokens, mask = left_pad(layout.pad_prompts(prompts, n), length=length, pad_token_id=config.pad_token_id,
                           vocab_size=model.cfg.vocab_size)
    return config, graphdef, state, layout, tokens, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "n", "layout"))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: Array, mask: Array, *, cache_len: int,
             n: int, layout: RowLayout) -> tuple[Array, KVCache]:
    """Run the left-padded prompts [B, P] through the model into a fresh cache of cache_len slots, then
    repeat every row n times. Returns (last hidden state [B*n, D], cache with batch B*n), rows laid out
    by `layout`."""
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(model.cfg, tokens.shape[0], cache_len, model.dtype)
    hidden, cache = model(tokens, positions_from_mask(mask), mask, cache, ops=model.ops.on_mesh(layout.mesh),
                          prefill=True)
    cache = layout.constrain_cache(cache.repeat_rows(n))
    return layout.constrain_rows(jnp.repeat(hidden[:, -1], n, axis=0)), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "layout"), donate_argnames=("cache",))
def _decode(graphdef: nnx.GraphDef, state: nnx.State, hidden: Array, cache: KVCache, prompt_lengths: Array,
            key: Array, packed: tuple[dict[str, Array], ...] | None = None, first_sample: Array | int = 0, *,
            config: GenerationConfig,
            layout: RowLayout) -> tuple[dict[str, Array], KVCache]:
    """Emit up to max_new_tokens tokens per row in a lax.while_loop that stops once every row has ended.

    hidden: [N, D] state after the last prompt token; prompt_lengths: int32 [N] real prompt tokens (the
    RoPE position of response token j is prompt_length + j); packed: the projections for
    pf_jax.kernels.matmul_packed (decode_packing), or None; first_sample: the sample id of row 0 (with
    config.sample_keys); the steps' implementation is
    `layout.decode_ops(model, packed)`. Returns SampleResult's response fields and
    the final cache (returned so that the donated input cache is updated in place, not copied).
    """
    model = nnx.merge(graphdef, state)
    ops = layout.decode_ops(model.ops.on_mesh(layout.mesh), packed)
    batch, steps, pad = hidden.shape[0], config.max_new_tokens, config.pad_token_id
    eos, stop = jnp.asarray(config.eos_token_ids, jnp.int32), jnp.asarray(config.stop_token_ids, jnp.int32)

    def emit(i: Array, hidden: Array, carry: dict[str, Array]) -> dict[str, Array]:
        logits = model.logits(hidden[:, None], ops=ops)[:, 0]
        excluded = excluded_ends(jnp.broadcast_to(i, (batch,)), config, model.cfg.vocab_size)
        if config.sample_keys:
            rows = first_sample + jnp.arange(batch, dtype=jnp.int32)
            token, policy_logp, sample_logp = sample_rows(sample_step_keys(key, rows, i), logits, config, excluded)
        else:
            token, policy_logp, sample_logp = sample_next_token(
                jax.random.fold_in(key, i), logits, config.sampling, excluded, rowwise=layout.rowwise)
        completes = completes_sequence(carry["tokens"], jnp.broadcast_to(i, (batch,)), token, config.stop_sequences)
        return _record(carry, i, token, policy_logp, sample_logp, completes, eos=eos, stop=stop, pad=pad)

    def keep_going(carry: dict[str, Array]) -> Array:
        return (carry["i"] < steps) & ~jnp.all(carry["done"])

    def step(carry: dict[str, Array]) -> dict[str, Array]:
        i = carry["i"]
        previous = jax.lax.dynamic_index_in_dim(carry["tokens"], i - 1, axis=1, keepdims=True)  # [N, 1]
        # A finished row keeps decoding its pad token (static shapes); its outputs are masked in emit.
        h, cache = model(previous, (prompt_lengths + i - 1)[:, None], None, carry["cache"], ops=ops)
        return emit(i, h[:, 0], dict(carry, cache=layout.constrain_cache(cache)))

    carry = dict(i=jnp.zeros((), jnp.int32), cache=cache, **layout.constrain_rows(_empty_outputs(batch, steps, pad)))
    carry = jax.lax.while_loop(keep_going, step, emit(carry["i"], hidden, carry))
    names = ("tokens", "response_mask", "lengths", "finish_reason", "policy_logprobs", "sampling_logprobs")
    return {name: carry[name] for name in names}, carry["cache"]


def excluded_ends(index: Array, config: GenerationConfig, vocab_size: int) -> Array | None:
    """The ids each row may not draw at its token `index` [N]: EOS and stop ids before min_new_tokens
    (int32 [N, K]; id vocab_size = nothing excluded), or None when min_new_tokens is 0."""
    ends = tuple(sorted(set(config.eos_token_ids + config.stop_token_ids)))  # distinct: see sample_next_token
    if config.min_new_tokens == 0 or not ends:
        return None
    return jnp.where(index[:, None] < config.min_new_tokens, jnp.asarray(ends, jnp.int32)[None], vocab_size)


def completes_sequence(history: Array, index: Array, token: Array, sequences: tuple[tuple[int, ...], ...]) -> Array:
    """bool [N]: whether `token`, each row's token number `index` [N], completes one of `sequences` with
    the row's earlier tokens (history [N, steps], history[:, t] = token t)."""
    hit = jnp.zeros(token.shape, bool)
    if not sequences:
        return hit
    back = np.arange(1, max(map(len, sequences)))
    earlier = jnp.take_along_axis(history, jnp.maximum(index[:, None] - back, 0), axis=1)  # tokens index-1, index-2, ...
    for seq in sequences:
        before = earlier[:, : len(seq) - 1] == jnp.asarray(seq[-2::-1], jnp.int32)  # seq[-2], seq[-3], ..., seq[0]
        hit = hit | ((token == seq[-1]) & (index >= len(seq) - 1) & jnp.all(before, axis=1))
    return hit


def sample_step_keys(key: Array, samples: Array, index: Array) -> Array:
    """The draw keys of token `index` of samples `samples` (int32 [N], index scalar or [N]):
    fold_in(fold_in(key, sample), index), whatever row or step the sample is decoded at."""
    index = jnp.broadcast_to(index, samples.shape)
    return jax.vmap(lambda m, j: jax.random.fold_in(jax.random.fold_in(key, m), j))(samples, index)


def sample_rows(keys: Array, logits: Array, config: GenerationConfig, excluded: Array | None
                ) -> tuple[Array, Array, Array]:
    """sample_next_token row by row, row r drawing with keys[r] (logits [N, V]): a row's draw depends on
    its key and logits only, not on the batch it is in."""
    def one(k: Array, z: Array, ex: Array | None) -> tuple[Array, Array, Array]:
        out = sample_next_token(k, z[None], config.sampling, None if ex is None else ex[None])
        return tuple(x[0] for x in out)

    if excluded is None:
        return jax.vmap(lambda k, z: one(k, z, None))(keys, logits)
    return jax.vmap(one)(keys, logits, excluded)


def _empty_outputs(batch: int, steps: int, pad: int) -> dict[str, Array]:
    """The decode loop's per-row outputs before the first token: all padding, every row running."""
    return dict(
        tokens=jnp.full((batch, steps), pad, jnp.int32),
        response_mask=jnp.zeros((batch, steps), bool),
        policy_logprobs=jnp.zeros((batch, steps), jnp.float32),
        sampling_logprobs=jnp.zeros((batch, steps), jnp.float32),
        lengths=jnp.zeros((batch,), jnp.int32),
        finish_reason=jnp.full((batch,), FINISH_LENGTH, jnp.int32),
        done=jnp.zeros((batch,), bool),
    )


def _record(carry: dict[str, Array], i: Array, token: Array, policy_logp: Array, sample_logp: Array,
            completes: Array, *, eos: Array, stop: Array, pad: int) -> dict[str, Array]:
    """Step i's token and log-probs written for the rows still running (finished rows keep padding); a row
    ends on an EOS ("eos"), a stop id or the token completing a stop sequence (`completes`: "stop")."""
    active = ~carry["done"]
    is_eos, is_stop = jnp.isin(token, eos), jnp.isin(token, stop) | completes
    ended = active & (is_eos | is_stop)
    put = lambda buf, value, fill: buf.at[:, i].set(jnp.where(active, value, fill))
    return dict(
        carry,
        i=i + 1,
        tokens=put(carry["tokens"], token, pad),
        response_mask=put(carry["response_mask"], True, False),
        policy_logprobs=put(carry["policy_logprobs"], policy_logp, 0.0),
        sampling_logprobs=put(carry["sampling_logprobs"], sample_logp, 0.0),
        lengths=carry["lengths"] + active.astype(jnp.int32),
        finish_reason=jnp.where(ended, jnp.where(is_eos, FINISH_EOS, FINISH_STOP), carry["finish_reason"]),
        done=carry["done"] | ended,
    )
