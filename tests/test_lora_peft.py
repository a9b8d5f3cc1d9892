"""PEFT round trips on tiny random Llama 3, Qwen2, Qwen3 and Gemma 3 models: our adapter directory loaded by
the real `peft` onto the transformers model gives the same next-token log-probs as pf_jax with the
adapters, and an adapter made by `peft` loads into pf_jax and gives the same log-probs (float32, 1e-4 as
the base models' parity tests)."""

import json

import numpy as np
import pytest
import torch
from flax import nnx

from pf_jax.models.errors import TensorShapeError, WeightsFileError
from pf_jax.models.hf_io import load_hf_directory
from pf_jax.models.lora import LoraParam, LoraSpec, add_adapters, merged_model
from pf_jax.models.peft_io import load_peft_adapter, save_peft_adapter
from tests.test_models_hf_parity import (
    HF_CONFIGS,
    hf_log_softmax,
    make_hf_model,
    our_log_softmax,
    padded_batch,
)

peft = pytest.importorskip("peft")
TOLERANCE = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def base(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    make_hf_model(arch).save_pretrained(path, safe_serialization=True)
    return arch, path


def _trained_looking(model, seed=5):
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, LoraParam):
            var.set_value(var[...] + 0.05 * rng.normal(size=var.shape).astype(np.float32))


def _peft_model(path, adapter=None, config=None):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                           torch_dtype=torch.float32)
    if adapter is not None:
        return peft.PeftModel.from_pretrained(hf, adapter).eval()
    torch.manual_seed(7)
    model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_peft_loads_our_adapter(base, tmp_path):
    _, path = base
    ours = load_hf_directory(path)
    add_adapters(ours, LoraSpec(rank=4, alpha=8, targets=tuple(TARGETS)), rngs=nnx.Rngs(1))
    _trained_looking(ours)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path) and config["r"] == 4
    tokens, mask = padded_batch()
    want = hf_log_softmax(_peft_model(path, tmp_path / "adapter"), tokens, mask)
    got = our_log_softmax(ours, tokens, mask)
    np.testing.assert_allclose(got[mask], want[mask], atol=TOLERANCE)
    base_lp = our_log_softmax(load_hf_directory(path), tokens, mask)
    assert np.max(np.abs(base_lp[mask] - want[mask])) > 10 * TOLERANCE  # the adapters change the model


def test_we_load_an_adapter_made_by_peft(base, tmp_path):
    _, path = base
    config = peft.LoraConfig(r=3, lora_alpha=12, target_modules=TARGETS, lora_dropout=0.0)
    model = _peft_model(path, config=config)
    model.save_pretrained(tmp_path / "peft")
    tokens, mask = padded_batch()
    want = hf_log_softmax(model, tokens, mask)
    ours = load_peft_adapter(load_hf_directory(path), tmp_path / "peft")
    assert ours.lora.rank == 3 and ours.lora.scale == 4.0
    np.testing.assert_allclose(our_log_softmax(ours, tokens, mask)[mask], want[mask], atol=TOLERANCE)
    merged = merged_model(ours)  # and the merged weights give the same
    np.testing.assert_allclose(our_log_softmax(merged, tokens, mask)[mask], want[mask], atol=TOLERANCE)


def test_an_adapter_for_another_shape_names_the_tensor(tmp_path):
    small = tmp_path / "small"
    make_hf_model("qwen2").save_pretrained(small, safe_serialization=True)
    ours = load_hf_directory(small)
    add_adapters(ours, LoraSpec(rank=2, alpha=2, targets=("q_proj",)), rngs=nnx.Rngs(1))
    save_peft_adapter(ours, tmp_path / "adapter")
    other = tmp_path / "other"
    make_hf_model("qwen3").save_pretrained(other, safe_serialization=True)  # head_dim 16: q_proj is 64 wide
    with pytest.raises(TensorShapeError, match=r"layers\.0\.self_attn\.q_proj\.lora_A/B have shapes"):
        load_peft_adapter(load_hf_directory(other), tmp_path / "adapter")
    with pytest.raises(WeightsFileError, match=r"adapter_config\.json is missing"):
        load_peft_adapter(load_hf_directory(small), tmp_path)
