"""x . w^T for a handful of rows against a large [N, K] weight: the output head of a decode step.

At a decode step the head multiplies [B, D] hidden states (B = rows being sampled, 1-64) by the [V, D]
embedding (Gemma 3: 262144 x 640, 671 MB in float32). XLA:CPU's dot (YNNPACK) reads the weight at the
machine's bandwidth at B = 1 but reaches only ~115 GFLOP/s at B = 16 (47 ms on the 2-core benchmark
machine, 45% of the step). `skinny_matmul.cc` is an AVX-512 XLA FFI kernel that streams the weight once
with every row of x in registers, ~38 ms there (see benchmarks/bench_sampler.py for the whole step).

It is compiled on first use with the system C++ compiler against the FFI headers that ship with jaxlib,
cached under $PF_JAX_CACHE (default ~/.cache/pf_jax)/kernels, and registered for the CPU platform only.
`matmul_nt` falls back to an XLA einsum (same result up to float32 rounding) when the kernel does not
apply: not on CPU, not float32, more than MAX_ROWS rows, no AVX-512, no compiler (logged once), or
PF_JAX_CPU_KERNELS=0. The kernel has no sharding rule, so callers use it only for arrays on one device.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import Array

log = logging.getLogger(__name__)

TARGET = "pf_skinny_matmul_nt"
MAX_ROWS = 64  # above this XLA's dot is as fast (the weight is reused enough to be compute bound)
SOURCE = Path(__file__).with_name("skinny_matmul.cc")


class KernelBuildError(RuntimeError):
    """The C++ compiler failed on the kernel source (the message holds its output)."""


def cache_dir() -> Path:
    return Path(os.environ.get("PF_JAX_CACHE", Path.home() / ".cache" / "pf_jax")) / "kernels"


def build(source: Path = SOURCE) -> Path:
    """Compile `source` into a shared library (once per source, jaxlib and compiler; cached) and return
    its path. Raises KernelBuildError with the compiler's output when compilation fails."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (set CXX or install g++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join([source.read_bytes(), jax.__version__.encode(), compiler.encode()]))
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # compile aside, then rename: atomic
        out = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", f"-I{include}", str(source), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        os.replace(out, target)
    return target


@functools.cache
def available() -> bool:
    """Whether the kernel is registered for the CPU platform (building it on the first call)."""
    if os.environ.get("PF_JAX_CPU_KERNELS", "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        lib = ctypes.CDLL(str(build()))
    except (KernelBuildError, OSError) as e:
        log.warning("CPU skinny-matmul kernel unavailable, using XLA's dot: %s", e)
        return False
    if not lib.pf_skinny_matmul_supported():
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PfSkinnyMatmulNT), platform="cpu")
    return True


def applies(x: Array, w: Array) -> bool:
    """Whether matmul_nt(x, w) can take the kernel on CPU (by shapes and dtypes; trace-time static)."""
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and w.ndim == 2 and 0 < rows <= MAX_ROWS
            and available())


def matmul_nt(x: Array, w: Array) -> Array:
    """float32 x [..., K] . w [N, K]^T -> [..., N]: the kernel on CPU where it applies, else XLA's dot.

    Single-device arrays only where the kernel may run (it has no sharding rule)."""
    dot = lambda x, w: jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)
    if not applies(x, w):
        return dot(x, w)

    def kernel(x, w):
        flat = x.reshape(-1, x.shape[-1])
        out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((flat.shape[0], w.shape[0]), jnp.float32))(flat, w)
        return out.reshape(*x.shape[:-1], w.shape[0])

    return jax.lax.platform_dependent(x, w, cpu=kernel, default=dot)
