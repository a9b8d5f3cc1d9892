"""LoRA adapters as PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors` with PEFT's
tensor names, so `peft.PeftModel.from_pretrained(transformers_model, dir)` loads ours and we load PEFT's.

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]    ours A [L, in..., r]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]   ours B [L, r, out...]
    base_model.model.model.embed_tokens.lora_embedding_A               [r, V]     ours A [V, r]
    base_model.model.model.embed_tokens.lora_embedding_B               [D, r]     ours B [r, D]

The in / out dims flatten in the same order as the base weights' (pf_jax.models.hf_io), so no permutation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from pf_jax.models.errors import ModelInputError, TensorShapeError, WeightsFileError
from pf_jax.models.lora import EMBEDDING, PROJECTIONS, LoraSpec, add_adapters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model."
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _layer_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    arrays = {k: np.asarray(v, np.float32) for k, v in model.stacked_layer_arrays().items()}
    out = {}
    for name in model.lora.projections:
        a, b = arrays[f"{name}_lora_a"], arrays[f"{name}_lora_b"]
        r = model.lora.rank
        for i in range(a.shape[0]):
            stem = f"{PREFIX}layers.{i}.{MODULES[name]}"
            out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's adapters as PEFT names them (float32)."""
    out = _layer_tensors(model)
    if EMBEDDING in model.lora.targets:
        out[f"{PREFIX}embed_tokens.lora_embedding_A"] = np.ascontiguousarray(np.asarray(model.embed_lora_a[...]).T)
        out[f"{PREFIX}embed_tokens.lora_embedding_B"] = np.ascontiguousarray(np.asarray(model.embed_lora_b[...]).T)
    return out


def adapter_config(spec: LoraSpec, base_model_name_or_path: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": sorted(spec.targets), "bias": "none",
        "base_model_name_or_path": base_model_name_or_path, "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": spec.init if spec.init == "gaussian" else True,
        "modules_to_save": None, "inference_mode": True,
    }


def save_peft_adapter(model: nnx.Module, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter directory; `base_model_name_or_path`: the base's HF
    directory or hub name, recorded in the config as PEFT does."""
    if model.lora is None:
        raise ModelInputError("this model has no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = adapter_config(model.lora, base_model_name_or_path)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def peft_spec(config: dict[str, Any], source: Path) -> LoraSpec:
    """The LoraSpec of a PEFT adapter_config.json (LoRA only: no DoRA, rsLoRA, bias or rank patterns)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelInputError(f"{source}: peft_type {config.get('peft_type')!r} is not LoRA")
    unsupported = [k for k in ("use_dora", "use_rslora") if config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise ModelInputError(f"{source}: PEFT options {unsupported} are not supported")
    targets = config["target_modules"]
    targets = ["all-linear"] if targets == "all-linear" else list(targets)
    return LoraSpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                    dropout=float(config.get("lora_dropout") or 0.0),
                    targets=LoraSpec.resolve_targets(targets))


def load_peft_adapter(model: nnx.Module, directory: str | Path, *, dropout: float | None = None) -> nnx.Module:
    """Give `model` (a Decoder without adapters) the adapters of a PEFT adapter directory, in place. A tensor
    of another architecture or shape is a TensorShapeError naming it."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise WeightsFileError(f"{directory} is not a PEFT adapter directory: {name} is missing")
    spec = peft_spec(json.loads((directory / CONFIG_FILE).read_text()), directory / CONFIG_FILE)
    if dropout is not None:
        spec = LoraSpec(spec.rank, spec.alpha, dropout, spec.targets, spec.init)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    add_adapters(model, spec, rngs=nnx.Rngs(0), dtype=model.param_dtype)
    _check_names(model, tensors, directory / WEIGHTS_FILE)
    _set_layers(model, tensors, directory / WEIGHTS_FILE)
    if EMBEDDING in spec.targets:
        a, b = tensors[f"{PREFIX}embed_tokens.lora_embedding_A"], tensors[f"{PREFIX}embed_tokens.lora_embedding_B"]
        _put(model.embed_lora_a, a.T, f"{PREFIX}embed_tokens.lora_embedding_A", directory)
        _put(model.embed_lora_b, b.T, f"{PREFIX}embed_tokens.lora_embedding_B", directory)
    return model


def _check_names(model: nnx.Module, tensors: dict[str, np.ndarray], source: Path) -> None:
    expected = set(adapter_tensors(model))
    missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unknown:
        raise TensorShapeError(f"{source} does not fit this {model.cfg.architecture} model ({model.cfg.num_layers} "
                               f"layers): missing {missing[:3]}, unexpected {unknown[:3]}")


def _put(var: nnx.Variable, value: np.ndarray, name: str, source: Path) -> None:
    if tuple(value.shape) != tuple(var.shape):
        raise TensorShapeError(f"{source}: tensor {name} has shape {tuple(value.shape)} where this model's "
                               f"adapter needs {tuple(var.shape)}")
    var.set_value(jnp.asarray(value, var[...].dtype))


def _set_layers(model: nnx.Module, tensors: dict[str, np.ndarray], source: Path) -> None:
    spec, stacked = model.lora, model.stacked_layer_arrays()
    layers = [model.layers] if model.scan_layers else list(model.layers)
    for name in spec.projections:
        a_shape, b_shape = stacked[f"{name}_lora_a"].shape[1:], stacked[f"{name}_lora_b"].shape[1:]
        a, b = [], []
        for i in range(model.cfg.num_layers):
            stem = f"{PREFIX}layers.{i}.{MODULES[name]}"
            ta, tb = tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"]
            if ta.shape != (spec.rank, math.prod(a_shape[:-1])) or tb.shape != (math.prod(b_shape[1:]), spec.rank):
                raise TensorShapeError(f"{source}: {stem}.lora_A/B have shapes {ta.shape} / {tb.shape}; this model's "
                                       f"{name} adapter needs {(spec.rank, math.prod(a_shape[:-1]))} / "
                                       f"{(math.prod(b_shape[1:]), spec.rank)}")
            a.append(ta.T.reshape(a_shape))
            b.append(tb.T.reshape(b_shape))
        a, b = np.stack(a), np.stack(b)
        for i, layer in enumerate(layers):
            rows = slice(None) if model.scan_layers else slice(i, i + 1)
            getattr(layer, f"{name}_lora_a").set_value(jnp.asarray(a[rows], model.param_dtype))
            getattr(layer, f"{name}_lora_b").set_value(jnp.asarray(b[rows], model.param_dtype))


__all__ = ["PROJECTIONS", "adapter_config", "adapter_tensors", "load_peft_adapter", "save_peft_adapter"]
