"""How the decoder computes its projections, attention and output head, chosen once per program.

The decoder body calls only the methods of one of these objects; which kernel runs is the object's
business, decided by `select_ops` (the one place that looks at the platform) and, inside each object, by
static shapes:

    XlaOps        every platform: einsum projections and head, the einsum attention below (float32
                  logits [B, KVH, G, T, S]: memory quadratic in the sequence length)
    SplashOps     TPU: splash attention (Pallas, pf_jax.models.splash) for self-attention over the new
                  tokens (training, scoring, the prefill of an empty cache), where its shapes apply
    CudnnOps      GPU: jax.nn.dot_product_attention with the cuDNN kernel (bf16 / fp16), same places
    CpuDecodeOps  CPU with every weight on one device (the sampler's decode loop): pf_jax.kernels'
                  AVX-512 / AMX matmuls and the decode attention that reads the stacked KV cache in
                  place; carries the AMX-packed projections (a pytree leaf) when the caller packed them

Every object is a flax struct dataclass: static fields are part of the compiled program's cache key, array
fields (CpuDecodeOps.packed) are jit arguments. A Decoder holds the program-wide choice (`Decoder.ops`,
static); a call may pass another (the sampler's decode step does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax import Array
from jax.sharding import Mesh

from pf_jax.kernels import matmul_nn, matmul_nt, matmul_packed, pack_nn
from pf_jax.kernels.attention import decode_attention
from pf_jax.models.paged import gather_rows
from pf_jax.models.quantized import compute_array
from pf_jax.sharding.mesh import DEFAULT_RULES

Layer = dict[str, Array]  # one layer's weights by name (q, k, v, o, gate, up, down, ...), compute dtype


def attention(q: Array, k: Array, v: Array, allowed: Array, *, scale: float, softcap: float | None = None) -> Array:
    """Grouped-query attention: out = softmax(scale * q k^T, masked) v (Vaswani et al. 2017; GQA,
    Ainslie et al. 2023); with softcap c the logits are c tanh(logits / c) first (Gemma 2).

    q: [B, T, H, Dh]; k, v: [B, S, KVH, Dh]; allowed: bool [B, T, S]. Logits and softmax in float32.
    A query with no allowed key (a padding query) gets a uniform average instead of NaN.
    """
    b, t, h, dh = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)


@struct.dataclass
class AttentionMask:
    """Which keys each query of one forward pass may see, for every layer at once.

    A key is allowed iff its slot holds a token, its slot is not after the query's, and (sliding layers)
    position(q) - position(k) < window. `causal` holds the first two, `distance` the positions'
    difference; `segment_ids` [B, T] (1, 2, ... = the example a token belongs to in a packed row, else 1 for
    every token; 0 = padding) describes the same mask for the new tokens
    alone, as kernels that build the causal part themselves want it (valid when a row's tokens are
    contiguous, as left-padded prompts and right-padded responses are); `windows` are the model's
    distinct window sizes (static), so a kernel can pick its mask for a traced per-layer window.
    """

    causal: Array  # bool [B, T, S]
    distance: Array  # int32 [B, T, S]
    segment_ids: Array  # int32 [B, T]
    windows: tuple[int, ...] = struct.field(pytree_node=False, default=())

    def allowed(self, window: Array | int) -> Array:
        return self.causal & (self.distance < window)


@struct.dataclass
class XlaOps:
    """The portable implementation: plain einsums, attention by `attention` above. `no_window` is the
    window value of a full-attention layer (larger than any sequence)."""

    no_window: int = struct.field(pytree_node=False, default=2**30)

    def on_mesh(self, mesh: Mesh | None) -> XlaOps:
        """The same implementation for a program whose arrays live on `mesh` (None: one device)."""
        return self

    def project(self, spec: str, x: Array, w: Array, in_dims: int = 1) -> Array:
        return jnp.einsum(spec, x, w)

    def qkv(self, h: Array, p: Layer, layer: int | Array) -> tuple[Array, Array, Array]:
        return tuple(self.project("btd,dhk->bthk", h, p[n]) for n in ("q", "k", "v"))

    def out(self, a: Array, p: Layer, layer: int | Array) -> Array:
        return self.project("bthk,hkd->btd", a, p["o"], in_dims=2)

    def gate_up(self, h: Array, p: Layer, layer: int | Array) -> tuple[Array, Array]:
        return self.project("btd,df->btf", h, p["gate"]), self.project("btd,df->btf", h, p["up"])

    def down(self, x: Array, p: Layer, layer: int | Array) -> Array:
        return self.project("btf,fd->btd", x, p["down"])

    def head(self, hidden: Array, w: Array) -> Array:
        """[B, T, D] x [V, D] -> float32 [B, T, V] logits (contracting D, never transposing w)."""
        return jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)

    def self_attention(self, q: Array, k: Array, v: Array, mask: AttentionMask, window: Array | int, *,
                       scale: float, softcap: float | None) -> Array:
        """The T new tokens attending to each other (no cache): q [B, T, H, Dh], k, v [B, T, KVH, Dh]."""
        return attention(q, k, v, mask.allowed(window), scale=scale, softcap=softcap)

    def cached_attention(self, q: Array, k: Array, v: Array, k_all: Array, v_all: Array, layer: Array | int,
                         mask: AttentionMask, window: Array | int, *, fresh: bool, scale: float,
                         softcap: float | None) -> Array:
        """The T new tokens (q, k, v) attending to every valid slot of layer `layer` of the cache k_all,
        v_all [L, B, S, KVH, Dh], which already holds them. fresh: the cache held nothing before them
        (Decoder(..., prefill=True)), so attending to the new tokens alone is the same attention."""
        k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(q.dtype)
        v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(q.dtype)
        return attention(q, k, v, mask.allowed(window), scale=scale, softcap=softcap)

    def paged_attention(self, q: Array, k_pool: Array, v_pool: Array, layer: Array | int, pages: Array,
                        lengths: Array, mask: AttentionMask, window: Array | int, *, scale: float,
                        softcap: float | None) -> Array:
        """The T new tokens attending to their rows' first `lengths` slots (which hold them) in layer `layer`
        of the paged pools k_pool, v_pool [L, KVH, P, page_size, Dh] through the page tables `pages`
        [B, pages_per_row] (pf_jax.models.paged). Here: each row's pages gathered into a dense block."""
        k, v = (gather_rows(pool, layer, pages).astype(q.dtype) for pool in (k_pool, v_pool))
        return attention(q, k, v, mask.allowed(window), scale=scale, softcap=softcap)


def _rule_items(rules: Mapping[str, Sequence[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple(sorted((name, tuple(axes)) for name, axes in rules.items()))


def _window_switch(mask: AttentionMask, window: Array | int, no_window: int, kernel) -> Array:
    """kernel(static window or None) for the layer's window, traced or not (lax.switch over the model's
    distinct windows: one kernel per window kind is compiled, e.g. Gemma 3's local and global layers)."""
    choices = mask.windows or (no_window,)
    static = lambda w: None if w >= no_window else int(w)
    if len(choices) == 1:
        return kernel(static(choices[0]))
    index = jnp.argmax(jnp.asarray(choices) == window)
    return jax.lax.switch(index, [lambda w=w: kernel(static(w)) for w in choices])


@struct.dataclass
class FusedSelfAttention(XlaOps):
    """Base of the implementations whose kernel computes self-attention over the new tokens (`fused`):
    a prefill into an empty cache takes it too, on the new keys and values alone."""

    def fused(self, q: Array, k: Array, softcap: float | None) -> bool:
        raise NotImplementedError

    def cached_attention(self, q, k, v, k_all, v_all, layer, mask, window, *, fresh, scale, softcap):
        if fresh and q.shape[1] > 1 and self.fused(q, k, softcap):
            return self.self_attention(q, k, v, mask, window, scale=scale, softcap=softcap)
        return super().cached_attention(q, k, v, k_all, v_all, layer, mask, window, fresh=fresh, scale=scale,
                                        softcap=softcap)


@struct.dataclass
class SplashOps(FusedSelfAttention):
    """TPU: splash attention for self-attention over the new tokens where its shapes apply (see
    pf_jax.models.splash.splash_applies), the einsum elsewhere (decode steps, short sequences).

    mesh, rules: the program's device mesh and logical-axis rules (items, hashable): the kernel runs in a
    shard_map over them, each device on its rows, since a Pallas call has no partitioning rule. None: the
    enclosing pf_jax.sharding.mesh.activation_sharding's, else one device.
    interpret: run the Pallas kernels in interpret mode (on CPU, for tests)."""

    interpret: bool = struct.field(pytree_node=False, default=False)
    mesh: Mesh | None = struct.field(pytree_node=False, default=None)
    rules: tuple[tuple[str, tuple[str, ...]], ...] = struct.field(pytree_node=False, default=())

    def on_mesh(self, mesh):
        return self.replace(mesh=mesh, rules=self.rules or _rule_items(DEFAULT_RULES))

    def fused(self, q: Array, k: Array, softcap: float | None) -> bool:
        """Whether the kernel takes these shapes (static)."""
        from pf_jax.models.splash import splash_applies

        return splash_applies(q.shape[1], k.shape[1], q.shape[-1])

    def self_attention(self, q, k, v, mask, window, *, scale, softcap):
        from pf_jax.models.splash import splash_attention

        if not self.fused(q, k, softcap):
            return super().self_attention(q, k, v, mask, window, scale=scale, softcap=softcap)
        layout = None if self.mesh is None else (self.mesh, dict(self.rules))
        return _window_switch(mask, window, self.no_window, lambda w: splash_attention(
            q, k, v, mask.segment_ids, scale=scale, window=w, softcap=softcap, interpret=self.interpret,
            layout=layout))

    def paged_attention(self, q, k_pool, v_pool, layer, pages, lengths, mask, window, *, scale, softcap):
        """One decode token per row on one device: the Pallas paged-attention kernel
        (jax.experimental.pallas.ops.tpu.paged_attention; it computes in bfloat16) for the layers whose
        window cannot bind within a row's slots; the gathered reference for the rest (the kernel has no
        sliding window) and on a mesh (no partitioning rule for it yet)."""
        reference = lambda: super(SplashOps, self).paged_attention(q, k_pool, v_pool, layer, pages, lengths, mask,
                                                                   window, scale=scale, softcap=softcap)
        if q.shape[1] != 1 or self.mesh is not None:
            return reference()
        span = pages.shape[1] * k_pool.shape[3]
        kernel = lambda: paged_decode_kernel(q[:, 0] * scale, k_pool[layer], v_pool[layer], lengths, pages, softcap,
                                             interpret=self.interpret)[:, None]
        return _window_switch(mask, window, self.no_window,
                              lambda w: kernel() if w is None or w >= span else reference())



@struct.dataclass
class CudnnOps(FusedSelfAttention):
    """GPU: jax.nn.dot_product_attention with the cuDNN fused kernel for self-attention over the new
    tokens, where it applies (bf16 / fp16, no soft-cap); the einsum elsewhere. `implementation` may be
    "xla" to run the same call on CPU (tests)."""

    implementation: str = struct.field(pytree_node=False, default="cudnn")

    def fused(self, q: Array, k: Array, softcap: float | None) -> bool:
        """Whether the kernel takes these shapes and dtypes (static)."""
        return softcap is None and (self.implementation != "cudnn" or q.dtype in (jnp.bfloat16, jnp.float16))

    def self_attention(self, q, k, v, mask, window, *, scale, softcap):
        if not self.fused(q, k, softcap):
            return super().self_attention(q, k, v, mask, window, scale=scale, softcap=softcap)
        # Causal by index and the window in the kernel (a row's tokens are contiguous); a query sees the keys
        # of its own segment only, so padding queries see padding keys (at least themselves: no empty row).
        seg = mask.segment_ids
        keys = (seg[:, :, None] == seg[:, None, :])[:, None]
        return _window_switch(mask, window, self.no_window, lambda w: jax.nn.dot_product_attention(
            q, k, v, mask=keys, scale=scale, is_causal=True, implementation=self.implementation,
            local_window_size=None if w is None else (w - 1, 0)))



@struct.dataclass
class CpuDecodeOps(XlaOps):
    """CPU, every weight on one device: the projections take pf_jax.kernels.matmul_nn (or, with `packed`,
    matmul_packed on weights packed once by Decoder.packed_projections: q|k|v and gate|up one product
    each), the head matmul_nt, a one-token decode step's attention the in-place kernel. Each kernel falls
    back to XLA itself where its shapes or the CPU do not fit. `packed` needs unrolled layers."""

    packed: tuple[Layer, ...] | None = None

    def project(self, spec, x, w, in_dims=1):
        return matmul_nn(x, w, in_dims)

    def _packed(self, layer: int | Array) -> Layer | None:
        if self.packed is None:
            return None
        if not isinstance(layer, int):
            raise ValueError("packed projections need unrolled layers (a Python layer index)")
        return self.packed[layer]

    def qkv(self, h, p, layer):
        if (pk := self._packed(layer)) is None:
            return super().qkv(h, p, layer)
        shapes = [p[n].shape[1:] for n in ("q", "k", "v")]
        widths = [math.prod(s) for s in shapes]
        qkv = matmul_packed(h, pk["qkv"], sum(widths))
        parts = jnp.split(qkv, [widths[0], widths[0] + widths[1]], axis=-1)
        return tuple(part.reshape(*h.shape[:2], *shape) for part, shape in zip(parts, shapes))

    def out(self, a, p, layer):
        if (pk := self._packed(layer)) is None:
            return super().out(a, p, layer)
        return matmul_packed(a.reshape(*a.shape[:2], -1), pk["o"], p["o"].shape[-1])

    def gate_up(self, h, p, layer):
        if (pk := self._packed(layer)) is None:
            return super().gate_up(h, p, layer)
        return tuple(jnp.split(matmul_packed(h, pk["gate_up"], 2 * p["gate"].shape[-1]), 2, axis=-1))

    def down(self, x, p, layer):
        if (pk := self._packed(layer)) is None:
            return super().down(x, p, layer)
        return matmul_packed(x, pk["down"], p["down"].shape[-1])

    def head(self, hidden, w):
        return matmul_nt(hidden, w)

    def cached_attention(self, q, k, v, k_all, v_all, layer, mask, window, *, fresh, scale, softcap):
        reference = lambda: XlaOps.cached_attention(self, q, k, v, k_all, v_all, layer, mask, window, fresh=fresh,
                                                    scale=scale, softcap=softcap)
        if softcap is not None:
            return reference()
        return decode_attention(q, k_all, v_all, mask.allowed(window), layer, scale, reference)


def paged_decode_kernel(q: Array, k_pages: Array, v_pages: Array, lengths: Array, pages: Array,
                        softcap: float | None, *, interpret: bool = False) -> Array:
    """q [B, H, Dh] (already scaled) against k_pages, v_pages [KVH, P, page_size, Dh] through pages
    [B, pages_per_row] over each row's first `lengths` slots -> [B, H, Dh], by the Pallas TPU kernel (in
    Pallas' TPU interpreter with `interpret`, on any backend: for tests)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as kernel

    block = math.gcd(pages.shape[1], 8)  # pages per compute block: must divide the row's pages
    call = lambda: kernel(q, k_pages, v_pages, lengths, pages, attn_logits_soft_cap=softcap,
                          pages_per_compute_block=block).astype(q.dtype)
    if not interpret:
        return call()
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        return call()


def pack_projections(model) -> tuple[Layer, ...]:
    """Per layer of a Decoder with unrolled layers, its projection weights in the layout of
    pf_jax.kernels.matmul_packed (CpuDecodeOps.packed): "qkv" (q, k and v side by side: one product),
    "o", "gate_up" (gate and up side by side) and "down". A copy of the projection weights, made once
    before a decode loop on CPU and passed to every step."""
    if model.scan_layers:
        raise ValueError("packed projections need unrolled layers (with_layer_layout(model, scan_layers=False))")
    d, packed = model.cfg.hidden_size, []
    for layer in model.layers:
        p = {name: compute_array(w, model.dtype)[0] for name, w in layer.arrays().items()}
        packed.append({
            "qkv": pack_nn(*(p[n].reshape(d, -1) for n in ("q", "k", "v"))),
            "o": pack_nn(p["o"].reshape(-1, d)),
            "gate_up": pack_nn(p["gate"], p["up"]),
            "down": pack_nn(p["down"]),
        })
    return tuple(packed)


def select_ops(platform: str, *, mesh: Mesh | None = None, rules: Mapping[str, Sequence[str]] | None = None,
               one_device: bool = False, packed: tuple[Layer, ...] | None = None, interpret: bool = False) -> XlaOps:
    """The implementation for a program on `platform` (a jax.Device.platform: "cpu", "gpu"/"cuda", "tpu";
    anything else gets the portable XlaOps).

    mesh, rules: the program's mesh and logical-axis rules, for kernels that run per device (splash).
    one_device: every weight of the program is on one device (per-device kernels without a sharding rule
    may run: the CPU decode kernels); packed: the projections packed for them (CPU only).
    interpret: TPU kernels in Pallas interpret mode (to run them on CPU in tests).
    """
    if platform == "tpu":
        return SplashOps(interpret=interpret, mesh=mesh, rules=_rule_items(rules or DEFAULT_RULES))
    if platform in ("gpu", "cuda"):
        return CudnnOps()
    if platform == "cpu" and one_device:
        return CpuDecodeOps(packed=packed)
    return XlaOps()
