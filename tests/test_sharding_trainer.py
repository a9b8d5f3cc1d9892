"""The real trainer (`python -m pf_jax.train`) on device meshes: 8 simulated CPU devices on meshes (8,1,1)
and (2,2,2) train like one device; 2 processes x 2 devices (launch/local.sh, gloo) train like 1 process x 4
devices, and the 2-process checkpoint resumes in a 1-process, 1-device run.

Every run is a subprocess (the simulated device count must be set before jax starts) with a timeout; the
recipe is the arithmetic SFT base recipe shrunk to a 2-layer, 32-wide decoder and 3 steps.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.subprocesses import run_in_process_group

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "launch" / "local.sh"
TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=4",
        "model.tiny.num_kv_heads=2", "model.tiny.head_dim=8", "optimizer.warmup_steps=1", "eval.enabled=false",
        "logging.tensorboard=false", "logging.plots=false", "logging.progress_bar=false", "logging.every_steps=1"]
RECIPE = ["--config", str(ROOT / "configs" / "arith" / "base.yaml"), *TINY, "batch_size=8", "steps=3",
          "checkpoint.every_steps=1"]
LOSS_ATOL, PARAM_ATOL = 1e-5, 5e-5  # fp32; a wrong shard or a dropped row moves params by ~lr = 3e-3


def run(command: list[str], *, devices: int = 1, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = run_in_process_group(command, cwd=ROOT, env=env, timeout=timeout, label=command[-3:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def train(runs: Path, name: str, *extra: str, devices: int = 1, launcher: list[str] | None = None) -> str:
    args = [sys.executable, "-m", "pf_jax.train", *RECIPE, f"logging.runs_dir={runs}", f"logging.run_name={name}",
            *extra]
    return run([*(launcher or []), *args], devices=devices)


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records]


def params(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(run_dir / "export" / "model.safetensors")


def max_param_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_trainer_on_8_simulated_devices_equals_one_device(tmp_path):
    out = train(tmp_path, "one")
    assert "[pf_jax] mesh" not in out  # one device: the unsharded path
    ref_losses, ref_params = losses(tmp_path / "one"), params(tmp_path / "one")
    assert len(ref_losses) == 3
    for mesh in ((8, 1, 1), (2, 2, 2)):
        name = "mesh" + "x".join(map(str, mesh))
        out = train(tmp_path, name, *(f"mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), mesh)), devices=8)
        described = ", ".join(f"{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), mesh))
        assert f"[pf_jax] mesh ({described}) over 8 devices in 1 process(es)" in out
        loss_diff = max(abs(a - b) for a, b in zip(losses(tmp_path / name), ref_losses, strict=True))
        param_diff = max_param_diff(params(tmp_path / name), ref_params)
        print(f"mesh {mesh}: max |loss diff| {loss_diff:.2e}, max |param diff| {param_diff:.2e}")
        assert loss_diff < LOSS_ATOL and param_diff < PARAM_ATOL
    # the runs trained: parameters moved from the (shared) initialisation by more than the tolerance
    assert abs(ref_losses[0] - ref_losses[-1]) > 10 * LOSS_ATOL


def test_powerflow_samples_through_the_sampler_layout_like_one_device(tmp_path):
    """PowerFlow samples every step with the current policy (train layout -> sampler layout transfer) and
    scores with the frozen reference (kept in the training layout): same samples and losses as one device."""
    powerflow = ["--config", str(ROOT / "configs" / "default.yaml"), "model.name=tiny", *TINY,
                 "rollout.prompts_per_step=8", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4",
                 "steps=2", "export=false"]
    run([sys.executable, "-m", "pf_jax.train", *powerflow, f"logging.runs_dir={tmp_path}", "logging.run_name=one"])
    run([sys.executable, "-m", "pf_jax.train", *powerflow, f"logging.runs_dir={tmp_path}", "logging.run_name=mesh",
         "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], devices=8)
    read = lambda name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    one, mesh = read("one"), read("mesh")
    assert [r["response_length"] for r in one] == [r["response_length"] for r in mesh]  # the same samples
    for a, b in zip(one, mesh, strict=True):
        print(f"step {a['step']}: loss {a['loss']:.6f} vs {b['loss']:.6f}")
        assert abs(a["base_logp_per_token"] - b["base_logp_per_token"]) < LOSS_ATOL
        assert abs(a["loss"] - b["loss"]) < 1e-6 * abs(a["loss"]) + LOSS_ATOL


def test_async_rollout_on_its_own_device_group_trains_like_one_device(tmp_path):
    """rollout.mode=async with rollout.devices=4 of 8: the update on a (1, 4, 1) mesh of devices 0-3, the
    sampler, the reference and the scoring passes on devices 4-7, the weights moved across once per rollout
    (rollout/reshard_s). The sampler batches continuously: 6 slots, 8 on the 4 rollout devices (its samples
    do not depend on the slot count). Same samples and losses as the same async recipe on one device."""
    powerflow = ["--config", str(ROOT / "configs" / "default.yaml"), "model.name=tiny", *TINY,
                 "rollout.prompts_per_step=8", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4",
                 "steps=3", "export=false", "rollout.mode=async", "rollout.max_staleness=1",
                 "rollout.batching=continuous", "rollout.slots=6"]
    run([sys.executable, "-m", "pf_jax.train", *powerflow, f"logging.runs_dir={tmp_path}", "logging.run_name=one"])
    out = run([sys.executable, "-m", "pf_jax.train", *powerflow, f"logging.runs_dir={tmp_path}",
               "logging.run_name=split", "mesh.data=1", "mesh.fsdp=4", "rollout.devices=4"], devices=8)
    assert "update on mesh (data=1, fsdp=4, tensor=1) over 4 devices in 1 process(es), rollout on 4 others" in out
    read = lambda name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    one, split = read("one"), read("split")
    assert [r["response_length"] for r in one] == [r["response_length"] for r in split]  # the same samples
    for a, b in zip(one, split, strict=True):
        print(f"step {a['step']}: loss {a['loss']:.6f} vs {b['loss']:.6f}, reshard {b['rollout/reshard_s']:.4f} s")
        assert abs(a["loss"] - b["loss"]) < 1e-6 * abs(a["loss"]) + LOSS_ATOL
        assert abs(a["tis/weight_mean"] - b["tis/weight_mean"]) < LOSS_ATOL
        assert "rollout/reshard_s" not in a
    # one transfer per rollout, on the rollout thread: its seconds land in the step during which it ran
    assert sum(b["rollout/reshard_s"] for b in split) > 0


@pytest.mark.multiprocess
def test_two_processes_train_like_one_and_resume_in_one_device(tmp_path):
    mesh = ["mesh.data=2", "mesh.fsdp=2"]
    out = train(tmp_path, "two", *mesh, launcher=["bash", str(LOCAL), "-n", "2", "-d", "2", "--"])
    assert out.count("[pf_jax] mesh (data=2, fsdp=2, tensor=1) over 4 devices in 2 process(es)") == 1  # process 0
    train(tmp_path, "one", *mesh, launcher=["bash", str(LOCAL), "-n", "1", "-d", "4", "--"])
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    print("2 processes x 2 devices:", two, "\n1 process x 4 devices:", one)
    np.testing.assert_allclose(two, one, rtol=0, atol=LOSS_ATOL)
    assert max_param_diff(params(tmp_path / "two"), params(tmp_path / "one")) < PARAM_ATOL

    # the 2-process checkpoint of step 3 restores in a single-device run (resharded onto one device)
    out = train(tmp_path, "resumed", f"checkpoint.dir={tmp_path / 'two' / 'checkpoints'}")
    assert "resumed" in out and "at step 3" in out
    assert not (tmp_path / "two" / "checkpoints" / "corrupt").exists()
    restored, saved = params(tmp_path / "resumed"), params(tmp_path / "two")
    for k in saved:
        np.testing.assert_array_equal(restored[k], saved[k])


def test_sampler_view_in_compute_dtype_gives_the_same_forward_pass():
    """Mixed precision: the sampler copy carries the decoder's matrices in bfloat16 (half the bytes), norms
    in float32; the decoder casts every layer weight to its compute dtype anyway, so outputs are equal."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pf_jax.models.config import ModelConfig
    from pf_jax.models.decoder import Decoder
    from pf_jax.sharding.mesh import MeshConfig
    from pf_jax.training.placement import MeshPlacement

    model = Decoder(ModelConfig.tiny("gemma3", vocab_size=64), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model, nnx.Param)
    placement = MeshPlacement(MeshConfig(), devices=jax.devices()[:1], sampler_dtype=jnp.bfloat16)
    cast = placement.sampler_params(params, cast=True)
    dtypes = {jax.tree_util.keystr(p): (x.ndim, x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(cast)}
    assert all(d == (jnp.bfloat16 if n >= 2 else jnp.float32) for n, d in dtypes.values()), dtypes
    assert placement.sampler_params(params)["embed"].get_value().dtype == jnp.float32  # no cast unless asked
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    expected, _ = model(tokens, positions)
    got, _ = nnx.merge(graphdef, cast)(tokens, positions)
    assert got.dtype == expected.dtype == jnp.bfloat16
    assert jnp.array_equal(got, expected)
