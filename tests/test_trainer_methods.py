"""Every shipped method runs through the one trainer: a couple of real steps on a tiny model."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from pf_jax.config import ConfigError, load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.methods.compose import load_recipe
from pf_jax.methods.registry import METHODS
from pf_jax.training.checkpoint import CheckpointMismatchError
from pf_jax.training.trainer import Trainer

TINY = [
    "model.name=tiny", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.head_dim=16", "model.log_z_width=16",
    "steps=1", "batch_size=8", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=4", "eval.enabled=false", "export=false", "optimizer.lr=1e-3",
    "logging.tensorboard=false", "logging.plots=false", "logging.progress_bar=false",
]

# Multi-turn methods roll out in the maze; a random policy rarely moves, so the entropy bonus makes sure
# the step changes the policy.
MAZE = ["model.tiny.tokenizer=maze-words", "env.tasks=[maze-3x3]", "env.task_seeds=2", "env.tasks_per_step=2",
        "env.group_size=2", "env.max_steps=2", "env.min_row_bucket=8"]

# method -> extra overrides (data source, reward) that make the recipe complete. A random tiny policy
# never answers a sum right, so policy-gradient recipes here use the entropy reward (it always varies
# within a group); the correctness reward runs in the RFT / online-DPO recipes and the default-run tests.
RECIPES = {
    "sft": ["data.source=arithmetic_noisy", "data.answer_field=completion"],
    "rft": ["reward.name=arithmetic"],
    "online_rft": ["reward.name=arithmetic"],
    "ppo": ["reward.name=entropy", "method.reward_kl_coef=0.01"],
    "grpo": ["reward.name=entropy"],
    "grpo_process": ["reward.name=entropy"],
    "dr_grpo": ["reward.name=entropy", "method.loss={norm_constant: 4.0}"],
    "dapo": ["reward.name=entropy", "method.dynamic_sampling=true", "method.overlong_max_tokens=4",
             "method.overlong_cache_tokens=2"],
    "gspo": ["reward.name=entropy"],
    "gspo_token": ["reward.name=entropy"],
    "rloo": ["reward.name=entropy"],
    "cispo": ["reward.name=entropy"],
    "reinforce_pp": ["reward.name=entropy", "method.reward_kl_coef=0.01"],
    "reinforce_pp_baseline": ["reward.name=entropy"],
    "powerflow": ["reward.format_penalty=-0.5"],
    "tb": [],
    "length_aware_tb": [],
    "tb_token": [],
    "dpo": ["data.source=arithmetic_pairs"],
    "cdpo": ["data.source=arithmetic_pairs"],
    "robust_dpo": ["data.source=arithmetic_pairs"],
    "ipo": ["data.source=arithmetic_pairs"],
    "simpo": ["data.source=arithmetic_pairs"],
    "orpo": ["data.source=arithmetic_pairs"],
    "kto": ["data.source=arithmetic_kto"],
    "online_dpo": ["reward.name=arithmetic"],
    "reward_model": ["data.source=soft_constraints_synthetic", "model.tiny.tokenizer=words",
                     "reward_model.synthetic_examples=16"],
    **{m: [*MAZE, "method.entropy_coef=0.01"] for m in ("rewardflow", "gigpo", "grpo_episode")},
}


def test_every_method_has_a_recipe_here():
    assert set(RECIPES) == set(METHODS)


def _run(tmp_path, method, extra):
    cfg = load_config(TrainConfig, None, [*TINY, f"method.name={method}", f"logging.runs_dir={tmp_path}",
                                          f"logging.run_name={method}", *extra])
    trainer = Trainer(cfg)
    before = jax.tree_util.tree_map(np.asarray, trainer.state.params["policy"])
    result = trainer.run()
    after = trainer.state.params["policy"]
    return result, before, after


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_method_trains_a_step(tmp_path, method):
    result, before, after = _run(tmp_path, method, RECIPES[method])
    assert result.completed
    loss = result.summary["loss"]["last"]
    assert loss is not None and math.isfinite(loss)
    changed = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool(np.any(a != np.asarray(b))), before, after))
    if method in ("rft", "online_rft", "online_dpo") and result.summary["kept_fraction"]["max"] == 0:
        assert not any(changed), f"{method}: nothing was kept, yet the policy changed"
    else:
        assert any(changed), f"{method}: no policy parameter changed"


@pytest.mark.parametrize("reward", ["self_certainty", "entropy", "majority_vote"])
def test_rlif_rewards_drive_grpo(tmp_path, reward):
    result, _, _ = _run(tmp_path, "grpo", [f"reward.name={reward}"])
    assert result.completed
    assert math.isfinite(result.summary["reward"]["last"])


def test_policy_gradient_without_reward_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a reward"):
        load_recipe(None, ["method.name=grpo"])


def test_unknown_method_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'grpo'"):
        load_recipe(None, ["method.name=grpoo"])


def test_misspelt_loss_argument_names_the_nearest(tmp_path):
    cfg = load_config(TrainConfig, None, [*TINY, "method.name=grpo", "reward.name=arithmetic",
                                          "method.loss={clip_lo: 0.1}", f"logging.runs_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="clip_low"):
        Trainer(cfg)


def test_unrolled_layers_train_like_scanned_layers(tmp_path):
    """model.scan_layers=false stores one parameter set per layer, starts from the same values and takes
    the same steps as the stacked, scanned layout (to float rounding: the GRPO loss is a near-cancelling sum
    of advantages x ratios, and AdamW turns rounding-level gradient differences into up-to-lr updates);
    resuming its checkpoint with the other layout is refused, naming the key."""
    runs = {}
    for scan in (True, False):
        cfg = load_config(TrainConfig, None, [*TINY, "model.tiny.num_layers=2", "steps=2", "method.name=grpo",
                                              "reward.name=entropy", f"model.scan_layers={str(scan).lower()}",
                                              f"logging.runs_dir={tmp_path}", f"logging.run_name=scan-{scan}"])
        trainer = Trainer(cfg)
        result = trainer.run()
        model = nnx.merge(trainer.graphdefs["policy"], trainer.state.params["policy"])
        assert model.scan_layers is scan and result.completed
        runs[scan] = (result.summary["loss"], jax.tree_util.tree_map(np.asarray, model.stacked_layer_arrays()))
    assert runs[False][0]["first"] == pytest.approx(runs[True][0]["first"], rel=1e-5)
    assert runs[False][0]["last"] == pytest.approx(runs[True][0]["last"], abs=1e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), runs[True][1], runs[False][1])
    resume_other = load_config(TrainConfig, None, [*TINY, "model.tiny.num_layers=2", "steps=3", "method.name=grpo",
                                                   "reward.name=entropy", "model.scan_layers=false",
                                                   f"logging.runs_dir={tmp_path}", "logging.run_name=scan-True"])
    with pytest.raises(CheckpointMismatchError, match=r"model\.scan_layers"):
        Trainer(resume_other).run()
