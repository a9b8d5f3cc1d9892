"""pf_jax.kernels: the CPU skinny-matmul kernel against a float64 reference, where it is taken, its
fallbacks, and a compiler failure."""

import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.kernels import skinny_matmul
from pf_jax.kernels.skinny_matmul import MAX_ROWS, TARGET, KernelBuildError, build, matmul_nt
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder

needs_kernel = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or "avx512f" not in Path("/proc/cpuinfo").read_text(),
    reason="the kernel needs an x86 CPU with AVX-512 (Linux /proc/cpuinfo)")


def uses_kernel(fn, *args) -> bool:
    return TARGET in jax.jit(fn).lower(*args).as_text()


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 4096, 640), (16, 1000, 640), (6, 37, 64), (7, 5, 16), (13, 258, 37),
                                   (2, 3, 100), (MAX_ROWS, 515, 96), (3, 2, 1)])
def test_matmul_nt_matches_a_float64_reference(shape):
    # every tile shape (rows of x 1-6, rows of w 1-4) and a K that is not a multiple of 16 (masked tail)
    m, n, k = shape
    x = jax.random.normal(jax.random.key(0), (m, k))
    w = jax.random.normal(jax.random.key(1), (n, k))
    assert uses_kernel(matmul_nt, x, w)
    got = np.asarray(jax.jit(matmul_nt)(x, w))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_kernel
def test_matmul_nt_keeps_leading_dims_and_agrees_with_xla():
    x = jax.random.normal(jax.random.key(2), (4, 1, 64))
    w = jax.random.normal(jax.random.key(3), (300, 64))
    got = jax.jit(matmul_nt)(x, w)
    want = jnp.einsum("btd,vd->btv", x, w)
    assert got.shape == (4, 1, 300)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_matmul_nt_falls_back_to_xla_where_the_kernel_does_not_apply():
    w = jnp.ones((8, 16))
    assert not uses_kernel(matmul_nt, jnp.ones((MAX_ROWS + 1, 16)), w)  # compute bound: XLA's dot
    assert not uses_kernel(matmul_nt, jnp.ones((2, 16), jnp.bfloat16), w.astype(jnp.bfloat16))
    out = jax.jit(matmul_nt)(jnp.ones((MAX_ROWS + 1, 16)), w)
    np.testing.assert_array_equal(out, np.full((MAX_ROWS + 1, 8), 16.0))


def test_environment_switch_disables_the_kernel(monkeypatch):
    monkeypatch.setenv("PF_JAX_CPU_KERNELS", "0")
    skinny_matmul.available.cache_clear()
    try:
        assert not skinny_matmul.available()
        assert not uses_kernel(matmul_nt, jnp.ones((2, 16)), jnp.ones((8, 16)))
    finally:
        skinny_matmul.available.cache_clear()


def test_a_compiler_error_is_reported_with_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("PF_JAX_CACHE", str(tmp_path))
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++;\n")
    with pytest.raises(KernelBuildError, match=r"bad\.cc"):
        build(bad)
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built is cached


@needs_kernel
def test_decoder_logits_take_the_kernel_only_on_one_device():
    model = Decoder(ModelConfig.tiny("gemma3"), rngs=nnx.Rngs(0))
    hidden = jax.random.normal(jax.random.key(4), (3, 1, model.cfg.hidden_size))
    assert uses_kernel(lambda h: model.logits(h, one_device=True), hidden)
    assert not uses_kernel(model.logits, hidden)
    np.testing.assert_allclose(model.logits(hidden, one_device=True), model.logits(hidden), rtol=1e-5, atol=1e-5)
