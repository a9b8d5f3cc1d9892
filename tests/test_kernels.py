"""pf_jax.kernels: the CPU decode kernels (skinny matmuls, their AMX paths, the packed projections, decode
attention) against float64 or XLA references, where they are taken, their fallbacks, and a compiler
failure."""

import gc
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.kernels import skinny_matmul
from pf_jax.kernels.attention import decode_attention
from pf_jax.kernels.library_cache import KernelBuildError, build, cache_dir
from pf_jax.kernels.skinny_matmul import (
    AMX_MIN_ROWS,
    MAX_ROWS,
    MIN_ROWS_NN,
    PACKED_ROWS,
    TARGET,
    TARGET_ATTENTION,
    TARGET_NN,
    amx_available,
    amx_calls,
    matmul_nn,
    matmul_nt,
    matmul_packed,
    pack_nn,
    packing_pays,
)
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.models.kv_cache import KVCache
from pf_jax.models.logprobs import sequence_logprobs
from pf_jax.models.ops import CpuDecodeOps, attention, pack_projections
from pf_jax.sampling import GenerationConfig, generate, sampler
from pf_jax.sampling.layout import RowLayout
from pf_jax.sampling.sampler import decode_packing

needs_amx = pytest.mark.skipif(not amx_available(), reason="the CPU or the OS offers no AMX tiles")
needs_kernel = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or "avx512f" not in Path("/proc/cpuinfo").read_text(),
    reason="the kernel needs an x86 CPU with AVX-512 (Linux /proc/cpuinfo)")


def uses_kernel(fn, *args, target: str = TARGET) -> bool:
    return target in jax.jit(fn).lower(*args).as_text()


# (M, N, K) for each kernel: every row tile (1-6 rows of x); nt: 1-4 rows of w per tile and a K that is
# not a multiple of 16 (masked tail); nn: column blocks of 1-4 vectors with a masked last one, K chunks of
# 64 with a remainder. nn's w is stored [K, N].
NT_SHAPES = [(1, 4096, 640), (16, 1000, 640), (6, 37, 64), (7, 5, 16), (13, 258, 37), (2, 3, 100),
             (MAX_ROWS, 515, 96), (3, 2, 1)]
NN_SHAPES = [(2, 2048, 640), (16, 640, 1024), (6, 64, 37), (7, 70, 130), (13, 5, 16), (3, 129, 200),
             (MAX_ROWS, 515, 96), (5, 3, 1)]


@needs_kernel
@pytest.mark.parametrize(("kind", "shape"), [("nt", s) for s in NT_SHAPES] + [("nn", s) for s in NN_SHAPES])
def test_kernels_match_a_float64_reference(kind, shape):
    m, n, k = shape
    fn, target, w_shape = (matmul_nt, TARGET, (n, k)) if kind == "nt" else (matmul_nn, TARGET_NN, (k, n))
    x = jax.random.normal(jax.random.key(0), (m, k))
    w = jax.random.normal(jax.random.key(1), w_shape)
    assert uses_kernel(fn, x, w, target=target)
    got = np.asarray(jax.jit(fn)(x, w))
    w64 = np.asarray(w, np.float64)
    want = np.asarray(x, np.float64) @ (w64.T if kind == "nt" else w64)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


# (M, N, K) for the head's AMX path: 1-4 blocks of 16 rows of x, full and partial, in one or two passes;
# partial blocks of 16 rows of w (N % 16); K chunks of 32 with a masked remainder (K % 32, K < 16, K < 32).
AMX_SHAPES = [(AMX_MIN_ROWS, 1000, 640), (16, 4096, 640), (17, 37, 96), (31, 515, 100), (32, 16, 37),
              (20, 50, 13), (16, 129, 1), (48, 300, 64), (MAX_ROWS, 77, 640), (49, 20, 5)]


@pytest.mark.skipif(not amx_available(), reason="the CPU or the OS offers no AMX tiles")
@pytest.mark.parametrize("shape", AMX_SHAPES)
def test_head_amx_path_is_as_exact_as_float32(shape):
    # the three-piece bf16 split must leave the error of a float32 dot: compared with float64, the FMA path
    # and XLA's dot, on values over six decades (the pieces' exponents differ from their value's)
    m, n, k = shape
    scale = lambda key, s: jnp.exp(jax.random.uniform(key, s, minval=-7.0, maxval=7.0))
    x = jax.random.normal(jax.random.key(0), (m, k)) * scale(jax.random.key(2), (m, k))
    w = jax.random.normal(jax.random.key(1), (n, k)) * scale(jax.random.key(3), (n, k))
    before = amx_calls()
    got = np.asarray(jax.jit(matmul_nt)(x, w))
    assert amx_calls() == before + 1
    fma = np.asarray(jax.jit(lambda x, w: matmul_nt(x, w, amx=False))(x, w))
    assert amx_calls() == before + 1
    xla = np.asarray(jax.jit(lambda x, w: x @ w.T)(x, w))
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    want, magnitude = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    error = lambda out: np.abs(out - want) / magnitude  # relative to the sum of |terms|
    assert error(got).max() < 2.0 ** -24 * 4 * np.sqrt(k)  # float32 rounding, a typical sum's growth
    # on average no worse than the dots that the rest of pf_jax runs (XLA's: the training forward)
    assert error(got).mean() <= 1.5 * max(error(fma).mean(), error(xla).mean()) + 2.0 ** -26


@pytest.mark.skipif(not amx_available(), reason="the CPU or the OS offers no AMX tiles")
def test_head_amx_path_only_for_its_row_counts():
    w = jax.random.normal(jax.random.key(1), (40, 64))
    before = amx_calls()
    jax.jit(matmul_nt)(jnp.ones((AMX_MIN_ROWS - 1, 64)), w).block_until_ready()
    assert amx_calls() == before
    jax.jit(matmul_nt)(jnp.ones((MAX_ROWS + 1, 64)), w).block_until_ready()  # XLA's dot
    jax.jit(matmul_nt)(jnp.ones((40, 64)), w).block_until_ready()  # two passes over w would not pay
    assert amx_calls() == before
    jax.jit(matmul_nt)(jnp.ones((AMX_MIN_ROWS, 64)), w).block_until_ready()
    jax.jit(matmul_nt)(jnp.ones((MAX_ROWS, 64)), w).block_until_ready()
    assert amx_calls() == before + 2


@needs_kernel
def test_matmul_nt_keeps_leading_dims_and_agrees_with_xla():
    x = jax.random.normal(jax.random.key(2), (4, 1, 64))
    w = jax.random.normal(jax.random.key(3), (300, 64))
    got = jax.jit(matmul_nt)(x, w)
    want = jnp.einsum("btd,vd->btv", x, w)
    assert got.shape == (4, 1, 300)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_matmul_nn_contracts_several_dims_like_einsum():
    a = jax.random.normal(jax.random.key(5), (4, 1, 3, 8))  # "bthk,hkd->btd"
    o = jax.random.normal(jax.random.key(6), (3, 8, 20))
    f = lambda a, o: matmul_nn(a, o, in_dims=2)
    assert uses_kernel(f, a, o, target=TARGET_NN)
    np.testing.assert_allclose(jax.jit(f)(a, o), jnp.einsum("bthk,hkd->btd", a, o), rtol=1e-5, atol=1e-5)
    h = jax.random.normal(jax.random.key(7), (2, 1, 8))  # "btd,dhk->bthk"
    q = jax.random.normal(jax.random.key(8), (8, 3, 4))
    assert jax.jit(matmul_nn)(h, q).shape == (2, 1, 3, 4)
    np.testing.assert_allclose(jax.jit(matmul_nn)(h, q), jnp.einsum("btd,dhk->bthk", h, q), rtol=1e-5, atol=1e-5)


def test_matmul_nn_falls_back_to_einsum_semantics():
    w = jnp.ones((16, 8))
    assert MIN_ROWS_NN > 1 and not uses_kernel(matmul_nn, jnp.ones((1, 16)), w, target=TARGET_NN)
    assert not uses_kernel(matmul_nn, jnp.ones((MAX_ROWS + 1, 16)), w, target=TARGET_NN)
    bf16 = matmul_nn(jnp.ones((2, 16), jnp.bfloat16), w.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16  # the inputs' dtype, as jnp.einsum
    np.testing.assert_array_equal(bf16.astype(np.float32), np.full((2, 8), 16.0))


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
    assert not list(cache_dir().glob("*.so"))  # nothing half-built is cached


@needs_kernel
@pytest.mark.parametrize("architecture", ["gemma3", "qwen2"])
def test_decoder_decode_step_with_the_kernels_equals_without(architecture):
    # a decode step of 3 rows through a cache: every projection on the kernel, same hidden states
    model = Decoder(ModelConfig.tiny(architecture), rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(9), (3, 5), 0, model.cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(5), (3, 5))
    _, cache = model(prompt, positions, None, KVCache.init(model.cfg, 3, 8, model.dtype))
    token, position = prompt[:, -1:], jnp.full((3, 1), 5)
    step = lambda ops=None: model(token, position, None, cache, ops=ops)
    assert uses_kernel(lambda c: model(token, position, None, c, ops=CpuDecodeOps())[0], cache, target=TARGET_NN)
    assert uses_kernel(lambda c: model(token, position, None, c, ops=CpuDecodeOps())[0], cache, target=TARGET_ATTENTION)
    (h_fast, cache_fast), (h_ref, cache_ref) = step(CpuDecodeOps()), step()
    np.testing.assert_allclose(h_fast, h_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache_fast.k, cache_ref.k, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_decoder_logits_take_the_kernel_only_with_the_cpu_decode_ops():
    model = Decoder(ModelConfig.tiny("gemma3"), rngs=nnx.Rngs(0))
    hidden = jax.random.normal(jax.random.key(4), (3, 1, model.cfg.hidden_size))
    assert uses_kernel(lambda h: model.logits(h, ops=CpuDecodeOps()), hidden)
    assert not uses_kernel(model.logits, hidden)
    np.testing.assert_allclose(model.logits(hidden, ops=CpuDecodeOps()), model.logits(hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not amx_available(), reason="the CPU or the OS offers no AMX tiles")
def test_decoder_log_probs_on_the_amx_head_equal_xla():
    # 16 rows (a batch-16 decode step) take the head's AMX path; the log-probs the sampler returns from it
    # must equal those of XLA's head (the training forward's)
    model = Decoder(ModelConfig.tiny("gemma3"), rngs=nnx.Rngs(0))
    hidden = jax.random.normal(jax.random.key(4), (16, 1, model.cfg.hidden_size))
    before = amx_calls()
    fast = jax.nn.log_softmax(jax.jit(lambda h: model.logits(h, ops=CpuDecodeOps()))(hidden))
    assert amx_calls() == before + 1
    np.testing.assert_allclose(fast, jax.nn.log_softmax(model.logits(hidden)), rtol=1e-6, atol=1e-5)


# (M, [N_i], K) for the projections' AMX path on packed weights: 1-4 blocks of 16 rows of x in one or two
# passes; several weights side by side (q | k | v), with blocks of 16 columns that straddle two of them and a
# partial last block; K chunks of 32 with a masked remainder (K < 16, K < 32, K % 32).
PACKED_SHAPES = [(PACKED_ROWS[0], [1000], 640), (16, [256, 64, 64], 640), (17, [37, 5], 96), (32, [16], 37),
                 (20, [3, 50, 30], 13), (16, [129], 1), (48, [300], 64), (MAX_ROWS, [77, 3], 100), (1, [20], 33)]


@needs_amx
@pytest.mark.parametrize("shape", PACKED_SHAPES)
def test_packed_projection_is_as_exact_as_float32(shape):
    # pack_nn(w_0, w_1, ...) then matmul_packed = x . [w_0 | w_1 | ...] with a float32 dot's error: against
    # float64 and XLA's dot, values over six decades, as the head's AMX path
    m, widths, k = shape
    scale = lambda key, s: jnp.exp(jax.random.uniform(key, s, minval=-7.0, maxval=7.0))
    x = jax.random.normal(jax.random.key(0), (m, k)) * scale(jax.random.key(2), (m, k))
    ws = [jax.random.normal(jax.random.key(10 + i), (k, n)) * scale(jax.random.key(20 + i), (k, n))
          for i, n in enumerate(widths)]
    w = jnp.concatenate(ws, axis=1)
    packed = jax.jit(pack_nn)(*ws)
    before = amx_calls()
    got = np.asarray(jax.jit(matmul_packed, static_argnums=2)(x, packed, w.shape[1]))
    assert amx_calls() == before + 1
    xla = np.asarray(jax.jit(lambda x, w: x @ w)(x, w))
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    want, magnitude = x64 @ w64, np.abs(x64) @ np.abs(w64)
    error = lambda out: np.abs(out - want) / magnitude
    assert got.shape == want.shape
    assert error(got).max() < 2.0 ** -24 * 4 * np.sqrt(k)
    assert error(got).mean() <= 1.5 * error(xla).mean() + 2.0 ** -26


@needs_amx
def test_packed_layout_and_its_errors():
    w = jnp.arange(3 * 20, dtype=jnp.float32).reshape(3, 20)  # K = 3, N = 20: one full and one partial block
    packed = np.asarray(jax.jit(pack_nn)(w))
    assert packed.shape == (2, 16, 16, 2)  # [N/16, K padded to 32 / 2, 16 columns, 2 rows of a pair]
    np.testing.assert_array_equal(packed[0, 1, :, 0], np.asarray(w[2, :16]))  # row 2k + t, column 16b + n
    np.testing.assert_array_equal(packed[1, 0, :4, 1], np.asarray(w[1, 16:]))
    assert not packed[1, :, 4:].any() and not packed[:, 2:].any()  # zero padding
    with pytest.raises(ValueError, match="one K"):
        pack_nn(w, jnp.ones((4, 16)))
    with pytest.raises(ValueError, match="float32"):
        pack_nn(w.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"do not hold a float32 \[3, 40\] weight"):
        matmul_packed(jnp.ones((16, 3)), jnp.asarray(packed), 40)


@needs_amx
def test_packing_only_for_its_row_counts():
    assert [packing_pays(r) for r in (PACKED_ROWS[0] - 1, PACKED_ROWS[0], 16, PACKED_ROWS[1], PACKED_ROWS[1] + 1)] == [
        False, True, True, True, False]


@needs_amx
@pytest.mark.parametrize("architecture", ["gemma3", "qwen2"])
def test_decoder_decode_step_on_packed_projections_equals_without(architecture):
    # 16 rows (a batch-16 decode step) through a cache: q | k | v, o, gate | up and down on packed weights
    # (qwen2 adds q/k/v biases, gemma3 norms around them), same hidden states and cache
    model = Decoder(ModelConfig.tiny(architecture), rngs=nnx.Rngs(0), scan_layers=False)
    prompt = jax.random.randint(jax.random.key(9), (16, 5), 0, model.cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(5), (16, 5))
    _, cache = model(prompt, positions, None, KVCache.init(model.cfg, 16, 8, model.dtype))
    token, position = prompt[:, -1:], jnp.full((16, 1), 5)
    packed = jax.jit(lambda: pack_projections(model))()
    before = amx_calls()
    h_fast, cache_fast = jax.block_until_ready(model(token, position, None, cache, ops=CpuDecodeOps(packed=packed)))
    assert amx_calls() == before + 4 * model.cfg.num_layers
    h_ref, cache_ref = model(token, position, None, cache)
    np.testing.assert_allclose(h_fast, h_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache_fast.k, cache_ref.k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache_fast.v, cache_ref.v, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unrolled"):
        pack_projections(Decoder(ModelConfig.tiny(architecture), rngs=nnx.Rngs(0)))


@needs_amx
def test_sampler_decodes_16_rows_on_packed_projections_packed_once_per_weights():
    model = Decoder(ModelConfig.tiny("gemma3"), rngs=nnx.Rngs(0), scan_layers=False)
    prompts = [[5, 9, 2, 33], [4, 40], [12, 3, 60, 21, 7]] * 5 + [[8]]  # 16 rows, left-padded
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=(), min_prompt_bucket=8)
    before = amx_calls()
    result = jax.block_until_ready(generate(model, prompts, jax.random.key(3), config))
    assert amx_calls() > before  # the packed path ran
    layout = RowLayout.of(nnx.state(model))
    packed = decode_packing(model, layout, 16)
    assert decode_packing(model, layout, 16) is packed  # the same weights are packed once
    assert decode_packing(model, layout, PACKED_ROWS[1] + 1) is None
    tokens, mask = result.sequences()
    teacher = np.asarray(sequence_logprobs(model, tokens, mask))[:, tokens.shape[1] - 7:]
    np.testing.assert_allclose(np.asarray(result.policy_logprobs), teacher, atol=2e-5, rtol=0)
    model.layers[0].q[...] = model.layers[0].q[...] * 2.0  # new weights (an update): packed again
    assert decode_packing(model, layout, 16) is not packed
    del model, packed
    gc.collect()
    assert not sampler._packings  # the weights are gone: so is their packing


# (B, H, KVH, Dh, S): Gemma 3's 4 query heads on 1 kv head of 256; 2 kv heads with a head dim that is not a
# multiple of 16 (masked tail); 8 query heads per kv head (the most the kernel holds); a single slot.
ATTENTION_SHAPES = [(3, 4, 1, 256, 37), (2, 4, 2, 20, 5), (2, 8, 1, 16, 9), (1, 2, 2, 64, 1)]


@needs_kernel
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_decode_attention_reads_the_stacked_cache_like_xla(shape):
    b, h, kvh, dh, s = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, 1, h, dh))
    k_all, v_all = (jax.random.normal(key, (3, b, s, kvh, dh)) for key in keys[1:3])
    allowed = jax.random.bernoulli(keys[3], 0.6, (b, 1, s)).at[0].set(False)  # row 0: no slot (uniform)
    reference = lambda layer: lambda: attention(q, k_all[layer], v_all[layer], allowed, scale=0.3)
    fast = jax.jit(lambda q, k, v, a, layer: decode_attention(q, k, v, a, layer, 0.3, reference(1)))
    assert TARGET_ATTENTION in fast.lower(q, k_all, v_all, allowed, 1).as_text()
    for layer in (0, 2):  # the layer index is an operand (traced under lax.scan)
        got = fast(q, k_all, v_all, allowed, layer)  # weighted means of O(1) values: float32 error ~1e-6
        np.testing.assert_allclose(got, reference(layer)(), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_decode_attention_falls_back_where_the_kernel_does_not_apply():
    q, k_all = jnp.ones((2, 1, 18, 16)), jnp.ones((1, 2, 3, 2, 16))  # 9 query heads per kv head
    sentinel = jnp.zeros((2, 1, 18, 16))
    assert decode_attention(q, k_all, k_all, jnp.ones((2, 1, 3), bool), 0, 1.0, lambda: sentinel) is sentinel
    q2 = jnp.ones((2, 2, 4, 16))  # two query tokens (a prefill)
    assert decode_attention(q2, k_all, k_all, jnp.ones((2, 2, 3), bool), 0, 1.0, lambda: sentinel) is sentinel
    bf16 = k_all.astype(jnp.bfloat16)
    assert decode_attention(q.astype(jnp.bfloat16)[:, :, :4], bf16, bf16, jnp.ones((2, 1, 3), bool), 0, 1.0,
                            lambda: sentinel) is sentinel
