"""Sampling with the weights on a device mesh: rows split over the batch axes (data, fsdp), same result as on
one device.

The 8-device checks run tests/multihost/sharded_sampling.py in a subprocess (the simulated device count must
be set before jax starts).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.sampling.layout import RowLayout, padded_prompt_count

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "multihost" / "sharded_sampling.py"
LOGPROB_ATOL = 1e-5  # fp32; the same rows computed in smaller per-device batches


def test_prompts_are_padded_until_the_rows_divide_by_the_shard_count():
    # rows = count * n must divide by the shard count: the smallest such count >= the prompt count
    assert [padded_prompt_count(p, 1, 8) for p in (1, 8, 9)] == [8, 8, 16]
    assert [padded_prompt_count(p, 4, 8) for p in (1, 2, 3)] == [2, 2, 4]
    assert padded_prompt_count(3, 8, 8) == 3 and padded_prompt_count(0, 2, 8) == 0
    assert [padded_prompt_count(p, 2, 1) for p in (0, 1, 3)] == [0, 1, 3]
    assert RowLayout().pad_prompts([[1], [2, 3]], 3) == [[1], [2, 3]]


def test_weights_on_one_device_are_not_split():
    model = Decoder(ModelConfig.tiny("llama"), rngs=nnx.Rngs(0))
    layout = RowLayout.of(nnx.split(model)[1])
    assert layout == RowLayout(one_device=True, cpu=jax.default_backend() == "cpu") and layout.shards == 1
    z = np.arange(6.0).reshape(2, 3)
    assert layout.rowwise(lambda x: x * 2)(z).tolist() == (z * 2).tolist()


@pytest.fixture(scope="module")
def sharded_runs() -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(SCRIPT), "8,1,1", "2,2,2"], env=env, capture_output=True, text=True,
                         timeout=400, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_sharded_sampling_equals_one_device(sharded_runs):
    """Tokens, masks, lengths, finish reasons equal; log-probs within LOGPROB_ATOL; for T = 1 with
    min_new_tokens, top-k at T = 0.7 with a stop id, greedy, continuous batching (3 slots on one device, 8
    and 4 on the meshes) and power sampling; 3, 6 and 8 rows (padded to the shard count where they do not
    divide)."""
    runs = [r for r in sharded_runs if r["case"] not in ("cost", "continuous_cost")]
    assert {(tuple(r["mesh"]), r["case"]) for r in runs} == {
        (m, c) for m in ((8, 1, 1), (2, 2, 2)) for c in ("t1_min_new", "topk_t07", "greedy", "continuous", "power")}
    for r in runs:
        assert r["mismatched_entries"] == 0, r
        assert r["max_logprob_diff"] < LOGPROB_ATOL, r
        assert r.get("acceptance_diff", 0.0) == 0.0, r
    shards = {tuple(r["mesh"]): r["shards"] for r in runs}
    assert shards == {(8, 1, 1): 8, (2, 2, 2): 4}  # data x fsdp; tensor splits the heads instead
    # 8 rows divide: the output stays split over the batch axes
    specs = {tuple(r["mesh"]): r["tokens_spec"] for r in runs if r["case"] == "topk_t07"}
    assert specs == {(8, 1, 1): "P('data',)", (2, 2, 2): "P(('data', 'fsdp'),)"}


def test_sharded_decode_does_a_shard_of_the_work_without_gathering_rows(sharded_runs):
    cost = {tuple(r["mesh"]): r for r in sharded_runs if r["case"] == "cost"}
    # per-device FLOPs of the compiled decode loop: 1/8 of one device's (8 row shards; 4 row shards x 2 tensor)
    for mesh, r in cost.items():
        assert r["flops_ratio"] < 1.25 / 8, (mesh, r)
    # pure data parallelism: no gather of rows (top-k runs per shard) and no other collective in the loop
    assert cost[(8, 1, 1)]["collectives"] == {"all-gather": 0, "all-to-all": 0, "collective-permute": 0}


def test_continuous_batching_keeps_each_shards_prompts_on_its_devices(sharded_runs):
    """Each row shard admits the samples of its own prompts: the loop gathers at most one token's keys
    or values per slot (the per-row cache write), never the prompts' cache."""
    cost = {tuple(r["mesh"]): r for r in sharded_runs if r["case"] == "continuous_cost"}
    assert set(cost) == {(8, 1, 1), (2, 2, 2)}
    for mesh, r in cost.items():
        assert 0 < r["max_gather_elements"] <= r["one_token_kv"] < r["prompt_cache_elements"], (mesh, r)
