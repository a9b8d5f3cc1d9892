"""The dry-run planner against hand arithmetic (Qwen2.5-Math-1.5B's public config) and a real compile."""

import json
from pathlib import Path

import jax
import pytest

from pf_jax.models.config import ModelConfig
from pf_jax.planning.memory_plan import GiB, format_plan, plan_memory

ROOT = Path(__file__).resolve().parents[1]
QWEN_1_5B = ModelConfig.from_hf(json.loads((ROOT / "configs/models/qwen2.5-math-1.5b.json").read_text()))
QWEN_7B = ModelConfig.from_hf(json.loads((ROOT / "configs/models/qwen2.5-math-7b.json").read_text()))

# Qwen2.5-Math-1.5B by hand: V=151936 D=1536 L=28 H=12 K=2 Dh=128 F=8960, tied embeddings, qkv bias.
V, D, L, H, K, Dh, F = 151936, 1536, 28, 12, 2, 128, 8960
EMBED = V * D
Q = D * H * Dh  # also the output projection
KV = D * K * Dh
MLP = D * F
NORMS = D + L * 2 * D
Q_BIAS, KV_BIAS = H * Dh, K * Dh


def row(plan, name):
    (r,) = [r for r in plan.rows if r.name == name]
    return r


def test_parameter_count_matches_hand_count_and_published_size():
    hand = EMBED + NORMS + L * (2 * Q + 2 * KV + 3 * MLP + Q_BIAS + 2 * KV_BIAS)
    plan = plan_memory(QWEN_1_5B, (1, 8, 1), train_batch=None)
    assert plan.num_params == hand == 1_543_714_304  # "1.54B" on the model card
    assert plan_memory(QWEN_7B, (1, 8, 1)).num_params == 7_615_616_512  # "7.61B"


def test_fsdp_8_bytes_per_device_by_hand():
    plan = plan_memory(QWEN_1_5B, (1, 8, 1), kv_cache=(64, 4096))
    split = EMBED + L * (2 * Q + 2 * KV + 3 * MLP)  # every matrix has the embed dim (1536 = 8 * 192)
    replicated = NORMS + L * (Q_BIAS + 2 * KV_BIAS)
    assert row(plan, "policy parameters").per_device_bytes == 4 * (split // 8 + replicated)
    assert row(plan, "policy parameters").global_bytes == 4 * (split + replicated)
    assert row(plan, "reference model").per_device_bytes == 2 * (split // 8 + replicated)
    params = row(plan, "policy parameters").per_device_bytes
    extra = row(plan, "optimizer state").per_device_bytes - 2 * params  # adamw mu + nu, plus step counters
    assert 0 < extra <= 16
    # sampler layout drops fsdp: with tensor=1 the bf16 copy is whole on every device
    assert row(plan, "sampler policy copy").per_device_bytes == 2 * (split + replicated)
    # KV cache: k and v [L, 64, 4096, K, Dh] bf16 + valid (1 B) and positions (4 B) per slot, batch over 8
    kv = 2 * L * 64 * 4096 * K * Dh * 2 + 64 * 4096 * (1 + 4)
    assert row(plan, "KV cache").per_device_bytes == kv // 8


def test_tensor_axis_falls_back_to_replication_for_two_kv_heads():
    plan = plan_memory(QWEN_1_5B, (1, 2, 4))
    # vocab/4 and embed/2; q, o, mlp: /2 (embed) and /4 (heads, mlp); k, v: 2 kv heads do not divide by 4
    # -> only /2; q bias /4 (heads); k, v biases and norms replicated
    per_device = EMBED // 8 + L * (2 * Q // 8 + 2 * KV // 2 + 3 * MLP // 8 + Q_BIAS // 4 + 2 * KV_BIAS) + NORMS
    assert row(plan, "policy parameters").per_device_bytes == 4 * per_device


def test_fits_and_table():
    plan = plan_memory(QWEN_7B, (8, 8, 1), kv_cache=(256, 4096))
    total = plan.per_device_bytes
    assert total == sum(r.per_device_bytes for r in plan.rows)  # nothing compiled: gradients counted
    assert plan.fits() == {name: total <= gib * GiB for name, gib in plan.accelerators.items()}
    one_chip = plan_memory(QWEN_7B, (1, 1, 1), reference=True)
    assert not one_chip.fits()["H100"]  # 7.6B x (4 + 8 + 4 + 2) bytes does not fit 80 GiB
    text = format_plan(plan)
    for needle in ("policy parameters", "optimizer state", "reference model", "KV cache", "compiled step temp",
                   "total per device", "TPU v5p (95 GiB)", "not reported: ", "7,615,616,512"):
        assert needle in text, needle


def test_compiled_step_temp_memory_is_reported_on_cpu():
    tiny = ModelConfig.tiny("qwen2", vocab_size=128)
    plan = plan_memory(tiny, (1, 1, 1), train_batch=(4, 32))
    assert plan.compiled_temp_bytes is not None and plan.compiled_temp_bytes > 0, plan.compiled_note
    assert jax.default_backend() in plan.compiled_note
    assert plan.per_device_bytes == sum(r.per_device_bytes for r in plan.rows if r.name != "gradients") + \
        plan.compiled_temp_bytes
    needs_more = plan_memory(tiny, (1, -1, 1), device_count=jax.device_count() + 1, train_batch=(8, 32))
    assert needs_more.compiled_temp_bytes is None
    assert needs_more.compiled_note.startswith("not reported:")


def test_bad_mesh_names_device_count():
    from pf_jax.config import ConfigError

    with pytest.raises(ConfigError, match="64 devices"):
        plan_memory(QWEN_7B, (3, -1, 1), device_count=64)
