"""One decode step's attention on CPU, reading the layer's keys and values in place in the stacked KV cache.

XLA on CPU slices the layer's [B, S, KVH, Dh] keys and values out of the [L, B, S, KVH, Dh] cache at every
step (a copy of both: ~85 MB a step for Gemma 3 270M at batch 16 and 144 slots) before two small batched
dots. The kernel (skinny_matmul.cc: DecodeAttention) reads them where they are, one (row, kv head) per
task: the dots with AVX-512 FMAs, the softmax in float32 with the same masking as
pf_jax.models.decoder.attention. Elsewhere (not CPU, not float32, more than one query token, more than 8
query heads per kv head, no kernel) the caller's XLA path runs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from pf_jax.kernels.skinny_matmul import TARGET_ATTENTION, available

MAX_GROUP = 8  # query heads per kv head (the kernel's register budget)


def applies(q: Array, k_all: Array) -> bool:
    """Whether a decode step's q [B, 1, H, Dh] against a cache k_all [L, B, S, KVH, Dh] can take the kernel
    (by shapes and dtypes; trace-time static)."""
    return (q.ndim == 4 and q.shape[1] == 1 and k_all.ndim == 5 and q.dtype == jnp.float32
            and k_all.dtype == jnp.float32 and q.shape[2] % k_all.shape[3] == 0
            and q.shape[2] // k_all.shape[3] <= MAX_GROUP and available())


def decode_attention(q: Array, k_all: Array, v_all: Array, allowed: Array, layer: Array | int, scale: float,
                     reference: Callable[[], Array]) -> Array:
    """q [B, 1, H, Dh] attending to layer `layer` of the caches k_all, v_all [L, B, S, KVH, Dh] over the
    slots allowed [B, 1, S] -> [B, 1, H, Dh]: the kernel on CPU where it applies, else reference() (the
    same attention in XLA). Single-device arrays only where the kernel may run (no sharding rule)."""
    if not applies(q, k_all):
        return reference()

    def kernel():
        out = jax.ffi.ffi_call(TARGET_ATTENTION, jax.ShapeDtypeStruct(q[:, 0].shape, jnp.float32))(
            q[:, 0], k_all, v_all, allowed[:, 0], jnp.asarray(layer, jnp.int32), scale=np.float32(scale))
        return out[:, None]

    return jax.lax.platform_dependent(cpu=kernel, default=reference)
