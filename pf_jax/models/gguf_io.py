"""Read a GGUF file (llama.cpp's format) into a Hugging Face config dict and HF-named float32 tensors.

Every tensor is dequantised with the `gguf` package to float32 numpy, renamed from llama.cpp's names
(`blk.N.attn_q.weight`) to transformers' names (`model.layers.N.self_attn.q_proj.weight`), and the
conversions llama.cpp's `convert_hf_to_gguf.py` applied are undone, following transformers' own GGUF
loader (`transformers/modeling_gguf_pytorch_utils.py`), which the tests compare against:

- llama: q and k projections were permuted per head from HF's rotate-half RoPE layout to the interleaved
  layout; `unpermute_rope_rows` reverses it.
- gemma3: every `*norm.weight` was stored as `w + 1` (llama.cpp multiplies by the weight, HF by `1 + w`);
  we subtract 1.
- llama 3 RoPE scaling is not stored as metadata but as a `rope_freqs` tensor of per-frequency divisors;
  we recover the HF `rope_scaling` dict from it and check that it reproduces the tensor.

No pickle is involved anywhere: GGUF is a flat header plus raw tensor bytes.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pf_jax.models.errors import UnsupportedArchitectureError, WeightsFileError

_PHASE = logging.getLogger("pf_jax.phase")  # what a CLI shows while it starts (pf_jax.phases)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

_HF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
_HF_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per block ("sandwich"): llama.cpp calls the pre-MLP norm ffn_norm.
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"([a-z_]+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str, architecture: str) -> str | None:
    """transformers' parameter name for a llama.cpp tensor name; None for tensors HF has no parameter for
    (`rope_freqs`, which becomes config). An unknown name raises ValueError naming it."""
    if gguf_name == "rope_freqs.weight":
        return None
    block_names = _GEMMA3_BLOCK_NAMES if architecture == "gemma3" else _BLOCK_NAMES
    if m := _BLOCK_TENSOR.fullmatch(gguf_name):
        layer, part, suffix = m.groups()
        if part in block_names:
            return f"model.layers.{layer}.{block_names[part]}.{suffix}"
    elif (m := _GLOBAL_TENSOR.fullmatch(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no known Hugging Face name for architecture {architecture!r}; "
        f"expected token_embd, output_norm, output, rope_freqs or blk.N.{{{', '.join(sorted(block_names))}}}"
    )


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute).

    llama.cpp stores row (h, j, i) of HF's (h, i, j) for a weight reshaped to [heads, 2, Dh/2, ...], i.e.
    it interleaves the two rotate-half halves; reshaping to [heads, Dh/2, 2, ...] and swapping axes 1, 2
    restores HF's order. weight: [heads * Dh, ...] (a matrix or a bias vector).
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot unpermute {rows} rows into {num_heads} heads of even size")
    w = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling (as llama.cpp writes `rope_freqs`), [head_dim / 2].

    freq_i = theta^(-2i/d), wavelen_i = 2 pi / freq_i; divisor = 1 if wavelen < L / high, factor if
    wavelen > L / low, else 1 / ((1 - s) / factor + s) with s = (L / wavelen - low) / (high - low), where L
    is the original context length (Llama 3.1 report, "RoPE scaling"; transformers' _compute_llama3_parameters).
    """
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    high_wavelen = original_max_position_embeddings / high_freq_factor
    low_wavelen = original_max_position_embeddings / low_freq_factor
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid)).astype(np.float32)


def _open_reader(path: Path):
    if not path.is_file():
        raise WeightsFileError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises assorted errors on a damaged header
        raise WeightsFileError(f"GGUF file {str(path)!r} could not be read ({type(err).__name__}: {err}); "
                            "is it a complete GGUF file?") from err
    size = os.path.getsize(path)
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise WeightsFileError(f"GGUF file {str(path)!r} is truncated: tensor {tensor.name!r} needs bytes up "
                                f"to {end} but the file has {size}")
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, float) and field.types == [gguf.GGUFValueType.FLOAT32]:
        # the shortest decimal that rounds to the stored float32: 1e-06, not 9.999999974752427e-07
        value = float(str(np.float32(value)))
    return value


def hf_config_from_gguf(reader, path: Path | str = "<gguf>") -> dict:
    """A transformers config.json dict built from a GGUFReader's metadata and tensor list."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF file {str(path)!r} has architecture {arch!r}; supported GGUF architectures are "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise WeightsFileError(f"GGUF file {str(path)!r} lacks metadata key '{arch}.{key}'")
        return value

    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise WeightsFileError(f"GGUF file {str(path)!r} lacks tensor 'token_embd.weight'")
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length")
                   or _field(reader, f"{arch}.rope.dimension_count") or hidden // heads)
    num_layers = int(need("block_count"))
    cfg: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURE[arch]],
        "model_type": _HF_MODEL_TYPE[arch],
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 8192)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "rope_scaling": None,
        "torch_dtype": "float32",
    }
    for gguf_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("padding_token_id", "pad_token_id")):
        value = _field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            cfg[hf_key] = int(value)
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise WeightsFileError(f"GGUF file {str(path)!r}: RoPE scaling type {scaling_type!r} is not "
                                   "supported (supported: linear, and llama3 via a rope_freqs tensor)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    if arch == "gemma3":
        cfg.update(_gemma3_config(reader, arch, cfg))
    else:
        cfg["hidden_act"] = "silu"
        cfg["attention_bias"] = "blk.0.attn_q.bias" in shapes
    return cfg


def _gemma3_config(reader, arch: str, cfg: dict) -> dict:
    """Gemma 3 keys llama.cpp does not store, filled the way llama.cpp's gemma3 graph hard-codes them."""
    num_layers = cfg["num_hidden_layers"]
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer converters: one bool per layer, True = sliding window
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:  # llama.cpp: hparams.set_swa_pattern(6): every 6th layer is global
        period = int(pattern) if pattern else 6
        layer_types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]
    # llama.cpp: f_attention_scale = 1/sqrt(n_embd / n_head) for the 27B model, else 1/sqrt(head_dim)
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if num_layers == 62 else cfg["head_dim"]
    softcap = _field(reader, f"{arch}.final_logit_softcapping")
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(_field(reader, f"{arch}.attention.sliding_window", 4096)),
        "layer_types": layer_types,
        "rope_local_base_freq": float(_field(reader, f"{arch}.rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": None if softcap is None else float(softcap),
        "attn_logit_softcapping": None,
        "attention_bias": False,
    }


def _rope_scaling_from_rope_freqs(factors: np.ndarray, cfg: dict, path: Path) -> dict:
    """Recover the HF llama3 `rope_scaling` dict from llama.cpp's `rope_freqs` tensor (checked exactly)."""
    factor = float(factors.max())
    # llama.cpp reads low/high/original from HF's config with these defaults; every Llama 3.x uses them.
    guess = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
    expected = llama3_rope_factors(cfg["head_dim"], cfg["rope_theta"], factor, 1.0, 4.0, 8192)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-5, atol=1e-6):
        raise WeightsFileError(f"GGUF file {str(path)!r}: tensor 'rope_freqs.weight' is not a Llama 3 RoPE scaling "
                            "with low_freq_factor=1, high_freq_factor=4, original context 8192")
    return guess


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config dict, {HF parameter name: float32 array}) for a GGUF file, conversions undone."""
    path = Path(path)
    reader = _open_reader(path)
    cfg = hf_config_from_gguf(reader, path)
    arch = _field(reader, "general.architecture")
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        try:
            name = hf_tensor_name(tensor.name, arch)
        except ValueError as err:
            raise WeightsFileError(f"GGUF file {str(path)!r}: {err}") from err
        weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if name is None:
            if arch != "llama":
                raise WeightsFileError(f"GGUF file {str(path)!r}: tensor {tensor.name!r} unexpected for {arch}")
            cfg["rope_scaling"] = _rope_scaling_from_rope_freqs(weight, cfg, path)
            continue
        if arch == "llama" and ".attn_q." in tensor.name:
            weight = unpermute_rope_rows(weight, cfg["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in tensor.name:
            weight = unpermute_rope_rows(weight, cfg["num_key_value_heads"])
        elif arch == "gemma3" and tensor.name.endswith("norm.weight"):
            weight = weight - np.float32(1.0)
        tensors[name] = weight
    return cfg, tensors


def load_gguf(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None, scan_layers: bool = True):
    """Decoder with the GGUF's weights (dequantised to float32, then cast to param_dtype)."""
    import jax.numpy as jnp

    from pf_jax.models.hf_io import model_from_hf_tensors

    cfg, tensors = read_gguf(path)
    return model_from_hf_tensors(cfg, tensors, dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32,
                                 scan_layers=scan_layers, config_source=f"read from GGUF file {str(path)!r}")


# Bump when read_gguf's output or the cache's layout changes, so stale dequantised caches are not served.
# 2: the cache holds SHA256SUMS, checked on every load (a v1 cache has none, so it is rebuilt once).
CONVERSION_VERSION = 2


def load_gguf_cached(path: str | os.PathLike, *, sha256: str, cache_dir: Path, dtype: Any = None,
                     param_dtype: Any = None, scan_layers: bool = True):
    """load_gguf through a cache of the dequantised float32 weights (config.json + model.safetensors).

    Parsing a GGUF (GGUFReader reads every vocabulary string) and dequantising take tens of seconds for
    Gemma 3 270M; the cached safetensors are memory-mapped in a few. The cache lives in
    `<cache_dir>/<sha256>-v<CONVERSION_VERSION>/`, written to a temporary directory and renamed, so it is
    either complete or absent. It holds 4 bytes per parameter: meant for small embedded models, not for
    arbitrary large GGUFs. sha256 must be the true hash of the file.
    """
    import json
    import shutil
    import tempfile

    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from pf_jax.models.hf_io import load_hf_directory, model_from_hf_tensors
    from pf_jax.models.weight_digests import write_weight_digests

    dtype, param_dtype = dtype or jnp.float32, param_dtype or jnp.float32
    cached = Path(cache_dir) / f"{sha256}-v{CONVERSION_VERSION}"
    if (cached / "config.json").is_file():
        return load_hf_directory(cached, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    _PHASE.info("dequantising the GGUF %s (first use; cached in %s)", Path(path).name, cached.parent)
    cfg, tensors = read_gguf(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=cached.name + ".", suffix=".part"))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(staging / "model.safetensors"))
        write_weight_digests(staging, [staging / "model.safetensors"])
        (staging / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")  # written last: marks complete
        try:
            os.rename(staging, cached)
        except OSError:  # another process finished first
            if not (cached / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_from_hf_tensors(cfg, tensors, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                                 config_source=f"read from GGUF file {str(path)!r}")
