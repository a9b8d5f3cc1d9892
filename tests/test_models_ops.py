"""pf_jax.models.ops: the decoder's implementation object, chosen per platform and shape, gives the
einsum's results (forward and gradients) wherever it runs another kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.models.kv_cache import KVCache
from pf_jax.models.logprobs import positions_from_mask
from pf_jax.models.ops import CpuDecodeOps, CudnnOps, SplashOps, XlaOps, select_ops

# float32 throughout. Splash scales q before the dot (the einsum scales the float32 logits) and sums its
# online softmax per 128-key block; the XLA dot_product_attention sums in another order. Measured on
# these models: hidden states within ~2e-6, gradients within ~1e-5 relative to their largest entry.
HIDDEN_TOL = 2e-5
GRAD_TOL = 1e-4


def test_select_ops_by_platform():
    assert type(select_ops("tpu")) is SplashOps
    assert type(select_ops("gpu")) is CudnnOps and type(select_ops("cuda")) is CudnnOps
    assert type(select_ops("cpu")) is XlaOps  # training on CPU: the einsum
    assert type(select_ops("cpu", one_device=True)) is CpuDecodeOps  # the sampler's decode loop
    assert type(select_ops("rocm")) is XlaOps


def _model(architecture: str, **overrides) -> Decoder:
    # head_dim 128 and T a multiple of 128: the shapes splash attention takes
    cfg = ModelConfig.tiny(architecture, head_dim=128, max_position_embeddings=1024, **overrides)
    return Decoder(cfg, rngs=nnx.Rngs(0))


def _ragged_batch(vocab: int, t: int = 128) -> tuple[jax.Array, jax.Array]:
    """Left padding of 0 / 17 / 60 tokens and right padding of 0 / 9 / 30: a training batch's layout."""
    tokens = jax.random.randint(jax.random.key(1), (3, t), 0, vocab)
    left, right = jnp.array([0, 17, 60]), jnp.array([0, 9, 30])
    idx = jnp.arange(t)[None]
    return tokens, (idx >= left[:, None]) & (idx < t - right[:, None])


def _forward_and_grad(model: Decoder, ops, tokens, mask):
    graphdef, state = nnx.split(model)

    # a random projection of the real tokens' hidden states (not their squared norm: after the final RMS
    # norm that is nearly constant, and its gradient is rounding noise)
    weights = jax.random.normal(jax.random.key(7), (*tokens.shape, model.cfg.hidden_size))

    def loss(state):
        hidden, _ = nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), mask, ops=ops)
        return jnp.sum(jnp.where(mask[..., None], hidden * weights, 0.0)), hidden

    (_, hidden), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return hidden, grads


def _assert_close(ops, architecture, **overrides):
    model = _model(architecture, **overrides)
    tokens, mask = _ragged_batch(model.cfg.vocab_size)
    h_ref, g_ref = _forward_and_grad(model, XlaOps(), tokens, mask)
    h, g = _forward_and_grad(model, ops, tokens, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(h)[real], np.asarray(h_ref)[real], atol=HIDDEN_TOL, rtol=HIDDEN_TOL)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        scale = float(jnp.max(jnp.abs(b))) or 1.0
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=GRAD_TOL)


@pytest.mark.parametrize("architecture,overrides", [
    ("gemma3", dict(sliding_window=48)),  # a sliding (local) and a global layer, scanned: one kernel each
    ("qwen2", dict(num_kv_heads=1)),  # qkv biases, 4 query heads per kv head
    ("llama", dict(attn_logit_softcap=5.0)),  # the attention logit soft-cap
])
def test_splash_in_the_decoder_equals_the_einsum(architecture, overrides):
    _assert_close(SplashOps(interpret=True), architecture, **overrides)


def test_cudnn_call_in_the_decoder_equals_the_einsum():
    # the same jax.nn.dot_product_attention call the GPU makes, with XLA's implementation (no GPU here)
    _assert_close(CudnnOps(implementation="xla"), "gemma3", sliding_window=48)


def test_splash_runs_only_where_its_shapes_apply():
    model = _model("llama")
    prim = lambda t: str(jax.make_jaxpr(lambda x: model(x, jnp.broadcast_to(jnp.arange(t), (1, t)),
                                                         ops=SplashOps(interpret=True))[0])(
        jnp.zeros((1, t), jnp.int32)))
    assert "pallas_call" in prim(128)
    assert "pallas_call" not in prim(96)  # not a multiple of 128: the einsum
    tiny = Decoder(ModelConfig.tiny("llama"), rngs=nnx.Rngs(0))  # head_dim 16: the einsum
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: tiny(x, jnp.zeros((1, 128), jnp.int32),
                                                                  ops=SplashOps())[0])(jnp.zeros((1, 128), jnp.int32)))


def test_prefill_into_an_empty_cache_takes_splash_and_equals_the_einsum():
    model = _model("gemma3", sliding_window=48)
    tokens, _ = _ragged_batch(model.cfg.vocab_size)
    mask = jnp.arange(128)[None] >= jnp.array([0, 17, 60])[:, None]  # prompts are left-padded only
    cache = KVCache.init(model.cfg, 3, 160, model.dtype)
    run = lambda ops: model(tokens, positions_from_mask(mask), mask, cache, ops=ops, prefill=True)
    jaxpr = str(jax.make_jaxpr(lambda: run(SplashOps(interpret=True)))())
    assert "pallas_call" in jaxpr
    (h, c), (h_ref, c_ref) = run(SplashOps(interpret=True)), run(XlaOps())
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(h)[real], np.asarray(h_ref)[real], atol=HIDDEN_TOL, rtol=HIDDEN_TOL)
    np.testing.assert_array_equal(c.valid, c_ref.valid)
    # the next decode step reads the cache: the einsum path on both
    step = lambda ops, c: model(tokens[:, -1:], positions_from_mask(mask)[:, -1:] + 1, None, c, ops=ops)[0]
    assert "pallas_call" not in str(jax.make_jaxpr(lambda: step(SplashOps(interpret=True), c))())
    np.testing.assert_allclose(step(SplashOps(), c), step(XlaOps(), c_ref), atol=HIDDEN_TOL, rtol=HIDDEN_TOL)
