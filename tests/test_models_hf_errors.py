"""Bad weights input gets a named exception whose message names the file, tensor and expectation."""

import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.models.errors import (
    MissingTensorError,
    NonFiniteWeightsError,
    TensorShapeError,
    UnsupportedArchitectureError,
    WeightsFileError,
)
from pf_jax.models.hf_io import export_hf_directory, load_hf_directory, model_from_hf_tensors


@pytest.fixture
def exported(tmp_path):
    """A valid tiny qwen2 HF directory written by us (its loading is checked against transformers elsewhere),
    without its SHA256SUMS: the damage below is then met by the checks a third-party directory gets."""
    model = Decoder(ModelConfig.tiny("qwen2"), rngs=nnx.Rngs(0))
    export_hf_directory(model, tmp_path)
    assert load_hf_directory(tmp_path).cfg == model.cfg
    (tmp_path / "SHA256SUMS").unlink()
    return tmp_path


def read_tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("model_type", ["mistral", "gemma3", None])
def test_unsupported_architecture_names_the_supported_ones(exported, model_type):
    config = json.loads((exported / "config.json").read_text())
    config["model_type"] = model_type
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_hf_directory(exported)
    for name in ("llama", "qwen2", "qwen3", "gemma3_text"):
        assert name in str(err.value)
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        ModelConfig.tiny("mistral")


def test_missing_config_names_the_path(exported):
    (exported / "config.json").unlink()
    with pytest.raises(WeightsFileError, match=str(exported / "config.json")):
        load_hf_directory(exported)


def test_missing_weights_names_the_path_and_never_reads_pickles(exported):
    (exported / "model.safetensors").unlink()
    (exported / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(WeightsFileError, match=r"model\.safetensors") as err:
        load_hf_directory(exported)
    assert "pytorch_model.bin" in str(err.value) and "pickle" in str(err.value)


def test_missing_directory_and_unreachable_hub_name(tmp_path):
    with pytest.raises(WeightsFileError, match="not found"):
        load_hf_directory(tmp_path / "nowhere" / "model")
    with pytest.raises(WeightsFileError, match="no-such-org/no-such-model"):
        load_hf_directory("no-such-org/no-such-model")  # tests run with HF_HUB_OFFLINE=1


@pytest.mark.parametrize("keep_bytes", [4, 20, -100])
def test_truncated_safetensors_names_the_file(exported, keep_bytes):
    path = exported / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    with pytest.raises(WeightsFileError, match="truncated") as err:
        load_hf_directory(exported)
    assert str(path) in str(err.value)


def test_missing_tensor_names_file_and_tensor(exported):
    tensors = read_tensors(exported)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(exported / "model.safetensors"))
    with pytest.raises(MissingTensorError) as err:
        load_hf_directory(exported)
    assert "model.layers.1.self_attn.k_proj.bias" in str(err.value)
    assert str(exported / "model.safetensors") in str(err.value)


def test_shape_mismatch_names_file_tensor_expected_and_got(exported):
    tensors = read_tensors(exported)
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)
    save_file(tensors, str(exported / "model.safetensors"))
    with pytest.raises(TensorShapeError) as err:
        load_hf_directory(exported)
    message = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in message and str(exported / "model.safetensors") in message
    assert "(128, 64)" in message and "(100, 64)" in message


def test_in_memory_tensors_errors():
    cfg = ModelConfig.tiny("llama")
    with pytest.raises(MissingTensorError, match=r"model\.embed_tokens\.weight"):
        model_from_hf_tensors(cfg.to_hf(), {})


def test_a_non_finite_model_is_never_exported(tmp_path):
    model = Decoder(ModelConfig.tiny("qwen2"), rngs=nnx.Rngs(0))
    model.final_norm[...] = model.final_norm[...].at[3].set(float("inf"))
    with pytest.raises(NonFiniteWeightsError, match=r"'model\.norm\.weight' holds NaN or inf"):
        export_hf_directory(model, tmp_path / "export")
    assert not (tmp_path / "export" / "model.safetensors").exists()


def test_exported_weights_carry_sha256sums_that_sha256sum_accepts(tmp_path):
    import shutil
    import subprocess

    export_hf_directory(Decoder(ModelConfig.tiny("llama"), rngs=nnx.Rngs(0)), tmp_path)
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True).returncode == 0
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match="does not match its digest in SHA256SUMS"):
        load_hf_directory(tmp_path)
