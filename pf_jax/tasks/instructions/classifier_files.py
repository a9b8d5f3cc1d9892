"""The constraint classifier as files: backbone (HF safetensors + config.json), tokenizer, head
(safetensors) and the classifier's config; loaded back as the soft scorer of `InstructionReward`.

    <dir>/config.json, model.safetensors          the backbone Decoder (pf_jax.models.hf_io)
    <dir>/<tokenizer files>                       the codec (pf_jax.data.codec.load_codec)
    <dir>/constraint_classifier_head.safetensors  ConstraintClassifierHead: hidden.{kernel,bias}, out.{kernel,bias}
    <dir>/constraint_classifier.json              {"hidden_dim", "mlp_dim", "max_length", "input_format"}

Texts are encoded the same way in training (`encode_classifier_texts`) and in scoring, so the loaded
scorer gives the probabilities the trained modules give.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from pf_jax.data.codec import TextCodec
from pf_jax.data.saved_codec import load_codec
from pf_jax.data.sequences import bucket_length
from pf_jax.models.decoder import Decoder
from pf_jax.models.hf_io import export_hf_directory, load_hf_directory
from pf_jax.tasks.instructions.classifier import (
    ConstraintClassifierHead,
    SoftScorer,
    TextEncoder,
    format_classifier_input,
    make_soft_scorer,
)

HEAD_FILE = "constraint_classifier_head.safetensors"
CONFIG_FILE = "constraint_classifier.json"
INPUT_FORMAT = format_classifier_input("{response}", "{constraint}")
_HEAD_KEYS = ("hidden.kernel", "hidden.bias", "out.kernel", "out.bias")


def classifier_length_bucket(n: int, max_length: int) -> int:
    """Padded length of a batch whose longest text has n tokens: its bucket (the next power of two >=
    max(n, 8)), capped at max_length (few distinct shapes, so few compilations)."""
    return min(bucket_length(n), max_length)


def encode_classifier_texts(codec: TextCodec, texts: Sequence[str], max_length: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids [B, T] (int32) and validity mask [B, T] (bool); each text is the codec's
    prompt encoding (BOS + tokens) cut to its first `max_length` tokens."""
    ids = [codec.encode_prompt(t)[:max_length] for t in texts]
    T = classifier_length_bucket(max(map(len, ids), default=1), max_length)
    tokens = np.full((len(ids), T), codec.pad_id, np.int32)
    mask = np.zeros((len(ids), T), bool)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = True
    return tokens, mask


def backbone_hidden(model: Decoder, tokens: jax.Array, mask: jax.Array) -> jax.Array:  # [B,T] -> [B,T,D]
    """The backbone's final hidden states of right-padded texts (positions 0..T-1)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, _ = model(tokens, positions, mask)
    return hidden


@functools.partial(jax.jit, static_argnames="graphdef")
def _encode(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return backbone_hidden(nnx.merge(graphdef, params), tokens, mask)


def text_encoder(model: Decoder, codec: TextCodec, max_length: int) -> TextEncoder:
    """texts -> (hidden [B, T, D], mask [B, T]) through the backbone, compiled once per length bucket."""
    graphdef, params = nnx.split(model)

    def encode(texts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        tokens, mask = encode_classifier_texts(codec, texts, max_length)
        return _encode(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask)), jnp.asarray(mask)

    return encode


def save_constraint_classifier(directory: str | Path, backbone: Decoder, head: ConstraintClassifierHead,
                               codec: TextCodec, max_length: int) -> Path:
    """Write backbone, tokenizer, head and config to `directory` (created)."""
    directory = Path(directory)
    export_hf_directory(backbone, directory)
    codec.save(directory)
    arrays = {"hidden.kernel": head.hidden.kernel[...], "hidden.bias": head.hidden.bias[...],
              "out.kernel": head.out.kernel[...], "out.bias": head.out.bias[...]}
    save_file({k: np.asarray(jax.device_get(v), np.float32) for k, v in arrays.items()}, str(directory / HEAD_FILE))
    hidden_dim, mlp_dim = np.shape(arrays["hidden.kernel"])
    (directory / CONFIG_FILE).write_text(json.dumps({
        "hidden_dim": int(hidden_dim), "mlp_dim": int(mlp_dim), "max_length": int(max_length),
        "input_format": INPUT_FORMAT}, indent=2) + "\n")
    return directory


def load_constraint_classifier(directory: str | Path) -> tuple[Decoder, ConstraintClassifierHead, TextCodec, int]:
    """(backbone, head, codec, max_length) saved by `save_constraint_classifier`; a missing or mismatched
    file is a FileNotFoundError / ValueError naming it."""
    directory = Path(directory)
    for name in (CONFIG_FILE, HEAD_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a constraint classifier export: {name} is missing")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("input_format", INPUT_FORMAT) != INPUT_FORMAT:
        raise ValueError(f"{directory / CONFIG_FILE}: input_format {config['input_format']!r}, expected {INPUT_FORMAT!r}")
    tensors = load_file(str(directory / HEAD_FILE))
    D, M = int(config["hidden_dim"]), int(config["mlp_dim"])
    expected = {"hidden.kernel": (D, M), "hidden.bias": (M,), "out.kernel": (M, 1), "out.bias": (1,)}
    for key in _HEAD_KEYS:
        if key not in tensors or tensors[key].shape != expected[key]:
            got = tensors[key].shape if key in tensors else "missing"
            raise ValueError(f"{directory / HEAD_FILE}: tensor {key!r} is {got}, expected shape {expected[key]}")
    head = ConstraintClassifierHead(D, M, rngs=nnx.Rngs(0))
    head.hidden.kernel[...] = jnp.asarray(tensors["hidden.kernel"])
    head.hidden.bias[...] = jnp.asarray(tensors["hidden.bias"])
    head.out.kernel[...] = jnp.asarray(tensors["out.kernel"])
    head.out.bias[...] = jnp.asarray(tensors["out.bias"])
    backbone = load_hf_directory(directory)
    if backbone.cfg.hidden_size != D:
        raise ValueError(f"{directory}: backbone hidden size {backbone.cfg.hidden_size} but head expects {D}")
    codec = load_codec(directory, eos_ids=backbone.cfg.eos_token_ids)
    return backbone, head, codec, int(config["max_length"])


def load_soft_scorer(directory: str | Path, batch_size: int = 16) -> SoftScorer:
    """The exported classifier as a soft scorer: (responses, constraint texts) -> P(adheres) [N]."""
    backbone, head, codec, max_length = load_constraint_classifier(directory)
    return make_soft_scorer(text_encoder(backbone, codec, max_length), head, batch_size=batch_size)
