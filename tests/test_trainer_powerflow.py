"""PowerFlow in the trainer: unsupervised (a monitored reward never reaches the loss), group log Z."""

import jax
import jax.numpy as jnp
import numpy as np

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.methods.gflownet import group_log_partition
from pf_jax.training.trainer import Trainer

TINY = [
    "model.name=tiny", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.head_dim=16", "model.log_z_width=16",
    "method.name=powerflow", "data.source=arithmetic", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=4", "eval.enabled=false", "export=false",
]


def test_monitored_reward_never_reaches_the_powerflow_batch(tmp_path):
    batches = []
    for reward in ("null", "arithmetic"):
        cfg = load_config(TrainConfig, None, [*TINY, f"reward.name={reward}", f"logging.runs_dir={tmp_path}"])
        trainer = Trainer(cfg)
        rows = trainer.prompts.next_batch()
        batch, metrics = trainer.make_batch(rows, step=0)
        batches.append(batch)
        assert ("reward" in metrics) == (reward == "arithmetic")
    a, b = batches
    assert type(a) is type(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_group_log_partition_minimises_the_group_squared_residual():
    rng = np.random.default_rng(0)
    mask = jnp.asarray(rng.random((6, 5)) < 0.8).at[:, 0].set(True)
    old = jnp.asarray(-rng.random((6, 5)) * 3)
    log_r = jnp.asarray(-rng.random(6) * 10)
    groups = np.array([0, 0, 0, 1, 1, 1])
    z = group_log_partition(log_r, old, mask, groups, 2, per_token=True)
    n = np.asarray(mask.sum(1))
    gap = (np.asarray(log_r) - np.sum(np.where(mask, old, 0), 1)) / n
    for g in (0, 1):
        idx = groups == g
        # the least-squares constant c minimising sum_i (c + logpi_i/|y_i| - logR_i/|y_i|)^2 is mean(gap)
        np.testing.assert_allclose(np.asarray(z)[idx], gap[idx].mean(), rtol=1e-6)
        grid = np.linspace(-10, 10, 2001)
        best = grid[np.argmin([np.sum((c - gap[idx]) ** 2) for c in grid])]
        assert abs(best - gap[idx].mean()) < 0.011
