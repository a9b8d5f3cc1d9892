"""A real held-out split: eval.fraction holds a hash-chosen share of data.source out of training and
evaluates on exactly it; eval.source names a separate file; and by default the in-run evaluation never
scores a row the run trains on (a local file has no splits: the evaluation is skipped, saying why)."""

import json

import pytest

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.holdout import held_out, split_held_out
from pf_jax.methods.compose import compose
from pf_jax.methods.prompts import training_rows
from pf_jax.tasks.sources import load_prompt_rows
from pf_jax.training.evaluators import HeldOutAccuracy, evaluator_for, held_out_source, scores_training_rows
from pf_jax.training.model_source import tiny_codec

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 30) for b in range(10, 20)]


def _file(tmp_path, rows=ROWS, name="sums.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(*overrides):
    return load_config(TrainConfig, None, ["method.name=grpo", "reward.name=math", "model.name=tiny",
                                           "optimizer.group_lr={}", *overrides])


def test_the_hash_holdout_is_stable_disjoint_and_order_free():
    train, test = split_held_out(ROWS, 0.2)
    assert 0.12 < len(test) / len(ROWS) < 0.28
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    again = split_held_out(ROWS[::-1], 0.2)[1]
    assert sorted(r["prompt"] for r in again) == sorted(r["prompt"] for r in test)
    assert held_out({"prompt": "3+4="}, 0.5) == held_out({"prompt": "3+4=", "answer": "other"}, 0.5)


def test_eval_fraction_is_left_out_of_training_and_is_what_is_evaluated(tmp_path):
    cfg = _cfg(f"data.source={_file(tmp_path)}", "eval.fraction=0.2")
    trained = training_rows(cfg, compose(cfg).kind, tiny_codec("char"))
    evaluator = evaluator_for(cfg, compose(cfg), tiny_codec("char"), None, tmp_path)
    problems = evaluator.problems()
    assert len(trained) + len(problems) == len(ROWS)
    assert {r["prompt"] for r in trained}.isdisjoint(p.prompt for p in problems)
    assert scores_training_rows(cfg) is None


def test_eval_source_is_a_separate_file(tmp_path):
    held = [{"prompt": "91+8=", "answer": "99"}, {"prompt": "70+7=", "answer": "77"}]
    cfg = _cfg(f"data.source={_file(tmp_path)}", f"eval.source={_file(tmp_path, held, 'held.jsonl')}")
    assert [p.prompt for p in HeldOutAccuracy(cfg, tiny_codec("char"), None, {}).problems()] == ["91+8=", "70+7="]
    assert len(training_rows(cfg, "policy", tiny_codec("char"))) == len(ROWS)


def test_by_default_a_local_file_is_never_scored_as_held_out(tmp_path, capsys):
    cfg = _cfg(f"data.source={_file(tmp_path)}")
    assert evaluator_for(cfg, compose(cfg), tiny_codec("char"), None, tmp_path) is None
    out = capsys.readouterr().out
    assert "no held-out evaluation" in out and "local file" in out and "eval.fraction" in out


def test_a_split_that_is_the_training_split_is_refused_and_the_synthetic_test_split_is_not():
    same = _cfg("data.source=arithmetic", "eval.split=train")
    assert "eval.split='train' is data.split" in scores_training_rows(same)
    default = _cfg("data.source=arithmetic")
    assert scores_training_rows(default) is None
    data, fraction = held_out_source(default)
    test = {r["prompt"] for r in load_prompt_rows(data).rows}
    train = {r["prompt"] for r in load_prompt_rows(default.data).rows}
    assert fraction is None and test and test.isdisjoint(train)


def test_a_fraction_that_leaves_nothing_to_train_on_is_named(tmp_path):
    from pf_jax.config import ConfigError

    cfg = _cfg(f"data.source={_file(tmp_path, ROWS[:1])}", "eval.fraction=0.5")
    with pytest.raises(ConfigError, match=r"eval\.fraction=0\.5 of the 1 rows"):
        training_rows(cfg, "policy", tiny_codec("char"))
