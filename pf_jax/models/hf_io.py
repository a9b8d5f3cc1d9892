"""Hugging Face weights in and out: config.json + (sharded) safetensors <-> Decoder. Never unpickles.

An export also writes SHA256SUMS (the `sha256sum -c` format) with the digest of its weights file; a
directory that has one is loaded only if its weights match it. Every tensor loaded must be finite.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from pf_jax.config.errors import RunStorageError
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.models.errors import (
    MissingTensorError,
    ModelInputError,
    NonFiniteWeightsError,
    TensorShapeError,
    WeightsFileError,
)
from pf_jax.models.weight_digests import verify_weight_digests, write_weight_digests

_PHASE = logging.getLogger("pf_jax.phase")  # what a CLI shows while it starts (pf_jax.phases)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
IN_MEMORY = "<in-memory tensors>"


def check_safetensors_file(path: Path) -> dict:
    """Parse the header of a .safetensors file and check the file holds every byte it promises.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
    then the data. Raises WeightsFileError naming the file when missing, truncated or malformed.
    """
    if not path.is_file():
        raise WeightsFileError(f"weights file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsFileError(f"safetensors file {path} is truncated: {size} bytes, no header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise WeightsFileError(f"safetensors file {path} is truncated: header of {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsFileError(f"safetensors file {path} has a malformed header: {e}") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"safetensors file {path} has a malformed header: expected a JSON object, "
                               f"got {type(header).__name__}")
    end = max((_data_end(path, k, v) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsFileError(
            f"safetensors file {path} is truncated: tensors need {8 + n + end} bytes, file has {size}"
        )
    return header


def _data_end(path: Path, name: str, entry: object) -> int:
    """Where tensor `name`'s bytes end, after checking its header entry has a dtype, a shape and offsets."""
    ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
          and isinstance(entry.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
          and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
          and all(isinstance(o, int) for o in entry["data_offsets"])
          and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1])
    if not ok:
        raise WeightsFileError(f"safetensors file {path} has a malformed header entry for tensor {name!r}: "
                               f"expected {{dtype, shape: [ints], data_offsets: [begin, end]}}, got {entry!r:.200}")
    return entry["data_offsets"][1]


class SafetensorsTensors(Mapping):
    """Read-only {tensor name: np.ndarray} over one or more safetensors files, read lazily (mmapped)."""

    def __init__(self, files: list[Path]):
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            for name, info in check_safetensors_file(path).items():
                if name != "__metadata__":
                    self._file_of[name] = path
                    self._shapes[name] = tuple(info["shape"])
        self._handles: dict[Path, object] = {}

    def location(self, name: str) -> str:
        """The file a tensor lives in (or the directory's files, for a missing tensor)."""
        if name in self._file_of:
            return str(self._file_of[name])
        return ", ".join(sorted({str(p) for p in self._file_of.values()})) or "<no files>"

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._file_of[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="np")
            return self._handles[path].get_tensor(name)
        except Exception as e:  # safetensors' own checks (dtype, overlapping offsets) raise its error type
            raise WeightsFileError(f"safetensors file {path}: tensor {name!r} cannot be read: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _layer_table(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], Callable, Callable]]:
    """our stacked name -> (HF suffix in model.layers.{i}., HF shape, hf_to_ours, ours_to_hf)."""
    D, H, K, Dh, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    same = lambda w: w
    def linear_in(heads):  # HF [heads*Dh, D] (out, in) -> ours [D, heads, Dh]
        return (lambda w: w.T.reshape(D, heads, Dh)), (lambda w: w.reshape(D, heads * Dh).T)
    table = {
        "attn_norm": ("input_layernorm.weight", (D,), same, same),
        "q": ("self_attn.q_proj.weight", (H * Dh, D), *linear_in(H)),
        "k": ("self_attn.k_proj.weight", (K * Dh, D), *linear_in(K)),
        "v": ("self_attn.v_proj.weight", (K * Dh, D), *linear_in(K)),
        "o": ("self_attn.o_proj.weight", (D, H * Dh), lambda w: w.T.reshape(H, Dh, D),
              lambda w: w.reshape(H * Dh, D).T),
        "gate": ("mlp.gate_proj.weight", (F, D), lambda w: w.T, lambda w: w.T),
        "up": ("mlp.up_proj.weight", (F, D), lambda w: w.T, lambda w: w.T),
        "down": ("mlp.down_proj.weight", (D, F), lambda w: w.T, lambda w: w.T),
    }
    if cfg.attention_bias:
        for name, heads in (("q", H), ("k", K), ("v", K)):
            table[f"{name}_bias"] = (f"self_attn.{name}_proj.bias", (heads * Dh,),
                                     lambda w, h=heads: w.reshape(h, Dh), lambda w: w.reshape(-1))
    if cfg.qk_norm:
        table["q_norm"] = ("self_attn.q_norm.weight", (Dh,), same, same)
        table["k_norm"] = ("self_attn.k_norm.weight", (Dh,), same, same)
    if cfg.sandwich_norm:
        table["post_attn_norm"] = ("post_attention_layernorm.weight", (D,), same, same)
        table["mlp_norm"] = ("pre_feedforward_layernorm.weight", (D,), same, same)
        table["post_mlp_norm"] = ("post_feedforward_layernorm.weight", (D,), same, same)
    else:
        table["mlp_norm"] = ("post_attention_layernorm.weight", (D,), same, same)
    return table


def _fetch(tensors: Mapping[str, np.ndarray], name: str, expected: tuple[int, ...]) -> np.ndarray:
    where = tensors.location(name) if hasattr(tensors, "location") else IN_MEMORY
    if name not in tensors:
        raise MissingTensorError(f"tensor {name!r} (shape {expected}) is missing from {where}")
    shape = tensors.shape(name) if hasattr(tensors, "shape") else tuple(np.shape(tensors[name]))
    if tuple(shape) != tuple(expected):
        raise TensorShapeError(f"tensor {name!r} in {where}: expected shape {expected}, got {tuple(shape)}")
    array = np.asarray(tensors[name])
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteWeightsError(f"tensor {name!r} in {where} holds {bad} NaN or inf value(s) of "
                                    f"{np.size(array)}: these weights cannot be trained or sampled from")
    return array


def model_config_from_hf(hf_config: object, source: str = "<config dict>") -> ModelConfig:
    """ModelConfig.from_hf, with any missing or ill-typed key reported as a WeightsFileError naming `source`."""
    if not isinstance(hf_config, dict):
        raise WeightsFileError(f"config {source} must hold a JSON object, got {type(hf_config).__name__}")
    try:
        return ModelConfig.from_hf(hf_config)
    except ModelInputError:
        raise
    except KeyError as e:
        raise WeightsFileError(f"config {source} lacks the key {e}, which a {hf_config.get('model_type')} "
                               "model needs") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise WeightsFileError(f"config {source} has a value of the wrong type or range: {e}") from None


def model_from_hf_tensors(hf_config: dict, tensors: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                          param_dtype=jnp.float32, scan_layers: bool = True,
                          config_source: str = "<config dict>") -> Decoder:
    """A Decoder whose parameters are the HF-named tensors (model.layers.0.self_attn.q_proj.weight, ...)
    converted to our layout; nothing is randomly initialised first. A NaN or inf tensor is refused
    (NonFiniteWeightsError naming it)."""
    cfg = model_config_from_hf(hf_config, config_source)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                              scan_layers=scan_layers))
    np_dtype = np.dtype(jnp.dtype(param_dtype))
    V, D = cfg.vocab_size, cfg.hidden_size

    def put(var: nnx.Param, array: np.ndarray) -> None:
        var.set_value(jnp.asarray(array.astype(np_dtype, copy=False)))

    put(abstract.embed, _fetch(tensors, "model.embed_tokens.weight", (V, D)))
    put(abstract.final_norm, _fetch(tensors, "model.norm.weight", (D,)))
    if not cfg.tie_embeddings:
        put(abstract.lm_head_weight, _fetch(tensors, "lm_head.weight", (V, D)))
    for ours, (suffix, shape, to_ours, _) in _layer_table(cfg).items():
        stacked = np.stack([
            to_ours(_fetch(tensors, f"model.layers.{i}.{suffix}", shape)).astype(np_dtype, copy=False)
            for i in range(cfg.num_layers)
        ])
        if scan_layers:
            put(getattr(abstract.layers, ours), stacked)
        else:
            for i, layer in enumerate(abstract.layers):
                put(getattr(layer, ours), stacked[i : i + 1])
    return abstract


def model_to_hf_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """The inverse of model_from_hf_tensors: HF-named numpy arrays in the parameters' storage dtype."""
    cfg = model.cfg
    out = {"model.embed_tokens.weight": np.asarray(model.embed[...]),
           "model.norm.weight": np.asarray(model.final_norm[...])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(model.lm_head_weight[...])
    arrays = model.stacked_layer_arrays()
    for ours, (suffix, _, _, to_hf) in _layer_table(cfg).items():
        stacked = np.asarray(arrays[ours])
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(to_hf(stacked[i]))
    return out


def _resolve_directory(path_or_hub_name: str | os.PathLike) -> Path:
    path = Path(path_or_hub_name).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_name)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise WeightsFileError(f"model directory not found: {path}")
    try:  # a hub name such as "Qwen/Qwen2.5-0.5B": safetensors and config only, never pickles
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors", INDEX_FILE]))
    except Exception as e:  # offline, unknown repo, no permission: say which name failed and why
        raise WeightsFileError(f"{name!r} is not a local directory and could not be fetched from the hub: {e}") from e


def load_hf_directory(path_or_hub_name: str | os.PathLike, *, dtype=jnp.float32,
                      param_dtype=jnp.float32, scan_layers: bool = True) -> Decoder:
    """Load config.json + model.safetensors (or the shards named by model.safetensors.index.json)."""
    directory = _resolve_directory(path_or_hub_name)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightsFileError(f"config file not found: {config_path}")
    try:
        hf_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsFileError(f"config file {config_path} is not valid JSON: {e}") from None
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        files = _indexed_files(index_path)
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = f" (found {pickles}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
        raise WeightsFileError(f"weights file not found: {directory / SINGLE_FILE} or {index_path}{hint}")
    _PHASE.info("loading weights from %s", directory)
    verify_weight_digests(directory, files)
    return model_from_hf_tensors(hf_config, SafetensorsTensors(files), dtype=dtype, param_dtype=param_dtype,
                                 scan_layers=scan_layers, config_source=str(config_path))


def _indexed_files(index_path: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names; each must lie inside the index's directory."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise WeightsFileError(f"index file {index_path} has no valid 'weight_map': {e}") from None
    directory = index_path.parent.resolve()
    files = []
    for name in names:
        if not isinstance(name, str) or not (directory / name).resolve().is_relative_to(directory):
            raise WeightsFileError(f"index file {index_path} names the shard {name!r}, which is not a file "
                                   f"inside {directory}: shards are loaded from the model directory only")
        files.append(index_path.parent / name)
    return files


def export_hf_directory(model: Decoder, path: str | os.PathLike) -> None:
    """Write config.json + model.safetensors (+ SHA256SUMS) that transformers' AutoModelForCausalLM loads
    unchanged; config.json comes last, so a directory that has one is complete. RunStorageError names the
    directory when it cannot be written."""
    directory = Path(path)
    try:
        _write_export(model, directory)
    except OSError as error:
        raise RunStorageError(f"cannot write the exported weights to {directory}: {error.strerror or error}",
                              hint="free space or make it writable, then rerun the same command") from None


def _write_export(model: Decoder, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = model.cfg.to_hf()
    config["dtype"] = {jnp.dtype(jnp.bfloat16): "bfloat16", jnp.dtype(jnp.float16): "float16"}.get(
        jnp.dtype(model.param_dtype), "float32")
    config["torch_dtype"] = config["dtype"]  # the name transformers 4.x and vLLM read
    tensors = jax.device_get(model_to_hf_tensors(model))
    bad = next((name for name, array in tensors.items() if not np.isfinite(array).all()), None)
    if bad is not None:  # a model that cannot be served is never written (the run's checkpoints remain)
        raise NonFiniteWeightsError(f"not exporting to {directory}: tensor {bad!r} holds NaN or inf values")
    save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    write_weight_digests(directory, [directory / SINGLE_FILE])
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # safetensors creates its file 0600; the export is read by servers running as other users like its config
    os.chmod(directory / SINGLE_FILE, (directory / "config.json").stat().st_mode & 0o777)
