"""Causal self-attention with JAX's Pallas TPU splash attention kernel (block-sparse flash attention).

Same result as pf_jax.models.decoder.attention on a row's real tokens, without materialising the
[B, H, T, T] logits: the kernel walks (block_q, block_kv) tiles, skips the tiles the causal / sliding
window mask rules out, and keeps an online softmax in float32. Padding is expressed as segment ids
(1 = token, 0 = padding), so a row left-padded and right-padded in any amount needs no per-row mask:
real tokens are contiguous, hence "key slot <= query slot and q_index - k_index < window" among them is
the decoder's position rule. Padding queries attend to padding keys only; their outputs are not the
decoder's (which averages every key) and must be ignored, as the decoder's are.

Under pf_jax.sharding.mesh.activation_sharding the kernel runs inside jax.shard_map, each device on its
batch rows (and head slice when q and kv heads split the same mesh axes); a Pallas call has no SPMD
partitioning rule, so without shard_map XLA would gather the whole batch onto every device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import Mesh, PartitionSpec

from pf_jax.sharding.mesh import Rules, activation_layout, logical_to_spec

LANES = 128  # TPU vector lane count: splash's sequence blocks are multiples of it
BLOCK_SIZES = (512, 256, 128)  # largest first; the first that divides the sequence is used for every block
Q_LAYOUT = ("batch", "length", "heads", "head_dim")
KV_LAYOUT = ("batch", "length", "kv_heads", "head_dim")


def splash_applies(q_len: int, kv_len: int, head_dim: int) -> bool:
    """Static shape check: True when splash attention can run these shapes: self-attention
    (q_len == kv_len; the prefill / training case, not cached decoding), q_len a multiple of 128 (the
    kernel's block granularity) and head_dim a multiple of 128 (the sizes JAX's own splash tests cover;
    64, 80 and 192 do compile for v5e and match in the interpreter, but fill only part of the lanes and
    are not tested upstream)."""
    return q_len == kv_len and q_len > 0 and q_len % LANES == 0 and head_dim > 0 and head_dim % LANES == 0


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, scale: float,
                     window: int | None = None, softcap: float | None = None, interpret: bool = False,
                     layout: tuple[Mesh, Rules] | None = None) -> Array:
    """Causal self-attention over T tokens (Dao et al. 2022 flash attention, block-sparse):

        logits[h, i, j] = c tanh(scale q_i . k_j / c)   (c = softcap; without it, scale q_i . k_j)
        allowed[i, j]   = seg_i == seg_j and j <= i and i - j < window
        out[i, h]       = sum_j softmax_j(logits[h, i, :] where allowed) v_j[h // (H / KVH)]

    q: [B, T, H, Dh]; k, v: [B, T, KVH, Dh] (H a multiple of KVH: grouped-query attention, query head h
    reads kv head h // (H / KVH)); segment_ids: int [B, T], 1 = token, 0 = padding. window: sliding
    window, None = global. Returns [B, T, H, Dh] in q.dtype. `interpret` runs the kernel in Pallas'
    interpreter (any backend, slow): for CPU tests. layout: the (mesh, logical-axis rules) to run it on, one
    shard_map task per device (default: the enclosing activation_sharding's, else unsharded).
    """
    _check_inputs(q, k, v, segment_ids)
    window = _static_window(window, q.shape[1])
    softcap = None if softcap is None else float(softcap)
    # splash does not scale; scaling q first in float32 equals scaling the float32 logits up to q's rounding
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    segment_ids = segment_ids.astype(jnp.int32)
    attend = functools.partial(_attend, window=window, softcap=softcap, interpret=interpret)
    layout = layout or activation_layout()
    if layout is None:
        return attend(q, k, v, segment_ids)
    q_spec, kv_spec, ids_spec = _shard_specs(q.shape, k.shape, *layout)
    return jax.shard_map(attend, mesh=layout[0], in_specs=(q_spec, kv_spec, kv_spec, ids_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


def _attend(q: Array, k: Array, v: Array, segment_ids: Array, *, window: int | None, softcap: float | None,
            interpret: bool) -> Array:
    """The kernel on this device's rows: heads-major [H, T, Dh] per row, vmapped over the batch."""
    kernel = _kernel(q.shape[2], q.shape[1], window, softcap, interpret)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, Dh] <-> [B, H, T, Dh]
    ids = splash_kernel.SegmentIds(q=segment_ids, kv=segment_ids)
    out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v), ids)
    return heads_major(out)


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, length: int, window: int | None, softcap: float | None,
            interpret: bool) -> splash_kernel.SplashAttentionKernel:
    """The splash kernel for `heads` query heads over `length` tokens, one mask shared by all heads.

    Built eagerly (ensure_compile_time_eval) and its block-sparsity tables kept as numpy, so the cached
    kernel holds no tracer of the trace that first asked for it and no array committed to a device.
    """
    block = _block_size(length)
    sizes = splash_kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    mask = splash_mask.MultiHeadMask(masks=(_causal_mask(length, window),) * heads)
    with jax.ensure_compile_time_eval():
        kernel = splash_kernel.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
            interpret=interpret,
        )
    return jax.tree_util.tree_map(np.asarray, kernel)


def _causal_mask(length: int, window: int | None) -> splash_mask.Mask:
    """allowed[i, j] = j <= i (and i - j < window, i.e. j >= i - (window - 1)); computed in the kernel."""
    if window is None:
        return splash_mask.CausalMask((length, length))
    return splash_mask.LocalMask((length, length), window_size=(window - 1, 0), offset=0)


def _block_size(length: int) -> int:
    return next(b for b in BLOCK_SIZES if length % b == 0)


def _static_window(window: int | None, length: int) -> int | None:
    """A Python int window < length, or None when it masks nothing (None, or >= length, e.g. NO_WINDOW)."""
    if window is None:
        return None
    if not isinstance(window, int | np.integer):
        raise TypeError(
            f"splash_attention needs a static sliding window (a Python int or None), got {type(window).__name__}; "
            "a per-layer window traced through lax.scan cannot select the kernel's block-sparse mask"
        )
    if window < 1:
        raise ValueError(f"splash_attention window must be >= 1 (or None for global attention), got {window}")
    return None if window >= length else int(window)


def _check_inputs(q: Array, k: Array, v: Array, segment_ids: Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"splash_attention expects q [B, T, H, Dh] and k, v [B, T, KVH, Dh] of one shape; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    (b, t, h, dh), (kb, kt, kvh, kdh) = q.shape, k.shape
    if (kb, kt, kdh) != (b, t, dh) or h % kvh:
        raise ValueError(
            f"splash_attention is self-attention with grouped heads: k, v must be [{b}, {t}, KVH, {dh}] with "
            f"KVH dividing the {h} query heads; got q {q.shape}, k {k.shape}"
        )
    if segment_ids.shape != (b, t):
        raise ValueError(f"splash_attention segment_ids must be [B, T] = [{b}, {t}], got {segment_ids.shape}")
    if not splash_applies(t, kt, dh):
        raise ValueError(
            f"splash_attention needs T and head_dim multiples of {LANES}; got T={t}, head_dim={dh} "
            "(check splash_applies first and fall back to decoder.attention)"
        )


def _shard_specs(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], mesh: Mesh,
                 rules: Rules) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
    """shard_map specs (q/out, k and v, segment ids): batch split by the rules, length and head_dim whole
    (the kernel needs every key of a row), heads split only when q and kv heads split the same mesh axes
    (so each device holds whole GQA groups); otherwise heads are replicated."""
    mesh_shape = dict(mesh.shape)
    q_axes = _entries(logical_to_spec(Q_LAYOUT, q_shape, mesh_shape, rules))
    kv_axes = _entries(logical_to_spec(KV_LAYOUT, kv_shape, mesh_shape, rules))
    batch = q_axes[0]
    heads = q_axes[2] if q_axes[2] == kv_axes[2] else None
    return PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, heads, None), PartitionSpec(batch)


def _entries(spec: PartitionSpec) -> tuple:
    """A 4-dim PartitionSpec's entries, with the trailing Nones logical_to_spec drops restored."""
    return (*spec, *(None,) * (4 - len(spec)))
