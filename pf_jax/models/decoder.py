"""One Flax NNX decoder for Llama 3, Qwen2/2.5, Qwen3 and Gemma 3.

Layer parameters carry a leading "layers" axis. With scan_layers=True (default) they are stacked and the
forward pass is a `lax.scan`, so the compiled program holds one layer body whatever the depth; per-layer
differences (sliding window, RoPE base) are scanned arrays, not Python branches. With scan_layers=False
each layer keeps its own [1, ...] arrays and the layers are unrolled: compiles slower, but XLA:CPU then
reads the weights in place instead of copying each scanned slice (measured: decode step of a Gemma 3
270M-shaped body 0.069 -> 0.040 CPU-seconds), which is what a CPU decode loop wants.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from pf_jax.kernels import matmul_nn, matmul_nt, matmul_packed, pack_nn
from pf_jax.kernels.attention import decode_attention
from pf_jax.models.config import ModelConfig, rope_inverse_frequencies
from pf_jax.models.kv_cache import KVCache
from pf_jax.sharding.mesh import constrain

EMBED_LAYOUT = ("batch", "length", "embed")  # activations [B, T, D]; pinned only under activation_sharding
MLP_LAYOUT = ("batch", "length", "mlp")  # MLP hidden [B, T, F]

NO_WINDOW = 2**30  # window of a full-attention layer: larger than any sequence


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


def attention(q: Array, k: Array, v: Array, allowed: Array, *, scale: float) -> Array:
    """Grouped-query attention: out = softmax(scale * q k^T, masked) v (Vaswani et al. 2017; GQA,
    Ainslie et al. 2023).

    q: [B, T, H, Dh]; k, v: [B, S, KVH, Dh]; allowed: bool [B, T, S]. Logits and softmax in float32.
    A query with no allowed key (a padding query) gets a uniform average instead of NaN.
    """
    b, t, h, dh = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)


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
        """The stacked parameter arrays by name, for lax.scan."""
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


class Decoder(nnx.Module):
    """Token embedding -> L scanned blocks -> final norm. `dtype` is the compute dtype, `param_dtype`
    the storage dtype; norms, attention softmax and RoPE run in float32. `remat` recomputes each block's
    activations in the backward pass (saves memory when training). `scan_layers`: see the module doc;
    `self.layers` is one DecoderLayers of depth L, or an nnx.List of L DecoderLayers of depth 1."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: bool = False, scan_layers: bool = True):
        self.cfg, self.dtype, self.param_dtype, self.remat = cfg, dtype, param_dtype, remat
        self.scan_layers = scan_layers
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
        return {name: jnp.concatenate([p[name] for p in per_layer]) for name in per_layer[0]}

    def lm_head(self) -> Array:
        """[V, D] output projection (the embedding when tied); contract over D, never transpose."""
        return self.embed[...] if self.cfg.tie_embeddings else self.lm_head_weight[...]

    def packed_projections(self) -> tuple[dict[str, Array], ...]:
        """Per layer, the projection weights in the layout of pf_jax.kernels.matmul_packed (its AMX path
        on CPU): "qkv" (q, k and v side by side: one product), "o", "gate_up" (gate and up side by side)
        and "down". For a decode loop on CPU: pack once before the loop, pass to every step (`packed`).
        A copy of the layers' projection weights. Unrolled layers only (scan_layers=False)."""
        if self.scan_layers:
            raise ValueError("packed_projections needs unrolled layers (with_layer_layout(model, scan_layers=False))")
        packed = []
        for layer in self.layers:
            p = {name: w[0].astype(self.dtype) for name, w in layer.arrays().items()}
            d = self.cfg.hidden_size
            packed.append({
                "qkv": pack_nn(*(p[n].reshape(d, -1) for n in ("q", "k", "v"))),
                "o": pack_nn(p["o"].reshape(-1, d)),
                "gate_up": pack_nn(p["gate"], p["up"]),
                "down": pack_nn(p["down"]),
            })
        return tuple(packed)

    def logits(self, hidden: Array, *, one_device: bool = False) -> Array:
        """[B, T, V] float32 logits, soft-capped (c tanh(z / c)) where configured. Small vocab / last step only.

        one_device: the arrays are on one device, so the head may take pf_jax.kernels.matmul_nt (faster on
        CPU for a few rows: decode steps)."""
        head = self.lm_head().astype(hidden.dtype)
        if one_device:
            z = matmul_nt(hidden, head)
        else:
            z = jnp.einsum("btd,vd->btv", hidden, head, preferred_element_type=jnp.float32)
        cap = self.cfg.final_logit_softcap
        return z if cap is None else jnp.tanh(z / cap) * cap

    def __call__(self, tokens: Array, positions: Array, attention_mask: Array | None = None,
                 cache: KVCache | None = None, *, one_device: bool = False,
                 packed: tuple[dict[str, Array], ...] | None = None) -> tuple[Array, KVCache | None]:
        """tokens, positions: int [B, T]; attention_mask: bool [B, T] (False = padding).

        Without a cache, token t attends to tokens s <= t that are not padding. With a cache, the T new
        tokens are written at slots [index, index + T) and attend to all valid slots up to their own.
        Sliding layers additionally require position(q) - position(k) < sliding_window.
        one_device: the arrays are on one device, so the projections may take pf_jax.kernels.matmul_nn
        (faster on CPU for a few rows: decode steps).
        packed: the layers' projections from `packed_projections()` (weights on one CPU device, unrolled
        layers): they take pf_jax.kernels.matmul_packed instead; same result up to float32 rounding.
        Returns the final-normed hidden states [B, T, D] and the updated cache (or None).
        """
        cfg = self.cfg
        b, t = tokens.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        positions = positions.astype(jnp.int32)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
        x = constrain(x, EMBED_LAYOUT)

        if cache is None:
            index, k_valid, k_positions = 0, mask, positions
            kv_slots = jnp.arange(t)
        else:
            index = cache.index
            k_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
            k_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, index))
            kv_slots = jnp.arange(cache.max_len)
        q_slots = index + jnp.arange(t)
        causal = k_valid[:, None, :] & (kv_slots[None, None, :] <= q_slots[None, :, None])  # [B, T, S]
        distance = positions[:, :, None] - k_positions[:, None, :]  # [B, T, S]

        inv_freq = np.array([rope_inverse_frequencies(cfg, sliding=s) for s in cfg.is_sliding], np.float32)
        windows = np.array([cfg.sliding_window if s else NO_WINDOW for s in cfg.is_sliding], np.int32)

        def dense(spec: str, x: Array, w: Array, in_dims: int = 1) -> Array:
            return matmul_nn(x, w, in_dims) if one_device else jnp.einsum(spec, x, w)

        def block(carry, layer):
            x, k_all, v_all = carry
            p, inv_freq_l, window, layer_index, pk = layer
            p = {name: w.astype(self.dtype) for name, w in p.items()}
            norm = lambda y, w: rms_norm(y, w, eps=cfg.rms_norm_eps, offset=cfg.norm_weight_offset)

            h = constrain(norm(x, p["attn_norm"]), EMBED_LAYOUT)
            if pk is None:
                q = dense("btd,dhk->bthk", h, p["q"])
                k = dense("btd,dhk->bthk", h, p["k"])
                v = dense("btd,dhk->bthk", h, p["v"])
            else:
                widths = [math.prod(p[n].shape[1:]) for n in ("q", "k", "v")]
                qkv = matmul_packed(h, pk["qkv"], sum(widths))
                q, k, v = (part.reshape(b, t, *p[n].shape[1:]) for part, n in
                           zip(jnp.split(qkv, np.cumsum(widths)[:-1], axis=-1), ("q", "k", "v")))
            if cfg.attention_bias:
                q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
            if cfg.qk_norm:
                q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
            q, k = apply_rope(q, positions, inv_freq_l), apply_rope(k, positions, inv_freq_l)
            allowed = causal & (distance < window)
            if k_all is None:
                a = attention(q, k, v, allowed, scale=cfg.attention_scale)
            else:
                k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (layer_index, 0, index, 0, 0))
                v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (layer_index, 0, index, 0, 0))

                def sliced_attention(q=q, k_all=k_all, v_all=v_all, allowed=allowed, layer_index=layer_index):
                    k = jax.lax.dynamic_index_in_dim(k_all, layer_index, 0, keepdims=False).astype(self.dtype)
                    v = jax.lax.dynamic_index_in_dim(v_all, layer_index, 0, keepdims=False).astype(self.dtype)
                    return attention(q, k, v, allowed, scale=cfg.attention_scale)

                a = (decode_attention(q, k_all, v_all, allowed, layer_index, cfg.attention_scale, sliced_attention)
                     if one_device else sliced_attention())
            if pk is None:
                a = dense("bthk,hkd->btd", a, p["o"], in_dims=2)
            else:
                a = matmul_packed(a.reshape(b, t, -1), pk["o"], cfg.hidden_size)
            x = x + (norm(a, p["post_attn_norm"]) if cfg.sandwich_norm else a)

            h = constrain(norm(x, p["mlp_norm"]), EMBED_LAYOUT)
            if pk is None:
                gate, up = dense("btd,df->btf", h, p["gate"]), dense("btd,df->btf", h, p["up"])
            else:
                gate, up = jnp.split(matmul_packed(h, pk["gate_up"], 2 * cfg.intermediate_size), 2, axis=-1)
            gate = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
            hidden = constrain(gate * up, MLP_LAYOUT)
            m = dense("btf,fd->btd", hidden, p["down"]) if pk is None else matmul_packed(hidden, pk["down"], cfg.hidden_size)
            x = x + (norm(m, p["post_mlp_norm"]) if cfg.sandwich_norm else m)
            return (x, k_all, v_all), None

        if self.remat:
            block = jax.checkpoint(block)
        carry = (x, None, None) if cache is None else (x, cache.k, cache.v)
        if self.scan_layers:
            if packed is not None:
                raise ValueError("packed projections need unrolled layers")
            xs = (self.layers.arrays(), inv_freq, windows, np.arange(cfg.num_layers, dtype=np.int32), None)
            carry, _ = jax.lax.scan(block, carry, xs)
        else:
            for i, layer in enumerate(self.layers):
                params = {name: w[0] for name, w in layer.arrays().items()}
                carry, _ = block(carry, (params, inv_freq[i], windows[i], i, None if packed is None else packed[i]))
        x, k_all, v_all = carry
        x = rms_norm(x, self.final_norm[...], eps=cfg.rms_norm_eps, offset=cfg.norm_weight_offset)
        x = constrain(x, EMBED_LAYOUT)
        if cache is None:
            return x, None
        return x, KVCache(k=k_all, v=v_all, valid=k_valid, positions=k_positions, index=index + t)


def with_layer_layout(model: Decoder, *, scan_layers: bool) -> Decoder:
    """The same model (same parameter values, dtypes, remat) with stacked (scan) or per-layer (unrolled)
    layer storage; e.g. train scanned, then decode unrolled on CPU."""
    new = nnx.eval_shape(lambda: Decoder(model.cfg, rngs=nnx.Rngs(0), dtype=model.dtype,
                                         param_dtype=model.param_dtype, remat=model.remat,
                                         scan_layers=scan_layers))
    new.embed.set_value(model.embed[...])
    new.final_norm.set_value(model.final_norm[...])
    if not model.cfg.tie_embeddings:
        new.lm_head_weight.set_value(model.lm_head_weight[...])
    for name, stacked in model.stacked_layer_arrays().items():
        if scan_layers:
            getattr(new.layers, name).set_value(stacked)
        else:
            for i, layer in enumerate(new.layers):
                getattr(layer, name).set_value(stacked[i : i + 1])
    return new
