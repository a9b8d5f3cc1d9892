"""LoRA on the decoder (pf_jax.models.lora): fresh adapters leave the model exactly the base, the merged
weights compute what the adapters do, only the adapters are trainable, and qwix cannot wrap this decoder."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder, with_layer_layout
from pf_jax.models.errors import ModelInputError
from pf_jax.models.lora import LoraParam, LoraSpec, add_adapters, merged_model

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 90, size=(2, 9)), jnp.int32)
POSITIONS = jnp.broadcast_to(jnp.arange(9), (2, 9))


def _model(arch: str, scan_layers: bool = True) -> Decoder:
    cfg = ModelConfig.tiny(arch, vocab_size=96, num_heads=4, num_kv_heads=2)
    return Decoder(cfg, rngs=nnx.Rngs(1), scan_layers=scan_layers)


def _logits(model: Decoder) -> np.ndarray:
    hidden, _ = model(TOKENS, POSITIONS)
    return np.asarray(model.logits(hidden))


def _randomise_b(model: Decoder, seed: int = 2) -> None:
    """Trained-looking adapters: B no longer zero."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, LoraParam) and not np.any(np.asarray(var[...])):
            var.set_value(jnp.asarray(0.05 * rng.normal(size=var.shape), var[...].dtype))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_fresh_adapters_give_the_base_logits_bitwise(arch, init):
    base = _logits(_model(arch))
    model = _model(arch)
    add_adapters(model, LoraSpec(rank=4, alpha=8, targets=LoraSpec.resolve_targets(["all-linear", "embed_tokens"]),
                                 init=init), rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(_logits(model), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_weights_compute_what_the_adapters_do(arch):
    model = _model(arch)
    add_adapters(model, LoraSpec(rank=4, alpha=16, targets=LoraSpec.resolve_targets(["all-linear"])),
                 rngs=nnx.Rngs(3))
    _randomise_b(model)
    adapted = _logits(model)
    assert np.max(np.abs(adapted - _logits(_model(arch)))) > 1e-3  # the adapters do something
    merged = merged_model(model)
    assert merged.lora is None and not any(isinstance(v, LoraParam) for _, v in nnx.iter_graph(merged))
    np.testing.assert_allclose(_logits(merged), adapted, atol=2e-5, rtol=2e-5)


def test_unrolled_layers_carry_the_adapters():
    model = _model("gemma3")
    add_adapters(model, LoraSpec(rank=2, alpha=2, targets=("q_proj", "down_proj")), rngs=nnx.Rngs(3))
    _randomise_b(model)
    np.testing.assert_allclose(_logits(with_layer_layout(model, scan_layers=False)), _logits(model), atol=1e-5)


def test_only_adapters_are_lora_params():
    model = _model("qwen2")
    add_adapters(model, LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(3))
    _, lora, base = nnx.split(model, LoraParam, nnx.Param)
    names = {"/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(lora)}
    assert names == {"layers/q_lora_a", "layers/q_lora_b", "layers/v_lora_a", "layers/v_lora_b"}
    L, D = model.cfg.num_layers, model.cfg.hidden_size
    assert lora["layers"]["q_lora_a"][...].shape == (L, D, 4)
    assert lora["layers"]["q_lora_b"][...].shape == (L, 4, model.cfg.num_heads, model.cfg.head_dim)
    assert "q" in base["layers"] and "q_lora_a" not in base["layers"]


def test_bad_specs_name_what_is_known():
    with pytest.raises(ModelInputError, match="match no projection; known: q_proj"):
        LoraSpec(rank=4, alpha=8, targets=("query",))
    with pytest.raises(ModelInputError, match="rank must be >= 1"):
        LoraSpec(rank=0, alpha=8)


def test_qwix_creates_no_adapter_on_this_decoder():
    """What we measured before writing our own: qwix's LoRA intercepts an einsum whose right operand is a
    module parameter; ours run on cast slices of stacked weights inside lax.scan, so nothing matches."""
    qwix = pytest.importorskip("qwix")
    model = _model("llama")
    rule = qwix.LoraRule(module_path=".*", rank=4, alpha=8.0)
    lora = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]), TOKENS, POSITIONS, rngs=nnx.Rngs(0))
    created = [path for path, _ in nnx.to_flat_state(nnx.state(lora)) if "lora" in "/".join(map(str, path))]
    assert created == []


def test_adapter_gradients_are_those_of_y_plus_delta():
    """The bitwise-at-init add (plus_delta) has the gradient of the plain sum: B gets x A's gradient at
    B = 0, A none yet (its gradient is B-weighted)."""
    import jax

    from pf_jax.models.lora import delta, plus_delta

    rng = np.random.default_rng(4)
    spec = LoraSpec(rank=3, alpha=6)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(2, 5, 4, 2)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(2, 5, 4, 2)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    for b in (jnp.zeros((3, 4, 2)), jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float32)):
        loss = lambda a, b, add: jnp.sum((add(y, delta(spec, x, {"q_lora_a": a, "q_lora_b": b}, "q")) - target) ** 2)
        ours = jax.grad(loss, argnums=(0, 1))(a, b, plus_delta)
        plain = jax.grad(loss, argnums=(0, 1))(a, b, lambda u, v: u + v)
        for g, want in zip(ours, plain):
            np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6, atol=1e-6)
        assert float(jnp.abs(ours[1]).sum()) > 0


@pytest.mark.parametrize(("qtype", "group"), [("int8", 64), ("int4", 16), ("nf4", 16)])
def test_quantised_base_is_within_the_quantiser_bound(qtype, group):
    from pf_jax.models.quantized import QuantSpec, compute_array, dequantization_bound, quantize_base

    model = _model("qwen2")
    full = {k: np.asarray(v) for k, v in model.layers.arrays().items()}
    quantize_base(model, QuantSpec(qtype, group))
    stored = model.layers.arrays()
    for name in ("q", "o", "gate", "down"):
        q = stored[name]
        err = np.abs(np.asarray(compute_array(q, jnp.float32)) - full[name])
        bound = np.asarray(dequantization_bound(q, qtype))
        slack = 4 * np.spacing(np.abs(full[name]).astype(np.float32))  # w / scale and back, in float32
        assert np.all(err <= bound + slack), (name, float(np.max(err / bound)))
        assert float(np.max(err)) > 0  # it is quantised
    assert stored["q_norm" if "q_norm" in stored else "attn_norm"].dtype == jnp.float32  # norms stay


def test_qlora_adapters_start_at_the_quantised_base_and_train():
    import jax

    from pf_jax.models.quantized import QuantSpec, quantize_base

    model = _model("gemma3")
    quantize_base(model, QuantSpec("nf4", 16))
    quantised = _logits(model)
    assert np.max(np.abs(quantised - _logits(_model("gemma3")))) > 1e-4
    add_adapters(model, LoraSpec(rank=2, alpha=4, targets=LoraSpec.resolve_targets(["all-linear"])), rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(_logits(model), quantised)
    graphdef, lora, base = nnx.split(model, LoraParam, nnx.Param)
    loss = lambda lora: jnp.mean(nnx.merge(graphdef, lora, base)(TOKENS, POSITIONS)[0] ** 2)
    grads = jax.grad(loss)(lora)
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))
    np.testing.assert_allclose(_logits(merged_model(model)), _logits(model), atol=1e-5)
