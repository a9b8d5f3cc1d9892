"""`model:` section -> policy: options that must reach every kind of model source, not only `tiny`."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pf_jax.config import load_config
from pf_jax.config.recipe import ModelSection
from pf_jax.data.codec import CharCodec
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.models.hf_io import export_hf_directory
from pf_jax.models.logprobs import sequence_logprobs
from pf_jax.training.model_source import load_policy


def update_temp_bytes(model: Decoder, batch: int = 8, length: int = 256) -> int:
    """Temporary bytes of the compiled gradient of a teacher-forced NLL (what an update holds)."""
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((batch, length), jnp.int32)
    mask = jnp.ones((batch, length), bool)

    def loss(p):
        return -sequence_logprobs(nnx.merge(graphdef, p), tokens, mask).sum()

    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "model"
    codec = CharCodec()
    cfg = ModelConfig.tiny("llama", vocab_size=codec.vocab_size, hidden_size=64, intermediate_size=256,
                           num_layers=4)
    export_hf_directory(Decoder(cfg, rngs=nnx.Rngs(0)), path)
    codec.save(path)
    return path


def test_remat_reaches_a_loaded_model_and_shrinks_the_update(exported, tmp_path):
    """model.remat was applied to `tiny` models only: a loaded model (HF directory, GGUF, embedded alias)
    kept every layer's activations for the backward pass whatever the recipe said."""
    models = {}
    for remat in (False, True):
        section = load_config(ModelSection, None, [f"name={exported}", f"remat={str(remat).lower()}"])
        models[remat], _ = load_policy(section, runs_dir=tmp_path)
        assert models[remat].remat is remat
    plain, remat = update_temp_bytes(models[False]), update_temp_bytes(models[True])
    print(f"update temp bytes: {plain} without remat, {remat} with")
    assert remat < 0.6 * plain
