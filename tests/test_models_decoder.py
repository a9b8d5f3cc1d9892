"""Decoder properties: cached incremental decoding equals the full forward; chunked log-probs equal the
naive log-softmax gather (values, entropy and gradients); parameters carry logical axis names."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder, with_layer_layout
from pf_jax.models.kv_cache import KVCache
from pf_jax.models.logprobs import positions_from_mask, sequence_logprobs, token_logprobs

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
LLAMA3_ROPE = (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
               ("high_freq_factor", 4.0), ("original_max_position_embeddings", 16))


def tiny_model(arch: str, seed: int = 0) -> Decoder:
    extra = {"rope_scaling": LLAMA3_ROPE} if arch == "llama" else {}
    if arch == "gemma3":  # sliding window shorter than the test sequences, mixed layer types
        extra = {"num_layers": 3, "layer_types": ("sliding", "full", "sliding"), "sliding_window": 4}
    model = Decoder(ModelConfig.tiny(arch, **extra), rngs=nnx.Rngs(seed))
    # Random (not init-constant) norms and biases so that every parameter matters.
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and ("norm" in str(path[-1]) or "bias" in str(path[-1])):
            key = jax.random.key(hash(path) % 2**31)
            var[...] = var[...] + 0.3 * jax.random.normal(key, var[...].shape)
    return model


def forward_fn(model: Decoder):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args)), state


@pytest.mark.parametrize(("arch", "scan_layers"), [(a, True) for a in FAMILIES] + [("gemma3", False)])
def test_cached_decode_equals_full_forward(arch, scan_layers):
    model = with_layer_layout(tiny_model(arch), scan_layers=scan_layers)
    fwd, state = forward_fn(model)
    rng = np.random.default_rng(0)
    b, prompt_len, total = 3, 6, 14
    tokens = jnp.asarray(rng.integers(0, 64, (b, total)), jnp.int32)
    mask = np.ones((b, total), bool)
    mask[1, :2] = False  # left padding of the prompt
    mask[2, :5] = False
    mask = jnp.asarray(mask)
    positions = positions_from_mask(mask)
    full, _ = fwd(state, tokens, positions, mask, None)

    cache = KVCache.init(model.cfg, b, 16, jnp.float32)
    steps = [(0, 4), (4, prompt_len)] + [(i, i + 1) for i in range(prompt_len, total)]
    outs = []
    for lo, hi in steps:  # prompt in two chunks, then one token per step
        h, cache = fwd(state, tokens[:, lo:hi], positions[:, lo:hi], mask[:, lo:hi], cache)
        outs.append(h)
    assert int(cache.index) == total
    cached = jnp.concatenate(outs, axis=1)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(cached)[m], np.asarray(full)[m], atol=2e-5, rtol=1e-5)


def test_unrolled_layers_equal_scanned_layers():
    model = tiny_model("gemma3")
    unrolled = with_layer_layout(model, scan_layers=False)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 9)), jnp.int32)
    mask = jnp.arange(9)[None] >= jnp.asarray([[0], [2]])
    a, _ = model(tokens, positions_from_mask(mask), mask)
    b, _ = unrolled(tokens, positions_from_mask(mask), mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for path, var in nnx.iter_graph(unrolled):
        if isinstance(var, nnx.Param) and "layers" in path:
            assert var[...].shape[0] == 1 and var.get_metadata()["out_sharding"][0] == "layers"


def test_padding_does_not_change_real_tokens():
    model = tiny_model("gemma3")
    fwd, state = forward_fn(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, 9)), jnp.int32)
    ref, _ = fwd(state, tokens, positions_from_mask(jnp.ones((1, 9), bool)), jnp.ones((1, 9), bool), None)
    pad = jnp.zeros((1, 3), jnp.int32)
    for padded, mask, sl in [
        (jnp.concatenate([pad, tokens], 1), jnp.arange(12)[None] >= 3, slice(3, 12)),  # left
        (jnp.concatenate([tokens, pad], 1), jnp.arange(12)[None] < 9, slice(0, 9)),  # right
    ]:
        out, _ = fwd(state, padded, positions_from_mask(mask), mask, None)
        np.testing.assert_allclose(np.asarray(out[:, sl]), np.asarray(ref), atol=2e-5, rtol=1e-5)


def naive_logprobs(hidden, head, targets, softcap, temperature):
    z = jnp.einsum("btd,vd->btv", hidden, head)
    if softcap is not None:
        z = jnp.tanh(z / softcap) * softcap
    logp = jax.nn.log_softmax(z / temperature, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, -1)
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], entropy


@pytest.mark.parametrize(("chunk", "softcap", "temperature"), [(5, None, 1.0), (128, 3.0, 0.7), (1, 2.0, 1.3)])
def test_token_logprobs_equals_naive(chunk, softcap, temperature):
    k1, k2, k3 = jax.random.split(jax.random.key(chunk), 3)
    hidden = jax.random.normal(k1, (3, 7, 16))
    head = jax.random.normal(k2, (50, 16))
    targets = jax.random.randint(k3, (3, 7), 0, 50)
    logp, ent = token_logprobs(hidden, head, targets, chunk_size=chunk, softcap=softcap,
                               temperature=temperature, return_entropy=True)
    ref_logp, ref_ent = naive_logprobs(hidden, head, targets, softcap, temperature)
    chex.assert_shape(logp, (3, 7))
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-5, rtol=1e-5)
    weights = jax.random.normal(k3, (3, 7))

    def loss(fn):
        return lambda h, w: jnp.sum(weights * fn(h, w)[0]) + jnp.sum(fn(h, w)[1])

    ours = jax.grad(loss(lambda h, w: token_logprobs(h, w, targets, chunk_size=chunk, softcap=softcap,
                                                      temperature=temperature, return_entropy=True)),
                    argnums=(0, 1))(hidden, head)
    ref = jax.grad(loss(lambda h, w: naive_logprobs(h, w, targets, softcap, temperature)), argnums=(0, 1))(hidden, head)
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_gradient_without_entropy(dtype):
    """The custom VJP without the entropy term: gradients of a weighted log-prob sum equal the full-logits
    formula's, in the inputs' dtype (bf16 hidden states and head: to bf16 rounding)."""
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    hidden = jax.random.normal(k1, (2, 9, 16)).astype(dtype)
    head = jax.random.normal(k2, (40, 16)).astype(dtype)
    targets = jax.random.randint(k3, (2, 9), 0, 40)
    weights = jax.random.normal(k3, (2, 9))
    ours = jax.grad(lambda h, w: jnp.sum(weights * token_logprobs(h, w, targets, chunk_size=4)), (0, 1))(hidden, head)
    ref = jax.grad(lambda h, w: jnp.sum(weights * naive_logprobs(h.astype(jnp.float32), w.astype(jnp.float32),
                                                                 targets, None, 1.0)[0]), (0, 1))(hidden, head)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    for a, r in zip(ours, ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("arch", FAMILIES)
def test_sequence_logprobs_matches_full_logits(arch):
    model = tiny_model(arch)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 8)), jnp.int32)
    mask = jnp.asarray([[False, False] + [True] * 6, [True] * 8])
    logp = sequence_logprobs(model, tokens, mask, chunk_size=3)
    hidden, _ = model(tokens, positions_from_mask(mask), mask)
    ref = jnp.take_along_axis(jax.nn.log_softmax(model.logits(hidden)[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
    chex.assert_shape(logp, (2, 7))
    np.testing.assert_allclose(np.asarray(logp)[np.asarray(mask[:, 1:])],
                               np.asarray(ref)[np.asarray(mask[:, 1:])], atol=1e-5)


def test_parameters_carry_logical_axis_names():
    model = tiny_model("qwen2")
    allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            names = var.get_metadata()["out_sharding"]
            assert len(names) == var[...].ndim, path
            assert set(names) <= allowed, path


@pytest.mark.parametrize("arch", FAMILIES)
def test_hf_tensor_layout_round_trip_keeps_values_and_axis_names(arch):
    from pf_jax.models.hf_io import model_from_hf_tensors, model_to_hf_tensors

    model = tiny_model(arch)
    unrolled = model_from_hf_tensors(model.cfg.to_hf(), model_to_hf_tensors(model), scan_layers=False)
    assert len(unrolled.layers) == model.cfg.num_layers
    back = model_from_hf_tensors(model.cfg.to_hf(), model_to_hf_tensors(unrolled))
    assert back.cfg == model.cfg
    ours = dict(nnx.iter_graph(model))
    for path, var in nnx.iter_graph(back):
        if isinstance(var, nnx.Param):
            np.testing.assert_array_equal(var[...], ours[path][...])
            assert var.get_metadata()["out_sharding"] == ours[path].get_metadata()["out_sharding"]


def test_gradients_flow_and_remat_does_not_change_them():
    model = tiny_model("gemma3")
    remat = tiny_model("gemma3")
    remat.remat = True
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 10)), jnp.int32)
    mask = jnp.arange(10)[None] >= jnp.asarray([[0], [3]])

    def loss(m):
        return -jnp.sum(sequence_logprobs(m, tokens, mask, chunk_size=4) * mask[:, 1:])

    g1 = nnx.jit(nnx.grad(loss))(model)
    g2 = nnx.jit(nnx.grad(loss))(remat)
    leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(leaves1) == len(leaves2) > 10
    for a, b in zip(leaves1, leaves2):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(g1.layers.q[...]).max()) > 0 and float(jnp.abs(g1.embed[...]).max()) > 0
