"""`python -m pf_jax.train --dry-run --topology NAME`: a recipe's programs compiled by XLA's TPU compiler
(libtpu, compile-only devices) on this CPU host, their per-device memory against the chip's HBM."""

import json
import math
import sys

import jax
import jax.numpy as jnp
import pytest

from pf_jax.config import ConfigError, load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.planning import compiled_plan
from pf_jax.planning.compiled_plan import abstract_recipe, compile_recipe, matmul_flops, train_step_program
from pf_jax.planning.compiled_report import advice, format_compiled_plan, plan_json
from pf_jax.planning.dry_run import dry_run
from pf_jax.sharding.topology import GENERATIONS, GiB, parse_topology, tpu_topology
from pf_jax.train import main
from tests.test_trainer_methods import RECIPES as METHOD_RECIPES
from tests.test_trainer_methods import TINY as METHOD_TINY

# PowerFlow on the built-in arithmetic base (a 2-layer, 128-wide decoder), sized down: it has every program
# kind (train step with the log Z head, reference scoring, policy scoring, sampler prefill and decode).
TINY = ["data.max_prompt_tokens=16", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2"]
PROGRAMS = ["train step", "reference scoring", "policy scoring", "sampler prefill", "sampler decode"]


# A tiny decoder whose shapes take splash attention (head_dim and sequence lengths multiples of 128).
SPLASH = ["model.name=tiny", "model.tiny.head_dim=128", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
          "data.max_prompt_tokens=128", "rollout.max_new_tokens=128", *TINY[1:]]


@pytest.fixture(scope="module")
def tiny_plan():
    """The tiny recipe's plan (shapes too small for splash: every program takes the einsum attention)."""
    cfg = load_config(TrainConfig, "configs/default.yaml", TINY)
    printed: list[str] = []
    return cfg, dry_run(cfg, topology="v5e:2x2", echo=printed.append), "".join(printed)


def test_every_known_topology_has_one_device_per_chip():
    for generation, g in GENERATIONS.items():
        for shape in g.known:
            name = f"{generation}:{shape}"
            t = tpu_topology(name)
            assert t.size == math.prod(parse_topology(name)[1]), name
            assert t.hbm_bytes == g.hbm_gib * GiB, (name, t.device_kind)
    assert tpu_topology("v5p:4x4x4").device_kind == "TPU v5"


def test_unknown_topology_lists_the_known_ones(capsys):
    for name in ("v7x:2x2", "v5e:2x2x2", "v5p:4x4", "v5e"):
        with pytest.raises(ConfigError, match=r"unknown TPU topology .*v5e: 1x1 2x2 .*v6e: .*v5p: 2x2x1 .*v4: "):
            tpu_topology(name)
    with pytest.raises(ConfigError, match=r"'v5e:3x3': libtpu refused it .*known: v5e: 1x1"):
        tpu_topology("v5e:3x3")
    assert main(["--config", "configs/default.yaml", "--dry-run", "--topology", "v9:1x1"]) == 2
    assert "unknown TPU topology 'v9:1x1'" in capsys.readouterr().err
    assert main(["--config", "configs/default.yaml", "--topology", "v5e:2x2"]) == 2  # needs --dry-run
    assert "--topology and --json go with --dry-run" in capsys.readouterr().err


def test_missing_libtpu_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` now raises ImportError
    with pytest.raises(ConfigError, match=r"libtpu.*not installed: pip install 'pf_jax\[tpu\]'"):
        tpu_topology("v5e:2x2")


def test_matmul_flops_counts_loops_and_the_remat_recompute():
    m, k, n, layers = 8, 16, 32, 3
    x, w = jnp.ones((m, k)), jnp.ones((layers, k, n))
    matmul = 2 * m * k * n

    def forward(w, layer=lambda x, w: jnp.tanh(x @ w)):
        return jax.lax.scan(lambda c, w_l: (c, layer(x, w_l).sum()), None, w)[1].sum()

    assert matmul_flops(jax.make_jaxpr(forward)(w).jaxpr) == layers * matmul
    grad = jax.make_jaxpr(jax.grad(forward))(w).jaxpr  # forward + the weight gradient (x is a constant)
    assert matmul_flops(grad) == 2 * layers * matmul
    remat = jax.make_jaxpr(jax.grad(lambda w: forward(w, jax.checkpoint(lambda x, w: jnp.tanh(x @ w)))))(w).jaxpr
    assert matmul_flops(remat) == 3 * layers * matmul  # the forward again inside the backward pass
    both = jax.make_jaxpr(lambda p: jax.lax.cond(p, lambda: x @ w[0], lambda: (x @ w[0]) @ w[1].T @ w[0]))(True)
    assert matmul_flops(both.jaxpr) == 3 * matmul  # the costlier branch


def test_tiny_recipe_compiles_every_program_and_fits(tiny_plan):
    cfg, plan, printed = tiny_plan
    assert [p.name for p in plan.programs] == PROGRAMS
    assert plan.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and plan.topology.size == 4
    r = plan.resident
    for p in plan.programs:
        assert p.error is None and p.argument_bytes > 0 and p.flops > 0 and p.compile_s > 0, p
        assert p.peak_bytes(r) >= sum(r[k] for k in p.alive)
    train = plan.programs[0]
    assert train.argument_bytes >= r["parameters"] + r["optimizer state"]  # the state is the step's argument
    assert train.alias_bytes >= r["parameters"]  # ... donated: the new state reuses it
    decode = plan.programs[-1]
    assert decode.alias_bytes >= r["KV cache"] > 0  # the cache is donated to the decode loop
    policy = next(row.per_device_bytes for row in plan.analytic.rows if row.name == "policy parameters")
    assert r["reference"] == policy < r["parameters"]  # an fp32 copy of the policy alone (no log Z head)
    assert not plan.programs[2].runs  # PowerFlow takes behaviour log-probs from the decode loop: not in the peak
    assert plan.peak_bytes == max(p.peak_bytes(r) for p in plan.programs if p.runs)
    assert plan.fits and advice(plan, cfg) == []
    assert 0.8 < plan.train_matmul_flops / (6 * plan.num_params * plan.tokens_per_update) < 3
    for needle in (*PROGRAMS, "fits: peak", "TPU v5 lite", "x 6·N·tokens", "beside the analytic planner"):
        assert needle in printed, needle


def test_continuous_batching_plans_its_own_decode_loop(tiny_plan):
    """rollout.batching=continuous compiles the loop the run takes (continuous._decode_continuous): each
    prompt prefilled once, the prompts' cache resident, the slots' cache inside the loop."""
    from pf_jax.sampling.slot_caches import kv_bytes

    cfg = load_config(TrainConfig, "configs/default.yaml", [*TINY, "rollout.batching=continuous", "rollout.slots=6"])
    plan = compile_recipe(cfg, "v5e:2x2")
    assert [p.name for p in plan.programs] == PROGRAMS
    assert not [p.error for p in plan.programs if p.error]
    decode, static = plan.programs[-1], tiny_plan[1]
    assert "8 slots" in decode.note and "continuous batching" in decode.note  # 6 rounded up to the 4 row shards
    model, s = compiled_plan.abstract_decoder(cfg, scan_layers=False), plan.sizes
    slots = kv_bytes(model, 8 * (s.prompt_len + cfg.rollout.max_new_tokens)) // 4  # per device
    prompts = kv_bytes(model, 4 * s.prompt_len) // 4  # 4 prompts, their first prompt-bucket slots
    assert prompts <= plan.resident["KV cache"] < static.resident["KV cache"]
    assert decode.temp_bytes >= slots  # the slots' cache is the loop's own
    assert plan.fits


def test_paged_kv_cache_plans_the_pallas_kernel_on_one_chip():
    """rollout.kv_cache=paged on one v5e chip: the continuous loop's decode attention is the Pallas
    paged-attention kernel (head_dim 128), and its pool of pages, which shares each prompt's pages among its
    samples, takes less of the loop's memory than the dense slots; on a mesh it is one clear error."""
    sizes = [*SPLASH, "rollout.batching=continuous", "rollout.samples_per_prompt=8", "rollout.max_new_tokens=256"]
    plans = {}
    for kv in ("dense", "paged"):
        recipe = abstract_recipe(load_config(TrainConfig, "configs/default.yaml", [*sizes, f"rollout.kv_cache={kv}"]),
                                 tpu_topology("v5e:1x1"))
        plans[kv] = compiled_plan.SAMPLER_PROGRAMS["continuous"](recipe)[-1]
    dense, paged = plans["dense"], plans["paged"]
    assert not paged.error and "pages of 16 tokens" in paged.note, paged.error
    assert paged.kernels > dense.kernels == 0
    assert paged.temp_bytes < dense.temp_bytes
    mesh = abstract_recipe(load_config(TrainConfig, "configs/default.yaml", [*sizes, "rollout.kv_cache=paged"]),
                           tpu_topology("v5e:2x2"))
    with pytest.raises(ConfigError, match="kv_cache=paged runs the sampler on one device"):
        compiled_plan.SAMPLER_PROGRAMS["continuous"](mesh)


def test_splash_attention_compiles_in_every_program():
    """With the TPU ops the decoder calls splash attention (a Pallas kernel) wherever its shapes apply: the
    train step, both scoring passes and the prefill of a fresh cache; the decode steps use the einsum."""
    if compiled_plan.tpu_ops() is None:
        pytest.skip("pf_jax.models.ops is not there yet")
    plan = compile_recipe(load_config(TrainConfig, "configs/default.yaml", SPLASH), "v5e:2x2")
    failed = {p.name: p.error for p in plan.programs if p.error}
    assert not failed, failed
    kernels = {p.name: p.kernels for p in plan.programs}
    assert all(kernels[name] > 0 for name in PROGRAMS[:4]) and kernels["sampler decode"] == 0, kernels


def test_overflowing_recipe_names_the_program_and_the_setting():
    # SFT of the tiny model on 2^18 sequences per update: its activations need ~10x the 16 GiB of a v5e chip
    cfg = load_config(TrainConfig, "configs/arith/base.yaml", ["batch_size=262144", "data.max_prompt_tokens=16"])
    plan = compile_recipe(cfg, "v5e:2x2")
    assert not plan.fits and plan.peak_program.name == "train step"
    assert plan.peak_bytes > plan.topology.hbm_bytes
    text = format_compiled_plan(plan, cfg)
    assert "does NOT fit: train step needs" in text and "model.remat=true" in text, text
    assert "optimizer.grad_accum_steps=2" in text
    assert plan_json(plan, cfg)["fits"] is False


def test_cli_writes_the_compiled_plan_as_json(tmp_path, capsys):
    path = tmp_path / "plan" / "v5e.json"
    argv = ["--config", "configs/arith/base.yaml", "--dry-run", "--topology", "v5e:2x2", "--json", str(path),
            "batch_size=8", "data.max_prompt_tokens=16"]
    assert main(argv) == 0
    out = json.loads(path.read_text())
    assert out["fits"] is True and 0 < out["peak_bytes"] < out["hbm_bytes"] == 16 * GiB
    assert [p["name"] for p in out["programs"]] == ["train step"]  # SFT: no sampler, no reference
    assert out["programs"][0]["peak_bytes"] == out["peak_bytes"] and out["devices"] == 4
    assert "compiled plan written to" in capsys.readouterr().out


@pytest.mark.parametrize("method", sorted(METHOD_RECIPES))
def test_every_methods_abstract_batch_traces_through_its_loss(method, tmp_path):
    """The abstract update batch has every key (and shape) the method's real loss reads: the train step of
    every shipped method traces on the v5e:2x2 mesh (tracing only; the tiny recipes of test_trainer_methods)."""
    cfg = load_config(TrainConfig, None, [*METHOD_TINY, f"method.name={method}", f"logging.runs_dir={tmp_path}",
                                          *METHOD_RECIPES[method]])
    recipe = abstract_recipe(cfg, tpu_topology("v5e:2x2"))
    step, (state, batch) = train_step_program(recipe)
    traced = step.trace(state, batch)
    new_state, metrics = traced.out_info
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert metrics["loss"].shape == () and matmul_flops(traced.jaxpr.jaxpr) > 0
    rows = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
    assert rows == {recipe.sizes.update_rows}, rows


def test_async_recipe_keeps_its_parameter_versions_resident(tmp_path):
    """rollout.mode=async: max_staleness copies of the trained parameters are alive in every program."""
    keys = [*METHOD_TINY, "method.name=grpo", "reward.name=entropy", f"logging.runs_dir={tmp_path}"]
    sync = abstract_recipe(load_config(TrainConfig, None, keys), tpu_topology("v5e:2x2"))
    asyn = abstract_recipe(load_config(TrainConfig, None, [*keys, "rollout.mode=async", "rollout.max_staleness=2"]),
                           tpu_topology("v5e:2x2"))
    assert sync.resident["async parameter versions"] == 0
    assert asyn.resident["async parameter versions"] == 2 * asyn.resident["parameters"] > 0
