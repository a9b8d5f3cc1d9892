"""`python -m pf_jax.train --dry-run`: a recipe's plan from its model, mesh, dtypes and sizes, without weights."""

import pytest

from pf_jax.config import ConfigError, load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.planning.memory_plan import GiB
from pf_jax.planning.recipe_plan import plan_recipe, recipe_model_config
from pf_jax.train import main

QWEN_7B_RECIPE = "configs/powerflow/qwen2.5-math-7b.yaml"
# Qwen2.5-Math-7B by hand: untied embeddings, qkv bias, every matrix has the embed dim (3584 = 64 * 56)
V, D, L, H, K, Dh, F = 152064, 3584, 28, 28, 4, 128, 18944
SPLIT = 2 * V * D + L * (2 * D * H * Dh + 2 * D * K * Dh + 3 * D * F)
REPLICATED = D + L * (2 * D + H * Dh + 2 * K * Dh)  # final + per-layer norms, q/k/v biases


def row(plan, name):
    (r,) = [r for r in plan.rows if r.name == name]
    return r


def test_powerflow_7b_recipe_on_64_chips_by_hand():
    cfg = load_config(TrainConfig, QWEN_7B_RECIPE, ["mesh.fsdp=64"])
    plan, note = plan_recipe(cfg)
    assert plan.num_params == SPLIT + REPLICATED == 7_615_616_512
    assert plan.mesh == {"data": 1, "fsdp": 64, "tensor": 1}
    params = 4 * (SPLIT // 64 + REPLICATED)
    assert row(plan, "policy parameters").per_device_bytes == params
    assert row(plan, "reference model").per_device_bytes == params  # the trainer's reference: fp32 copy
    assert 0 < row(plan, "optimizer state").per_device_bytes - 2 * params <= 16
    assert row(plan, "sampler policy copy").per_device_bytes == 2 * (SPLIT + REPLICATED)  # bf16, whole
    seqs, slots = 64 * 8, 1024 + 3072
    assert row(plan, "KV cache").per_device_bytes == (2 * L * seqs * slots * K * Dh * 2 + seqs * slots * 5) // 64
    assert "one update = 128 sequences x 4096 tokens" in note
    assert plan.fits()["H100"] and plan.per_device_bytes < 20 * GiB


def test_dry_run_cli_prints_table_and_verdicts(capsys):
    assert main(["--config", QWEN_7B_RECIPE, "--dry-run", "mesh.fsdp=8", "mesh.data=8"]) == 0
    out = capsys.readouterr().out
    for needle in ("powerflow on Qwen/Qwen2.5-Math-7B", "mesh (data=8, fsdp=8, tensor=1), 64 devices",
                   "reference model", "KV cache", "H100 (80 GiB): fits", "7,615,616,512"):
        assert needle in out, needle


def test_tiny_recipe_compiles_its_step_on_this_machine():
    cfg = load_config(TrainConfig, "configs/arith/base.yaml", ["batch_size=8", "data.max_prompt_tokens=16"])
    plan, _ = plan_recipe(cfg)
    assert plan.compiled_temp_bytes is not None and plan.compiled_temp_bytes > 0, plan.compiled_note
    assert "batch 8 x 22" in plan.compiled_note  # 16 prompt + rollout.max_new_tokens 6
    assert not any(r.name in ("reference model", "KV cache") for r in plan.rows)  # SFT: no reference, no sampler


def test_unknown_hub_model_offline_names_the_config_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    section = load_config(TrainConfig, None, ["model.name=SomeOrg/Unknown-Model-3B"]).model
    with pytest.raises(ConfigError, match=r"configs/models/unknown-model-3b\.json"):
        recipe_model_config(section)
    with pytest.raises(ConfigError, match="not tiny"):
        recipe_model_config(load_config(TrainConfig, None, ["model.name=no such model"]).model)


def test_agentic_recipe_is_sized_from_its_env_section():
    """Agentic recipes were sized from rollout.prompts_per_step x samples_per_prompt (128 sequences for
    the TextWorld Gemma recipe, which samples 2 episodes and updates on at most 4 step rows), and the dry
    run did not know the maze-base built-in model this recipe starts from."""
    cfg = load_config(TrainConfig, "configs/rewardflow/maze.yaml", [])
    plan, note = plan_recipe(cfg)
    e = cfg.env  # 2 tasks x 8 episodes, 8 turns each: 128 step rows at most
    assert (e.tasks_per_step, e.group_size, e.max_steps) == (2, 8, 8)
    assert "assumed: 16 episodes sampled together, at most 128 step rows per step" in note, note
    assert f"batch 16 x {cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens} slots" in row(plan, "KV cache").note
    assert f"one update = {128 // cfg.rollout.minibatches} sequences" in note


def test_frozen_backbone_recipe_plans_no_optimizer_state():
    frozen, _ = plan_recipe(load_config(TrainConfig, "configs/instructions/classifier_synthetic.yaml",
                                        ["reward_model.freeze_backbone=true"]))
    trained, _ = plan_recipe(load_config(TrainConfig, "configs/instructions/classifier_synthetic.yaml", []))
    assert row(frozen, "optimizer state").per_device_bytes == 0
    assert row(trained, "optimizer state").per_device_bytes >= 2 * row(trained, "policy parameters").per_device_bytes


def test_async_recipe_plans_its_parameter_versions():
    """rollout.mode=async keeps max_staleness copies of the trained parameters (adapters only with LoRA)."""
    plan, _ = plan_recipe(load_config(TrainConfig, "configs/grpo/gemma3-270m-math.yaml",
                                      ["rollout.mode=async", "rollout.max_staleness=2"]))
    assert row(plan, "async parameter versions").global_bytes == 2 * row(plan, "policy parameters").global_bytes
    lora, _ = plan_recipe(load_config(TrainConfig, "configs/grpo/gemma3-270m-math.yaml",
                                      ["rollout.mode=async", "model.lora={rank: 8}"]))
    assert row(lora, "async parameter versions").global_bytes == row(lora, "LoRA adapters").global_bytes
    sync, _ = plan_recipe(load_config(TrainConfig, "configs/grpo/gemma3-270m-math.yaml", []))
    assert "async parameter versions" not in [r.name for r in sync.rows]
