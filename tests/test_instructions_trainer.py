"""Instruction following through the one trainer: the reward_model family (train, export, load as the soft
scorer), the curriculum as GRPO's prompt source, and bad input through the reward path of a step."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.config import ConfigError, load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.rewards.errors import RewardOutputError
from pf_jax.tasks.instructions.classifier_files import load_soft_scorer
from pf_jax.tasks.instructions.reward_model import classifier_batch
from pf_jax.tasks.instructions.rows import CurriculumBatches, write_jsonl
from pf_jax.training.trainer import Trainer

TINY = [
    "model.name=tiny", "model.tiny.tokenizer=words", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=1", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.head_dim=16",
    "optimizer.lr=3e-3", "logging.tensorboard=false", "logging.plots=false", "logging.progress_bar=false",
    "checkpoint.resume=false",
]
REWARD_MODEL = ["method.name=reward_model", "data.source=soft_constraints_synthetic", "steps=2", "batch_size=8",
                "reward_model.synthetic_examples=16", "reward_model.eval_examples=8", "reward_model.mlp_dim=16",
                "reward_model.max_length=32", "eval.split=test"]
GRPO = ["method.name=grpo", "reward.name=instructions", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=4", "eval.enabled=false", "export=false"]


def _trainer(tmp_path, name, *overrides):
    cfg = load_config(TrainConfig, None, [*TINY, f"logging.runs_dir={tmp_path}", f"logging.run_name={name}", *overrides])
    return Trainer(cfg)


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _changed(before, after):
    return any(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool(np.any(a != np.asarray(b))),
                                                                before, after)))


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    trainer = _trainer(tmp, "rm", *REWARD_MODEL)
    before = _host(trainer.state.params)
    result = trainer.run()
    return trainer, before, result


def test_reward_model_family_trains_a_step(classifier_run):
    trainer, before, result = classifier_run
    assert result.completed and math.isfinite(result.summary["loss"]["last"])
    assert _changed(before["classifier"], trainer.state.params["classifier"])
    assert _changed(before["policy"], trainer.state.params["policy"])
    ev = result.summary["classifier_eval"]
    assert ev["examples"] == 8 and 0.0 <= ev["accuracy"] <= 1.0
    saved = json.loads((trainer.run_dir / "classifier_eval.json").read_text())
    assert saved["accuracy"] == ev["accuracy"] and saved["split"] == "test"


def test_reward_model_export_loads_as_the_same_soft_scorer(classifier_run):
    trainer, _, result = classifier_run
    responses = ["I saw a dog near the museum.", "The bakery was plain today.", "", "What a lovely parade we had."]
    constraints = ["Mention an animal.", "Respond in a cheerful tone.", "Mention an animal.", "Respond in a cheerful tone."]
    # independent path: the trainer's own modules on the training batch layout
    batch = classifier_batch(trainer.codec, [{"response": r, "constraint": c, "label": 0}
                                             for r, c in zip(responses, constraints)], 32)
    policy = nnx.merge(trainer.graphdefs["policy"], trainer.state.params["policy"])
    head = nnx.merge(trainer.graphdefs["classifier"], trainer.state.params["classifier"])
    positions = jnp.broadcast_to(jnp.arange(batch["tokens"].shape[1]), batch["tokens"].shape)
    hidden, _ = policy(batch["tokens"], positions, batch["mask"])
    want = np.asarray(jax.nn.sigmoid(head(hidden, batch["mask"])))
    for batch_size in (3, 16):  # padding of the last scorer batch must not change a probability
        got = load_soft_scorer(result.export_dir, batch_size=batch_size)(responses, constraints)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(want, 6))) > 1  # the head is not constant


def test_reward_model_export_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"constraint_classifier\.json is missing"):
        load_soft_scorer(tmp_path)


def test_frozen_backbone_trains_the_head_only(tmp_path):
    """Frozen means untouched by every part of the update, AdamW's decoupled weight decay included, and
    no optimizer moments are kept for the backbone."""
    trainer = _trainer(tmp_path, "frozen", *REWARD_MODEL, "steps=1", "export=false", "eval.enabled=false",
                       "reward_model.freeze_backbone=true", "optimizer.name=adamw", "optimizer.weight_decay=0.1")
    before = _host(trainer.state.params)
    size = lambda tree: sum(np.size(x) for x in jax.tree_util.tree_leaves(tree))
    assert size(trainer.state.opt_state) < 3 * size(before["classifier"]) + 100  # Adam m, v of the head only
    trainer.run()
    assert _changed(before["classifier"], trainer.state.params["classifier"])
    assert not _changed(before["policy"], trainer.state.params["policy"])


def test_curriculum_drives_grpo_with_the_classifier_soft_score(classifier_run, tmp_path):
    _, _, rm = classifier_run
    trainer = _trainer(tmp_path, "grpo", *GRPO, "steps=2", "data.source=instructions_synthetic",
                       f"reward.soft_scorer={rm.export_dir}", "curriculum.schedule=linear",
                       "curriculum.start_level=1", "curriculum.end_level=3", "curriculum.ramp_steps=2")
    assert isinstance(trainer.prompts, CurriculumBatches)
    source = trainer.prompts.source
    for step, cap in [(0, 1), (1, 2), (2, 3), (50, 3)]:  # linear ramp 1 -> 3 over 2 steps
        levels = [r.level for r in source.batch(step, 64)]
        assert max(levels) == cap and min(levels) == 1
    before = _host(trainer.state.params["policy"])
    result = trainer.run()
    assert result.completed and _changed(before, trainer.state.params["policy"])
    s = result.summary
    assert s["reward/count_scored"]["last"] + s["reward/count_empty_response"]["last"] == 8
    assert 0.0 <= s["reward"]["min"] <= s["reward"]["max"] <= 1.0
    assert set(k for k in s if k.startswith("reward/level_")) <= {"reward/level_1", "reward/level_2"}
    # the data position is the step count, and restoring it replays the same prompts
    assert trainer.prompts.state.position == 2
    nxt = trainer.prompts.next_batch()
    trainer.prompts.restore(type(trainer.prompts.state)(0, 2, source.seed, len(source.instructions)))
    assert trainer.prompts.next_batch() == nxt


def test_bad_instruction_rows_are_scored_zero_and_counted_in_a_step(tmp_path):
    rows = [
        {"prompt": "Write about the garden without commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]},
        {"prompt": "Write about the garden.", "instruction_id_list": ["punctuation:no_commas"], "kwargs": [{}]},
        {"prompt": "Write about the garden in few words.", "instruction_id_list": ["length_constraints:number_words"],
         "kwargs": [{"num_words": 10, "relation": "about"}]},
        {"prompt": "Write about the market."},  # no instruction_id_list: a bad data row, skipped and counted
    ]
    path = write_jsonl(rows, tmp_path / "ifeval.jsonl")
    trainer = _trainer(tmp_path, "bad", *GRPO, "steps=1", f"data.source={path}", "rollout.prompts_per_step=3",
                       "data.shuffle=false")
    assert len(trainer.rows) == 3
    result = trainer.run()
    s = {k: v["last"] for k, v in result.summary.items()}
    assert s["reward/count_unknown_instruction_id"] == 2 and s["reward/count_malformed_kwargs"] == 2
    assert s["reward/count_scored"] + s["reward/count_empty_response"] == 2
    assert s["reward"] <= 1.0 / 3.0 + 1e-6  # only the valid third of the rows can score


def test_instruction_source_needs_a_sampling_method(tmp_path):
    with pytest.raises(ConfigError, match="use a sampling method"):
        _trainer(tmp_path, "sft", "method.name=sft", "data.source=instructions_synthetic_hard")


def test_a_failing_soft_score_is_reported_with_its_row(tmp_path):
    path = write_jsonl([{"id": "a", "task": "Write about the garden.", "constraints": [{"text": "Be cheerful."}]}],
                       tmp_path / "curriculum.jsonl")
    trainer = _trainer(tmp_path, "nosoft", *GRPO, "steps=1", f"data.source={path}", "rollout.prompts_per_step=1")
    # reward.on_error=stop (the default) turns the reward's own error into one user error naming the row
    with pytest.raises(RewardOutputError, match=r"RewardFunctionError: .*row 0: row has a soft constraint but "
                                                r"InstructionReward has no soft_scorer"):
        trainer.run()


def test_pseudo_labels_from_the_policy_train_the_reward_model(tmp_path):
    from pf_jax.pseudo_labels import main as collect

    out = tmp_path / "labels.jsonl"
    collect([f"--out={out}", *TINY, "data.source=instructions_synthetic", "curriculum.synthetic_instructions=4",
             "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "method.name=reward_model"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {r["label"] for r in rows} == {0, 1}
    for r in rows:  # a positive answered the level that asked for the constraint, a negative the level before
        assert r["constraint"] in ("Respond in a cheerful tone.", "Mention an animal.")
        assert r["level"] >= 1 if r["label"] else r["level"] >= 0
    bad = dict(rows[0], label=2)
    path = write_jsonl([*rows, bad], tmp_path / "with_bad.jsonl")
    trainer = _trainer(tmp_path, "rm_pl", "method.name=reward_model", f"data.source={path}", "steps=1",
                       "batch_size=4", "export=false", "eval.enabled=false")
    assert len(trainer.rows) == len(rows)  # the label-2 row is skipped and counted
    assert math.isfinite(trainer.run().summary["loss"]["last"])
