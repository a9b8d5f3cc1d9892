"""What makes a run's export directory servable beyond the weights (written after the objective's deliver):
the weights in export.dtype, generation_config.json with the run's end / pad ids and sampling settings,
and, when export.push_to_hub names a repo, the upload (skipped, with a message, when offline).

The chat template travels with the tokenizer files (tokenizer.save_pretrained writes it); config.json's
keys for transformers 4.x / vLLM are pf_jax.models.config.ModelConfig.to_hf's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pf_jax.config.errors import RunStorageError, UserError
from pf_jax.config.recipe import ExportSection, TrainConfig
from pf_jax.data.codec import TextCodec
from pf_jax.models.decoder import Decoder

GENERATION_CONFIG = "generation_config.json"


def with_param_dtype(model: Decoder, dtype: str | None) -> Decoder:
    """The model with its floating parameters stored in `dtype` (None or the same: the model itself)."""
    target = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32 if dtype == "float32" else None
    if target is None or jnp.dtype(model.param_dtype) == jnp.dtype(target):
        return model
    graphdef, state = nnx.split(model)
    cast = lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x
    out = nnx.merge(graphdef, jax.tree_util.tree_map(cast, state))
    out.param_dtype = target
    return out


def export_modules(modules: dict[str, nnx.Module], export: ExportSection) -> dict[str, nnx.Module]:
    """The modules to deliver, the policy in export.dtype."""
    policy = modules.get("policy")
    if not isinstance(policy, Decoder) or export.dtype is None:
        return modules
    return {**modules, "policy": with_param_dtype(policy, export.dtype)}


def generation_config(cfg: TrainConfig, codec: TextCodec) -> dict[str, Any]:
    """transformers' GenerationConfig as JSON: the ids that end a response (EOS and the chat template's
    end-of-turn token), BOS, pad, and the sampling the run used (rollout.*)."""
    r = cfg.rollout
    eos = list(codec.eos_ids)
    out: dict[str, Any] = {
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": codec.pad_id,
        "do_sample": r.temperature > 0,
        "max_new_tokens": r.max_new_tokens,
    }
    bos = getattr(codec, "bos_id", None)
    if bos is None:
        bos = getattr(getattr(codec, "tokenizer", None), "bos_token_id", None)
    if bos is not None:
        out["bos_token_id"] = int(bos)
    if r.temperature > 0:
        out.update(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        if r.min_p:
            out["min_p"] = r.min_p
    if r.stop:
        out["stop_strings"] = list(r.stop)
    return out


def finish_export(directory: Path, cfg: TrainConfig, codec: TextCodec) -> None:
    """generation_config.json beside the delivered weights (an HF policy export only), then the upload."""
    if not (directory / "config.json").is_file():
        return
    text = json.dumps(generation_config(cfg, codec), indent=2, sort_keys=True) + "\n"
    try:
        (directory / GENERATION_CONFIG).write_text(text)
    except OSError as error:
        raise RunStorageError(f"cannot write {directory / GENERATION_CONFIG}: {error.strerror or error}") from None
    if cfg.export.push_to_hub:
        push_to_hub(directory, cfg.export.push_to_hub)


def push_to_hub(directory: Path, repo_id: str) -> str | None:
    """Upload the export to the hub repo `repo_id` (created private if absent); the URL, or None when the
    hub is offline (said on stdout: the export itself is complete)."""
    from pf_jax.models.registry import hub_offline

    if hub_offline():
        print(f"[pf_jax] export.push_to_hub={repo_id}: skipped, the Hugging Face hub is offline (HF_HUB_OFFLINE); "
              f"the export is in {directory}; upload it later with: hf upload {repo_id} {directory}")
        return None
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=True, exist_ok=True)
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(directory)))
    except Exception as error:  # no token, no permission, no network: the run's export stays on disk
        raise UserError(f"export.push_to_hub={repo_id}: the upload failed ({type(error).__name__}: {error}); the "
                        f"export is complete in {directory}", hint="log in with `hf auth login`, or unset "
                        "export.push_to_hub") from None
