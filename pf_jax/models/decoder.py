"""One Flax NNX decoder for Llama 3, Qwen2/2.5, Qwen3 and Gemma 3.

Layer parameters carry a leading "layers" axis. With scan_layers=True (default) they are stacked and the
forward pass is a `lax.scan`, so the compiled program holds one layer body whatever the depth; per-layer
differences (sliding window, RoPE base) are scanned arrays, not Python branches. With scan_layers=False
each layer keeps its own [1, ...] arrays and the layers are unrolled: compiles slower, but XLA:CPU then
reads the weights in place instead of copying each scanned slice (measured: decode step of a Gemma 3
270M-shaped body 0.069 -> 0.040 CPU-seconds), which is what a CPU decode loop wants.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from pf_jax.models.config import ModelConfig, rope_inverse_frequencies
from pf_jax.models.kv_cache import KVCache
from pf_jax.models.lora import (
    EMBEDDING,
    LoraSpec,
    adapted,
    add_adapters,
    current_dropout_key,
    embedding_delta,
    plus_delta,
)
from pf_jax.models.ops import AttentionMask, XlaOps
from pf_jax.models.paged import PagedKVCache
from pf_jax.models.quantized import compute_array, stored_array
from pf_jax.sharding.mesh import constrain

EMBED_LAYOUT = ("batch", "length", "embed")  # activations [B, T, D]; pinned only under activation_sharding
MLP_LAYOUT = ("batch", "length", "mlp")  # MLP hidden [B, T, F]

NO_WINDOW = XlaOps().no_window
Cache = KVCache | PagedKVCache  # a cache writes and reads its own layout (key_slots, write_layer, attend, advanced)
DROPOUT_STREAMS = {name: i for i, name in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}  # window of a full-attention layer: larger than any sequence


def rms_norm(x: Array, weight: Array, *, eps: float, offset: float) -> Array:
    """y = x / sqrt(mean(x^2) + eps) * (offset + w), statistics in float32 (Zhang & Sennrich 2019).

    offset = 0 (Llama/Qwen: the normalised x is cast back before the weight multiply) or 1 (Gemma: the
    product is taken in float32, then cast) — matching each family's reference rounding.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (normed * (offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotary embedding (Su et al. 2021), half-split layout: with x = [x1, x2] and angle a = pos * inv_freq,
    y = [x1 cos a - x2 sin a, x2 cos a + x1 sin a].  x: [B, T, H, Dh], positions: [B, T], inv_freq: [Dh/2].
    """
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, T, Dh/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return (x32 * cos + jnp.concatenate([-x2, x1], -1) * sin).astype(x.dtype)


def _param(value: Array, names: tuple[str, ...]) -> nnx.Param:
    # Logical axis names for the sharding rules; sharding is applied later, not at creation.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class DecoderLayers(nnx.Module):
    """num_layers transformer blocks' parameters, stacked on a leading "layers" axis (HF names in comments)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32,
                 num_layers: int | None = None):
        L, D, H, K, Dh, F = (num_layers or cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim, cfg.intermediate_size)
        normal = lambda *shape: (0.02 * jax.random.normal(rngs.params(), shape)).astype(param_dtype)
        norm_init = lambda *shape: jnp.full(shape, 1.0 - cfg.norm_weight_offset, param_dtype)
        zeros = lambda *shape: jnp.zeros(shape, param_dtype)
        self.attn_norm = _param(norm_init(L, D), ("layers", "norm"))  # input_layernorm
        self.q = _param(normal(L, D, H, Dh), ("layers", "embed", "heads", "head_dim"))
        self.k = _param(normal(L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.v = _param(normal(L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.o = _param(normal(L, H, Dh, D), ("layers", "heads", "head_dim", "embed"))
        if cfg.attention_bias:
            self.q_bias = _param(zeros(L, H, Dh), ("layers", "heads", "head_dim"))
            self.k_bias = _param(zeros(L, K, Dh), ("layers", "kv_heads", "head_dim"))
            self.v_bias = _param(zeros(L, K, Dh), ("layers", "kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = _param(norm_init(L, Dh), ("layers", "norm"))
            self.k_norm = _param(norm_init(L, Dh), ("layers", "norm"))
        if cfg.sandwich_norm:
            self.post_attn_norm = _param(norm_init(L, D), ("layers", "norm"))
            self.post_mlp_norm = _param(norm_init(L, D), ("layers", "norm"))
        self.mlp_norm = _param(norm_init(L, D), ("layers", "norm"))  # post_attention / pre_feedforward
        self.gate = _param(normal(L, D, F), ("layers", "embed", "mlp"))
        self.up = _param(normal(L, D, F), ("layers", "embed", "mlp"))
        self.down = _param(normal(L, F, D), ("layers", "mlp", "embed"))

    def arrays(self) -> dict[str, Array]:
        """The stacked parameter arrays by name, for lax.scan (a quantised weight as its QArray)."""
        return {name: stored_array(var) for name, var in vars(self).items() if isinstance(var, nnx.Param)}


class Decoder(nnx.Module):
    """Token embedding -> L scanned blocks -> final norm. `dtype` is the compute dtype, `param_dtype`
    the storage dtype; norms, attention softmax and RoPE run in float32. `remat` recomputes each block's
    activations in the backward pass (saves memory when training). `scan_layers`: see the module doc;
    `self.layers` is one DecoderLayers of depth L, or an nnx.List of L DecoderLayers of depth 1. `ops`: how
    the projections, attention and head are computed (pf_jax.models.ops; default the portable einsums)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: bool = False, scan_layers: bool = True,
                 ops: XlaOps | None = None):
        self.cfg, self.dtype, self.param_dtype, self.remat = cfg, dtype, param_dtype, remat
        self.scan_layers = scan_layers
        self.lora: LoraSpec | None = None  # adapters on the projections (pf_jax.models.lora.add_adapters); static
        self.ops = ops or XlaOps()  # the program's implementation (pf_jax.models.ops.select_ops); static
        V, D = cfg.vocab_size, cfg.hidden_size
        normal = lambda *shape: (0.02 * jax.random.normal(rngs.params(), shape)).astype(param_dtype)
        self.embed = _param(normal(V, D), ("vocab", "embed"))
        if not cfg.tie_embeddings:
            self.lm_head_weight = _param(normal(V, D), ("vocab", "embed"))
        self.final_norm = _param(jnp.full((D,), 1.0 - cfg.norm_weight_offset, param_dtype), ("norm",))
        if scan_layers:
            self.layers = DecoderLayers(cfg, rngs=rngs, param_dtype=param_dtype)
        else:
            self.layers = nnx.List([DecoderLayers(cfg, rngs=rngs, param_dtype=param_dtype, num_layers=1)
                                    for _ in range(cfg.num_layers)])

    def stacked_layer_arrays(self) -> dict[str, Array]:
        """{name: [L, ...] array} whichever the storage layout (a concatenation when unrolled)."""
        if self.scan_layers:
            return self.layers.arrays()
        per_layer = [layer.arrays() for layer in self.layers]
        concat = lambda *xs: jnp.concatenate(xs)
        return {name: jax.tree_util.tree_map(concat, *[p[name] for p in per_layer]) for name in per_layer[0]}

    def lm_head(self) -> Array:
        """[V, D] output projection (the embedding when tied); contract over D, never transpose."""
        return self.embed[...] if self.cfg.tie_embeddings else self.lm_head_weight[...]

    def logits(self, hidden: Array, *, ops: XlaOps | None = None) -> Array:
        """[B, T, V] float32 logits, soft-capped (c tanh(z / c)) where configured. Small vocab / last step only.
        ops: this call's implementation (default: the model's)."""
        z = (ops or self.ops).head(hidden, self.lm_head().astype(hidden.dtype))
        cap = self.cfg.final_logit_softcap
        return z if cap is None else jnp.tanh(z / cap) * cap

    def __call__(self, tokens: Array, positions: Array, attention_mask: Array | None = None,
                 cache: Cache | None = None, *, ops: XlaOps | None = None,
                 prefill: bool = False, segment_ids: Array | None = None) -> tuple[Array, Cache | None]:
        """tokens, positions: int [B, T]; attention_mask: bool [B, T] (False = padding).

        Without a cache, token t attends to tokens s <= t that are not padding. With a cache, the T new
        tokens are written at slots [index, index + T) and attend to all valid slots up to their own (a
        PagedKVCache: at each row's slots [lengths, lengths + T), positions = slots; pf_jax.models.paged).
        Sliding layers additionally require position(q) - position(k) < sliding_window.
        ops: this call's implementation (default: the model's, `self.ops`), e.g. the sampler's CPU decode
        kernels with the projections packed once (pf_jax.models.ops.CpuDecodeOps).
        prefill: the cache holds nothing yet (a prefill at slot 0), so the new tokens' attention is
        self-attention among them, which fused kernels (splash on TPU) compute without the [B, T, S] mask.
        segment_ids: int [B, T], packed rows without a cache: a token attends only to tokens of its own
        segment (1, 2, ...; 0 = padding), so several examples share a row without seeing each other.
        Returns the final-normed hidden states [B, T, D] and the updated cache (or None).
        """
        cfg, ops = self.cfg, ops or self.ops
        valid = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        positions = positions.astype(jnp.int32)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
        if self.lora is not None and EMBEDDING in self.lora.targets:
            x = plus_delta(x, embedding_delta(self.lora, tokens, self.embed_lora_a[...], self.embed_lora_b[...]).astype(x.dtype))
        x = constrain(x, EMBED_LAYOUT)
        mask, k_valid, k_positions = self._attention_mask(valid, positions, cache, segment_ids)
        layers = _LayerPass(cfg, ops, self.dtype, positions, mask, cache, fresh=cache is not None and prefill,
                            lora=self.lora, dropout_key=current_dropout_key())
        carry = (x, None, None) if cache is None else (x, cache.k, cache.v)
        x, k_all, v_all = self._run_layers(layers, carry)
        x = rms_norm(x, self.final_norm[...], eps=cfg.rms_norm_eps, offset=cfg.norm_weight_offset)
        x = constrain(x, EMBED_LAYOUT)
        if cache is None:
            return x, None
        return x, cache.advanced(k_all, v_all, k_valid, k_positions, tokens.shape[1])

    def _run_layers(self, layers: _LayerPass, carry: tuple) -> tuple:
        """The blocks over (x, the stacked keys, values or None): one lax.scan over the stacked layers, or the
        unrolled layers; each rematerialised in the backward pass with `remat`. Per-layer differences
        (RoPE base, sliding window) are arrays indexed by layer, not Python branches."""
        cfg = self.cfg
        inv_freq = np.array([rope_inverse_frequencies(cfg, sliding=s) for s in cfg.is_sliding], np.float32)
        windows = np.array([cfg.sliding_window if s else NO_WINDOW for s in cfg.is_sliding], np.int32)
        block = jax.checkpoint(layers.block) if self.remat else layers.block
        if self.scan_layers:
            xs = (self.layers.arrays(), inv_freq, windows, np.arange(cfg.num_layers, dtype=np.int32))
            return jax.lax.scan(block, carry, xs)[0]
        for i, layer in enumerate(self.layers):
            params = {name: jax.tree_util.tree_map(lambda x: x[0], w) for name, w in layer.arrays().items()}
            carry, _ = block(carry, (params, inv_freq[i], windows[i], i))
        return carry

    def _attention_mask(self, valid: Array, positions: Array, cache: Cache | None, segment_ids: Array | None = None
                        ) -> tuple[AttentionMask, Array, Array]:
        """(the pass's AttentionMask, the keys' valid flags and positions [B, S] after writing the new tokens)."""
        t = valid.shape[1]
        if cache is None:
            q_slots, k_valid, k_positions, kv_slots = jnp.arange(t)[None], valid, positions, jnp.arange(t)
        else:  # q_slots [1, T], or [B, T] with a per-row index
            q_slots, k_valid, k_positions = cache.key_slots(valid, positions)
            kv_slots = jnp.arange(cache.max_len)
        causal = k_valid[:, None, :] & (kv_slots[None, None, :] <= q_slots[:, :, None])  # [B, T, S]
        segments = valid.astype(jnp.int32)
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for a pass without a KV cache")
            segments = jnp.where(valid, segment_ids.astype(jnp.int32), 0)
            causal = causal & (segments[:, :, None] == segments[:, None, :])
        distance = positions[:, :, None] - k_positions[:, None, :]  # [B, T, S]
        windows = tuple(sorted({self.cfg.sliding_window if s else NO_WINDOW for s in self.cfg.is_sliding}))
        return AttentionMask(causal, distance, segments, windows), k_valid, k_positions


def with_layer_layout(model: Decoder, *, scan_layers: bool) -> Decoder:
    """The same model (same parameter values, dtypes, remat, ops) with stacked (scan) or per-layer (unrolled)
    layer storage; e.g. train scanned, then decode unrolled on CPU."""
    def empty() -> Decoder:
        out = Decoder(model.cfg, rngs=nnx.Rngs(0), dtype=model.dtype, param_dtype=model.param_dtype,
                      remat=model.remat, scan_layers=scan_layers, ops=model.ops)
        if model.lora is not None:
            add_adapters(out, model.lora, rngs=nnx.Rngs(0))
        return out

    new = nnx.eval_shape(empty)
    new.embed.set_value(model.embed[...])
    if model.lora is not None and EMBEDDING in model.lora.targets:
        new.embed_lora_a.set_value(model.embed_lora_a[...])
        new.embed_lora_b.set_value(model.embed_lora_b[...])
    new.final_norm.set_value(model.final_norm[...])
    if not model.cfg.tie_embeddings:
        new.lm_head_weight.set_value(model.lm_head_weight[...])
    for name, stacked in model.stacked_layer_arrays().items():
        if scan_layers:
            getattr(new.layers, name).set_value(stacked)
        else:
            for i, layer in enumerate(new.layers):
                getattr(layer, name).set_value(jax.tree_util.tree_map(lambda x, i=i: x[i : i + 1], stacked))
    return new


@dataclasses.dataclass(frozen=True)
class _LayerPass:
    """What every block of one forward pass shares: the config, the implementation (pf_jax.models.ops),
    the compute dtype, the tokens' positions, the attention mask, the cache before the pass (it writes and
    reads its own layout: KVCache or PagedKVCache), and whether the cache held nothing before (a prefill:
    self-attention among the new tokens)."""

    cfg: ModelConfig
    ops: XlaOps
    dtype: jnp.dtype
    positions: Array
    mask: AttentionMask
    cache: Cache | None
    fresh: bool
    lora: LoraSpec | None = None
    dropout_key: Array | None = None  # the adapters' dropout while training (pf_jax.models.lora)

    def adapted(self, y: Array, x: Array, p: dict[str, Array], name: str, layer: Array | int) -> Array:
        """y = x W (the base projection) plus the LoRA adapter's delta of `name`, if it has one."""
        if self.lora is None:
            return y
        key = None
        if self.dropout_key is not None:
            key = jax.random.fold_in(jax.random.fold_in(self.dropout_key, layer), DROPOUT_STREAMS[name])
        return adapted(self.lora, y, x, p, name, key)

    def norm(self, y: Array, w: Array) -> Array:
        return rms_norm(y, w, eps=self.cfg.rms_norm_eps, offset=self.cfg.norm_weight_offset)

    def block(self, carry: tuple, layer: tuple) -> tuple[tuple, None]:
        """One pre-norm transformer block (sandwich norms for Gemma 3): x + attn(norm x), then + mlp(norm x)."""
        x, k_all, v_all = carry
        p, inv_freq, window, layer_index = layer
        p = {name: compute_array(w, self.dtype) for name, w in p.items()}
        a, k_all, v_all = self.attention(x, k_all, v_all, p, inv_freq, window, layer_index)
        x = x + (self.norm(a, p["post_attn_norm"]) if self.cfg.sandwich_norm else a)
        m = self.mlp(x, p, layer_index)
        x = x + (self.norm(m, p["post_mlp_norm"]) if self.cfg.sandwich_norm else m)
        return (x, k_all, v_all), None

    def attention(self, x: Array, k_all: Array | None, v_all: Array | None, p: dict[str, Array], inv_freq: Array,
                  window: Array | int, layer: Array | int) -> tuple[Array, Array | None, Array | None]:
        """(the attention output projected back to D, the stacked keys and values with this layer's new ones
        written at the pass's slots, or None without a cache)."""
        cfg, ops = self.cfg, self.ops
        h = constrain(self.norm(x, p["attn_norm"]), EMBED_LAYOUT)
        q, k, v = (self.adapted(y, h, p, n, layer) for y, n in zip(ops.qkv(h, p, layer), ("q", "k", "v")))
        if cfg.attention_bias:
            q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
        if cfg.qk_norm:
            q, k = self.norm(q, p["q_norm"]), self.norm(k, p["k_norm"])
        q, k = apply_rope(q, self.positions, inv_freq), apply_rope(k, self.positions, inv_freq)
        scale, softcap = cfg.attention_scale, cfg.attn_logit_softcap
        if k_all is None:
            a = ops.self_attention(q, k, v, self.mask, window, scale=scale, softcap=softcap)
        else:
            k_all, v_all = self.cache.write_layer(k_all, k, layer), self.cache.write_layer(v_all, v, layer)
            a = self.cache.attend(ops, q, k, v, k_all, v_all, layer, self.mask, window, fresh=self.fresh, scale=scale,
                                  softcap=softcap)
        return self.adapted(ops.out(a, p, layer), a, p, "o", layer), k_all, v_all

    def mlp(self, x: Array, p: dict[str, Array], layer: Array | int) -> Array:
        """down(act(gate(norm x)) * up(norm x)), act = SiLU (Llama, Qwen) or tanh-GELU (Gemma)."""
        h = constrain(self.norm(x, p["mlp_norm"]), EMBED_LAYOUT)
        gate, up = (self.adapted(y, h, p, n, layer) for y, n in zip(self.ops.gate_up(h, p, layer), ("gate", "up")))
        gate = jax.nn.silu(gate) if self.cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        x = constrain(gate * up, MLP_LAYOUT)
        return self.adapted(self.ops.down(x, p, layer), x, p, "down", layer)
