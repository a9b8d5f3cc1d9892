"""load_model: every kind of spec on tiny local files, and the errors for specs that cannot work here."""

from __future__ import annotations

import numpy as np
import pytest

from pf_jax.models.errors import WeightsFileError
from pf_jax.models.hf_io import export_hf_directory, model_to_hf_tensors
from pf_jax.models.registry import load_model
from tests.gguf_fixtures import tiny_hf_model, write_gguf

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tiny_hf_model("llama"), "llama",
                      tokenizer=True, chat_template=TEMPLATE)
    return path, cache


def test_gguf_path_gives_model_and_tokenizer_with_chat_template(tiny_gguf, monkeypatch):
    path, cache = tiny_gguf
    monkeypatch.setenv("PF_JAX_CACHE", str(cache))
    model, tokenizer = load_model(str(path))
    assert model.cfg.architecture == "llama" and model.cfg.vocab_size == 96
    ids = tokenizer("the cat sat on a mat")["input_ids"]
    assert ids[0] == 1 and max(ids) < model.cfg.vocab_size
    assert tokenizer.chat_template == TEMPLATE
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    assert list((cache / "tokenizers").iterdir())  # converted tokenizer cached by the file's sha256


def test_hf_directory_round_trip(tiny_gguf, tmp_path, monkeypatch):
    path, cache = tiny_gguf
    monkeypatch.setenv("PF_JAX_CACHE", str(cache))
    model, tokenizer = load_model(str(path))
    export_hf_directory(model, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tokenizer_again = load_model(str(tmp_path))
    assert again.cfg == model.cfg
    for name, value in model_to_hf_tensors(model).items():
        np.testing.assert_array_equal(model_to_hf_tensors(again)[name], value, err_msg=name)
    assert tokenizer_again("the cat")["input_ids"] == tokenizer("the cat")["input_ids"]


def test_unknown_alias_lists_aliases():
    with pytest.raises(ValueError, match=r"unknown model 'gemma3-27m'.*gemma3-270m"):
        load_model("gemma3-27m")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsFileError, match=r"'google/gemma-3-270m'.*offline.*gemma3-270m"):
        load_model("google/gemma-3-270m")


def test_missing_gguf_path_is_named(tmp_path):
    with pytest.raises(WeightsFileError, match=r"absent\.gguf.*does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_directory_without_tokenizer_is_named(tiny_gguf, tmp_path, monkeypatch):
    path, cache = tiny_gguf
    monkeypatch.setenv("PF_JAX_CACHE", str(cache))
    export_hf_directory(load_model(str(path))[0], tmp_path)
    with pytest.raises(WeightsFileError, match="tokenizer"):
        load_model(str(tmp_path))


def test_unscanned_layout_gives_same_logits(tiny_gguf, monkeypatch):
    import jax.numpy as jnp

    path, cache = tiny_gguf
    monkeypatch.setenv("PF_JAX_CACHE", str(cache))
    scanned, _ = load_model(str(path))
    unrolled, _ = load_model(str(path), scan_layers=False)
    assert not unrolled.scan_layers and scanned.scan_layers
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 7)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    a = scanned.logits(scanned(tokens, positions)[0])
    b = unrolled.logits(unrolled(tokens, positions)[0])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
