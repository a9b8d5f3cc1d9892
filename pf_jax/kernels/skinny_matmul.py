"""Matmuls of a handful of rows against large float32 weights: the decode step on CPU.

At a decode step every weight multiplies B rows (B = rows being sampled, 1-64). XLA:CPU's dot (YNNPACK)
streams a weight at the machine's bandwidth for B = 1 but reaches only 80-125 GFLOP/s at B = 16 on the
2-core benchmark machine (FMA peak ~220): the output head, [16, 640] x [262144, 640]^T over Gemma 3's
671 MB embedding, takes 45 ms, the layers' projections ~40 ms, of a ~100 ms step. `skinny_matmul.cc`
holds AVX-512 XLA FFI kernels that stream each weight once with the rows' partial sums in registers:
- matmul_nt: x . w^T for w stored [N, K] (the head: the embedding), 37 ms for that head; for 12-32 and
  48-64 rows, on CPUs with AMX (Sapphire Rapids and later), on bf16 tiles with the float32 operands split
  exactly into three bf16 pieces each (eight of the nine piece products: float32's error), 1.1-1.4x the
  FMA path;
- matmul_nn: x . w for w stored [K, N] (the projections, [in, out]), 1.4-1.7x XLA's dot at B = 16 (the
  same AMX scheme over 16-column blocks of w in place was measured 0.8-0.9x of it, and is not used);
- pack_nn + matmul_packed: the projections on AMX tiles for 12-32 rows, with w repacked once per set of
  weights into 16-column blocks that are each one contiguous stream (pf_jax.sampling.sampler.decode_packing;
  q | k | v and gate | up packed side by side, one product each): 0.55-0.9x matmul_nn's time per
  projection with the weights coming from memory, 1.10x the whole batch-16 sampler.
The same library holds the decode-attention kernel (pf_jax.kernels.attention).

They are compiled on first use with the system C++ compiler against the FFI headers that ship with
jaxlib, cached in a per-user directory under $PF_JAX_CACHE (default ~/.cache/pf_jax; see
kernels/library_cache.py: a cache others can write is never loaded from), and registered for the CPU
platform only. matmul_nt and matmul_nn fall back to XLA's dot (same result up to float32 rounding) where
a kernel does not apply: not on CPU, not float32, too few or too many rows, no AVX-512, no compiler or an
untrusted cache (logged once), or PF_JAX_CPU_KERNELS=0; the AMX paths are skipped where the CPU or the OS does not offer them, or
with PF_JAX_AMX=0 (packing_pays is then False, and the sampler keeps matmul_nn). The kernels have no
sharding rule, so callers use them only for arrays on one device (the sampler: RowLayout.one_device)."""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from pf_jax.kernels.library_cache import KernelBuildError, UntrustedCacheError, load_library

log = logging.getLogger(__name__)

TARGET = "pf_skinny_matmul_nt"  # x [M, K] . w [N, K]^T (the output head, w = the [V, D] embedding)
TARGET_NN = "pf_skinny_matmul_nn"  # x [M, K] . w [K, N] (the layers' projections, stored [in, out])
TARGET_PACK = "pf_pack_nn"  # w [K, N] -> [N/16, K/2, 16, 2]: the projections' layout for the AMX path
TARGET_PACKED = "pf_packed_matmul_nn"  # x [M, K] . w (packed) on AMX tiles
TARGET_ATTENTION = "pf_decode_attention"  # one decode step's attention on the stacked KV cache (attention.py)
MAX_ROWS = 64  # above this XLA's dot is as fast (the weight is reused enough to be compute bound)
AMX_MIN_ROWS = 12  # the head's AMX path: 12-32 rows (one pass over w) and 48-64 (two); see amx_pays
PACKED_ROWS = (12, 32)  # the projections' AMX path (matmul_packed): see packing_pays
MIN_ROWS_NN = 2  # one row: XLA's [in, out] dot streams the weight as fast (measured 156-215 us vs 181-188)
SOURCE = Path(__file__).with_name("skinny_matmul.cc")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        lib = load_library(SOURCE)
    except (KernelBuildError, UntrustedCacheError, OSError) as e:
        log.warning("CPU skinny-matmul kernel unavailable, using XLA's dot: %s", e)
        return None
    lib.pf_skinny_matmul_amx_calls.restype = ctypes.c_int64
    return lib if lib.pf_skinny_matmul_supported() else None


@functools.cache
def amx_available() -> bool:
    """Whether the head kernel may use AMX tiles (the CPU has them, Linux granted them; not PF_JAX_AMX=0)."""
    if not available() or os.environ.get("PF_JAX_AMX", "1") == "0":
        return False
    return bool(_library().pf_skinny_matmul_enable_amx())


def amx_pays(rows: int) -> bool:
    """Whether the head's AMX path beats its FMA tiles for this many rows of x (head alone, interleaved, at
    [262144, 640]): 8 rows even, 12 1.1x, 16 1.3x, 24-32 1.4x; above 32 it streams w once per 32 rows:
    33-40 rows even or worse, 48 1.1x, 64 1.2x."""
    return AMX_MIN_ROWS <= rows <= 32 or 48 <= rows <= MAX_ROWS


def amx_calls() -> int:
    """How many head-kernel calls have taken the AMX path in this process."""
    lib = _library()
    return int(lib.pf_skinny_matmul_amx_calls()) if lib is not None else 0


@functools.cache
def available() -> bool:
    """Whether the kernel is registered for the CPU platform (building it on the first call)."""
    lib = None if os.environ.get("PF_JAX_CPU_KERNELS", "1") == "0" else _library()
    if lib is None:
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PfSkinnyMatmulNT), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_NN, jax.ffi.pycapsule(lib.PfSkinnyMatmulNN), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_PACK, jax.ffi.pycapsule(lib.PfPackNN), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_PACKED, jax.ffi.pycapsule(lib.PfPackedMatmulNN), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_ATTENTION, jax.ffi.pycapsule(lib.PfDecodeAttention), platform="cpu")
    return True


def applies(x: Array, w: Array, in_dims: int = 1, min_rows: int = 1) -> bool:
    """Whether x (contracted over its last in_dims dims) and w can take a kernel on CPU (by shapes and
    dtypes; trace-time static)."""
    contracted = math.prod(x.shape[x.ndim - in_dims:])
    rows = x.size // contracted if contracted else 0
    return x.dtype == jnp.float32 and w.dtype == jnp.float32 and min_rows <= rows <= MAX_ROWS and available()


def matmul_nt(x: Array, w: Array, amx: bool = True) -> Array:
    """float32 x [..., K] . w [N, K]^T -> [..., N]: the kernel on CPU where it applies, else XLA's dot.
    amx=False keeps the kernel off its AMX path (for comparisons).

    Single-device arrays only where the kernel may run (it has no sharding rule)."""
    dot = lambda x, w: jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)
    if w.ndim != 2 or not applies(x, w):
        return dot(x, w)

    def kernel(x, w):
        flat = x.reshape(-1, x.shape[-1])
        use_amx = amx and amx_pays(flat.shape[0]) and amx_available()
        out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((flat.shape[0], w.shape[0]), jnp.float32))(
            flat, w, amx=np.bool_(use_amx))
        return out.reshape(*x.shape[:-1], w.shape[0])

    return jax.lax.platform_dependent(x, w, cpu=kernel, default=dot)


def matmul_nn(x: Array, w: Array, in_dims: int = 1) -> Array:
    """x [..., *C] . w [*C, *O] -> [..., *O], contracting the last in_dims dims of x with the first
    in_dims of w (e.g. "btd,dhk->bthk": in_dims 1; "bthk,hkd->btd": in_dims 2): the kernel on CPU where
    it applies (float32, MIN_ROWS_NN..MAX_ROWS rows), else XLA's dot in the inputs' dtype (as einsum).

    Single-device arrays only where the kernel may run (it has no sharding rule)."""
    dot = lambda x, w: jax.lax.dot_general(x, w, ((tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims))),
                                                  ((), ())))
    if not applies(x, w, in_dims, min_rows=MIN_ROWS_NN):
        return dot(x, w)
    lead, out_dims = x.shape[: x.ndim - in_dims], w.shape[in_dims:]
    k, n = math.prod(w.shape[:in_dims]), math.prod(out_dims)

    def kernel(x, w):
        flat = x.reshape(-1, k)
        out = jax.ffi.ffi_call(TARGET_NN, jax.ShapeDtypeStruct((flat.shape[0], n), jnp.float32))(flat, w.reshape(k, n))
        return out.reshape(*lead, *out_dims)

    return jax.lax.platform_dependent(x, w, cpu=kernel, default=dot)


def packing_pays(rows: int) -> bool:
    """Whether a decode loop of this many rows should pack the projections for matmul_packed (AMX tiles).
    Measured per projection with the weights coming from memory, against matmul_nn: 0.9x its time at 12
    rows, 0.55-0.7x at 32; two passes over w (48-64 rows) even or 0.9x, which does not repay the packing."""
    return PACKED_ROWS[0] <= rows <= PACKED_ROWS[1] and amx_available()


def packed_shape(k: int, n: int) -> tuple[int, int, int, int]:
    """The shape of w [k, n] packed: [ceil(n / 16), ceil(k / 32) * 16, 16, 2] (16-column blocks, each a run of
    K-pairs: the AMX B-tile order)."""
    return (-(-n // 16), -(-k // 32) * 16, 16, 2)


def pack_nn(*ws: Array) -> Array:
    """float32 weights [K, N_i] -> their concatenation [K, sum N_i] in the packed layout of matmul_packed
    (zeros in the padding), by the CPU kernel: several projections of one input (q, k, v) become one
    product without a concatenated copy.

    CPU only, and only where available() (the caller's check: packing_pays)."""
    if not ws or any(w.ndim != 2 or w.dtype != jnp.float32 or w.shape[0] != ws[0].shape[0] for w in ws):
        raise ValueError(f"pack_nn: expected float32 [K, N_i] weights with one K, got "
                         f"{[(str(w.dtype), w.shape) for w in ws]}")
    shape = packed_shape(ws[0].shape[0], sum(w.shape[1] for w in ws))
    return jax.ffi.ffi_call(TARGET_PACK, jax.ShapeDtypeStruct(shape, jnp.float32))(*ws)


def matmul_packed(x: Array, packed: Array, n: int) -> Array:
    """float32 x [..., K] . w [K, n] -> [..., n], with w given as pack_nn(w): on AMX tiles, float32-exact as
    matmul_nt's AMX path (eight of the nine bf16 piece products).

    CPU only, and only where packing_pays(rows of x) (AMX enabled in this process)."""
    k = x.shape[-1]
    if packed.shape != packed_shape(k, n) or x.dtype != jnp.float32:
        raise ValueError(f"matmul_packed: x {x.dtype} {x.shape} and packed {packed.shape} do not hold a "
                         f"float32 [{k}, {n}] weight (expected {packed_shape(k, n)})")
    flat = x.reshape(-1, k)
    out = jax.ffi.ffi_call(TARGET_PACKED, jax.ShapeDtypeStruct((flat.shape[0], n), jnp.float32))(flat, packed)
    return out.reshape(*x.shape[:-1], n)
