"""The paged KV cache (pf_jax.models.paged): decoding through page tables equals the full forward pass, and
the Pallas TPU paged-attention kernel (in Pallas' TPU interpreter) equals the gathered reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.models.ops import SplashOps, XlaOps, attention, paged_decode_kernel
from pf_jax.models.paged import PagedKVCache, gather_rows
from pf_jax.sampling.sampler import positions_from_mask
from tests.test_models_decoder import FAMILIES, forward_fn, tiny_model


def shuffled_cache(model, rows: int, pages_per_row: int, page_size: int, seed: int = 0) -> PagedKVCache:
    """An empty paged cache whose rows own pages scattered over the pool (not in row order)."""
    cache = PagedKVCache.init(model.cfg, rows, pages_per_row, rows * pages_per_row + 3, page_size)
    order = np.random.default_rng(seed).permutation(rows * pages_per_row + 3)[: rows * pages_per_row]
    return cache.replace(pages=jnp.asarray(order.reshape(rows, pages_per_row), jnp.int32))


@pytest.mark.parametrize("arch", FAMILIES)
def test_paged_decode_equals_full_forward(arch):
    model = tiny_model(arch)  # gemma3: a sliding window of 4, shorter than the sequences
    fwd, state = forward_fn(model)
    b, total = 3, 13
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (b, total)), jnp.int32)
    mask = jnp.ones((b, total), bool)
    full, _ = fwd(state, tokens, positions_from_mask(mask), mask, None)

    cache = shuffled_cache(model, b, pages_per_row=4, page_size=4)
    outs = []
    for lo, hi in [(0, 5)] + [(i, i + 1) for i in range(5, total)]:  # a 5-token chunk, then one token per step
        h, cache = fwd(state, tokens[:, lo:hi], jnp.broadcast_to(jnp.arange(lo, hi), (b, hi - lo)), None, cache)
        outs.append(h)
    assert cache.lengths.tolist() == [total] * b
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)


def test_rows_sharing_pages_read_the_same_prefix():
    """Two rows whose tables start with the same page see the same prefix: after writing a 4-token prompt
    into row 0 only, row 1 (sharing that page, length 4) decodes the next token as row 0 does."""
    model = tiny_model("qwen3")
    fwd, state = forward_fn(model)
    prompt = jnp.asarray([[5, 9, 2, 7]], jnp.int32)
    one = shuffled_cache(model, 1, pages_per_row=3, page_size=4)
    _, one = fwd(state, prompt, jnp.arange(4)[None], None, one)
    shared = one.replace(pages=jnp.stack([one.pages[0], one.pages[0].at[1:].set(one.scratch)]),
                         lengths=jnp.array([4, 4], jnp.int32))
    h, _ = fwd(state, jnp.array([[3], [3]], jnp.int32), jnp.array([[4], [4]]), None, shared)
    np.testing.assert_array_equal(h[0], h[1])


def test_pallas_paged_kernel_equals_the_gathered_reference():
    rng = np.random.default_rng(0)
    b, heads, kv_heads, dh, page_size, pool, per_row = 4, 4, 2, 128, 8, 40, 4
    q = jnp.asarray(rng.standard_normal((b, heads, dh)), jnp.float32) / np.sqrt(dh)
    k_pool, v_pool = (jnp.asarray(rng.standard_normal((1, kv_heads, pool, page_size, dh)), jnp.float32)
                      for _ in range(2))
    pages = jnp.asarray(rng.permutation(pool)[: b * per_row].reshape(b, per_row), jnp.int32)
    lengths = jnp.array([1, 9, 32, 17], jnp.int32)
    k, v = gather_rows(k_pool, 0, pages), gather_rows(v_pool, 0, pages)
    allowed = (jnp.arange(per_row * page_size)[None, None] < lengths[:, None, None])
    reference = attention(q[:, None], k, v, allowed, scale=1.0)[:, 0]
    out = paged_decode_kernel(q, k_pool[0], v_pool[0], lengths, pages, None, interpret=True)
    np.testing.assert_allclose(out, reference, atol=3e-2)  # the kernel computes in bfloat16
    bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    exact = attention(bf16(q)[:, None], bf16(k), bf16(v), allowed, scale=1.0)[:, 0]
    assert float(jnp.max(jnp.abs(out - exact))) < float(jnp.max(jnp.abs(out - reference)))


def test_decoder_takes_the_kernel_on_full_layers_and_the_reference_on_windowed_ones():
    """Gemma 3 with a sliding layer whose window binds inside a row's slots: SplashOps (interpreted) runs
    the kernel on the full layer and the gathered reference on the sliding ones, and decodes as XlaOps."""
    model = tiny_model("gemma3")
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, ops, *args: nnx.merge(graphdef, state)(*args, ops=ops),
                   static_argnames=("ops",))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 7)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    cache = shuffled_cache(model, 2, pages_per_row=4, page_size=4)
    _, cache = step(state, XlaOps(), tokens[:, :6], positions[:, :6], None, cache)
    want, _ = step(state, XlaOps(), tokens[:, 6:], positions[:, 6:], None, cache)
    got, _ = step(state, SplashOps(interpret=True), tokens[:, 6:], positions[:, 6:], None, cache)
    hlo = step.lower(state, SplashOps(interpret=True), tokens[:, 6:], positions[:, 6:], None, cache).as_text()
    assert "paged" in hlo.lower()
    np.testing.assert_allclose(got, want, atol=5e-2)


def test_paged_decode_step_compiles_for_tpu_with_the_pallas_kernel():
    """XLA's TPU compiler (libtpu, a compile-only v5e chip) builds a Gemma 3 decode step over a paged cache:
    the full layer's attention is the Mosaic kernel (a tpu_custom_call), the sliding layers' the gather."""
    from jax.sharding import SingleDeviceSharding

    from pf_jax.models.config import ModelConfig
    from pf_jax.models.decoder import Decoder
    from pf_jax.sharding.topology import tpu_topology

    cfg = ModelConfig.tiny("gemma3", num_layers=2, layer_types=("sliding", "full"), sliding_window=8, head_dim=128,
                           num_heads=2, num_kv_heads=1)
    model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, ops=SplashOps())
    graphdef, state = nnx.split(model)
    on_chip = SingleDeviceSharding(tpu_topology("v5e:1x1").devices[0])
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_chip)
    cache = jax.eval_shape(lambda: PagedKVCache.init(cfg, 8, 4, 40, 16, jnp.bfloat16))
    tokens = jax.ShapeDtypeStruct((8, 1), jnp.int32, sharding=on_chip)
    step = jax.jit(lambda state, cache, t: nnx.merge(graphdef, state)(t, t, None, cache))
    compiled = step.lower(jax.tree.map(place, state), jax.tree.map(place, cache), tokens).compile()
    text = compiled.as_text()
    assert text.count("tpu_custom_call") >= 1 and "paged" in text
