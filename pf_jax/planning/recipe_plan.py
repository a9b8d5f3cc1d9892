"""`python -m pf_jax.train --config X.yaml --dry-run [mesh.fsdp=64 ...]`: the recipe's per-device memory on
its mesh, built abstractly (no weights downloaded, no data read) by pf_jax.planning.memory_plan.

What the recipe decides, and how the plan reads it:
    model            the architecture only: `tiny` sizes, the arith-base recipe, a local HF / export
                     directory's config.json, a GGUF file's metadata (embedded aliases too), or for a hub
                     name `owner/Name` the shipped configs/models/<name lowercased>.json (offline), else
                     the hub's config.json when online
    mesh             (data, fsdp, tensor) and the logical-axis rules; a -1 axis is filled from this
                     machine's device count, so give every axis to plan another machine (mesh.fsdp=64)
    dtypes           model.param_dtype for the trained weights and for the reference (the trainer's
                     reference is a copy of the initial parameters), model.dtype for the sampler copy
    method           whether a reference model and a sampler (KV cache, sampler-layout copy) exist
    sizes            KV cache: rollout.prompts_per_step x samples_per_prompt sequences of
                     data.max_prompt_tokens + rollout.max_new_tokens slots; one update's batch: that
                     batch / rollout.minibatches / optimizer.grad_accum_steps (sampling methods) or
                     batch_size / grad_accum_steps, same length; agentic methods: env.tasks_per_step x
                     group_size episodes in the sampler, tasks x group x max_steps step rows (bucketed by
                     min_row_bucket) per update, each turn's prompt bounded by data.max_prompt_tokens (the
                     rollout stops with PromptTooLongError beyond it)
The compiled step's temporary memory is reported when this process sees at least the mesh's device count
(e.g. XLA_FLAGS=--xla_force_host_platform_device_count=64 JAX_PLATFORMS=cpu).
With `--topology v5p:4x4x4` every program the recipe runs (train step, scoring passes, sampler prefill and
decode) is compiled by XLA's TPU compiler for that slice instead, on this host (pf_jax.planning.compiled_plan).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from pf_jax.config import ConfigError
from pf_jax.config.recipe import CONFIGS_DIR, ModelSection, TrainConfig
from pf_jax.data.sequences import bucket_length
from pf_jax.methods.compose import compose
from pf_jax.models.config import ModelConfig
from pf_jax.planning.memory_plan import MemoryPlan, plan_memory
from pf_jax.training.async_rollouts import parameter_versions
from pf_jax.training.model_source import (
    BUILT_IN_BASES,
    built_in_base_directory,
    tiny_model_config,
)

MODEL_CONFIGS_DIR = CONFIGS_DIR / "models"
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def recipe_model_config(section: ModelSection, *, runs_dir: str | Path = "runs") -> ModelConfig:
    """The policy's architecture as the recipe names it, without reading any weights (see module doc)."""
    name = section.name
    if name == "tiny":
        return tiny_model_config(section)[0]
    if name in BUILT_IN_BASES:  # exported already, or the tiny model its recipe trains
        exported = built_in_base_directory(name, runs_dir) / "config.json"
        if exported.is_file():
            return ModelConfig.from_hf(json.loads(exported.read_text()))
        from pf_jax.config import load_config

        return tiny_model_config(load_config(TrainConfig, BUILT_IN_BASES[name][0], []).model)[0]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name={name!r} is a directory without config.json")
        return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    from pf_jax.models.embedded import EMBEDDED_MODELS, embedded_gguf_path

    if path.suffix == ".gguf" or name in EMBEDDED_MODELS:
        from pf_jax.models.gguf_io import _open_reader, hf_config_from_gguf

        gguf = embedded_gguf_path(name) if name in EMBEDDED_MODELS else path
        return ModelConfig.from_hf(hf_config_from_gguf(_open_reader(gguf), gguf))
    if _HUB_NAME.fullmatch(name):
        shipped = MODEL_CONFIGS_DIR / f"{name.split('/')[-1].lower()}.json"
        if shipped.is_file():
            return ModelConfig.from_hf(json.loads(shipped.read_text()))
        from pf_jax.models.registry import hub_offline

        if not hub_offline():
            try:
                from huggingface_hub import hf_hub_download

                return ModelConfig.from_hf(json.loads(Path(hf_hub_download(name, "config.json")).read_text()))
            except Exception as error:  # network, auth, missing repo: all end the dry run the same way
                raise ConfigError(f"dry run: cannot fetch config.json of {name!r} ({type(error).__name__}: "
                                  f"{error}); put it at {shipped}") from error
        raise ConfigError(f"dry run: no config for hub model {name!r} offline; put its config.json at {shipped}")
    raise ConfigError(f"dry run: model.name={name!r} is not tiny, a built-in base ({', '.join(BUILT_IN_BASES)}), "
                      "a directory, a .gguf file, an embedded alias or a hub name")


def plan_recipe(cfg: TrainConfig, *, device_count: int | None = None,
                compile_step: bool = True) -> tuple[MemoryPlan, str]:
    """(memory plan of the recipe on its mesh, one line naming the sizes assumed). compile_step: compile the
    generic NLL step on this process's devices when it has enough (see pf_jax.planning.memory_plan)."""
    composition = compose(cfg)
    model = recipe_model_config(cfg.model, runs_dir=cfg.logging.runs_dir)
    shape = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if device_count is None:
        device_count = jax.device_count() if -1 in shape else math.prod(shape)
    dtype = lambda name: jnp.bfloat16 if name == "bfloat16" else jnp.float32
    param_dtype, compute_dtype = dtype(cfg.model.param_dtype), dtype(cfg.model.dtype)
    sampling = composition.samples
    r, accum = cfg.rollout, cfg.optimizer.grad_accum_steps
    length = cfg.data.max_prompt_tokens + r.max_new_tokens
    if composition.kind == "env":  # agentic: a sampler call per turn over every episode; a row per step taken
        e = cfg.env
        sequences = e.tasks_per_step * e.group_size
        rows = bucket_length(sequences * e.max_steps, minimum=e.min_row_bucket)
        update_batch = max(1, rows // r.minibatches // accum)
        assumed = (f"{sequences} episodes sampled together, at most {rows} step rows per step (tasks_per_step x "
                   f"group_size x max_steps, bucketed by min_row_bucket), each turn")
    else:
        sequences = r.prompts_per_step * r.samples_per_prompt if sampling else cfg.batch_size
        update_batch = max(1, sequences // (r.minibatches if sampling else 1) // accum)
        assumed = f"{sequences} sequences per step"
    plan = plan_memory(
        # the policy's optimizer state (heads' parameter groups are negligible and not planned)
        model, shape, device_count=device_count, optimizer=cfg.optimizer.model_copy(update={"group_lr": {}}),
        frozen_policy=not composition.trains_policy,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype, reference=composition.reference, reference_dtype=param_dtype,
        sampler_copy=sampling, kv_cache=(sequences, length) if sampling else None,
        train_batch=(update_batch, length), remat=cfg.model.remat, compile_step=compile_step,
        rules=cfg.mesh.logical_rules(), lora=cfg.model.lora,
        async_versions=parameter_versions(r, sampling),
        name=f"{cfg.method.name} on {cfg.model.name}",
    )
    note = (f"assumed: {assumed} of {cfg.data.max_prompt_tokens} prompt + {r.max_new_tokens} new tokens; "
            f"one update = {update_batch} sequences x {length} tokens")
    return plan, note


