"""Custom rewards from the recipe (reward.name: module:function, TRL's reward_funcs convention) and from
Python (train(cfg, reward_fn=...)), the reward.on_error policy for a row that raises or is not finite, and
sample completions in the logs (completions.jsonl, TensorBoard text)."""

import json
import textwrap

import numpy as np
import pytest

from pf_jax.config import ConfigError, load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.rewards.custom import guarded
from pf_jax.rewards.errors import RewardOutputError
from pf_jax.tasks.rewards import build_reward
from pf_jax.training.metrics import read_metrics
from pf_jax.training.run import train
from tests.test_trainer_methods import TINY

ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}]
GROUPS = np.array([0, 0, 1, 1])
TEXTS = ["3", "4", "bad", "4"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        CALLS = []

        def exact(prompts, completions, answer, **fields):
            CALLS.append((list(prompts), list(completions), list(answer), sorted(fields)))
            return [float(c.strip() == a) for c, a in zip(completions, answer)]

        def picky(prompts, completions, **fields):
            if any(c == "bad" for c in completions):
                raise ValueError("cannot parse 'bad'")
            return [1.0] * len(completions)

        def nan_on_bad(prompts, completions, **fields):
            return [float("nan") if c == "bad" else 0.5 for c in completions]

        def too_few(prompts, completions, **fields):
            return [1.0]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("my_rewards", None)
    return importlib.import_module("my_rewards")


def test_a_module_function_gets_prompts_completions_and_the_row_fields(user_module):
    reward = build_reward("my_rewards:exact", scale=2.0)
    out = reward(ROWS, TEXTS, GROUPS)
    np.testing.assert_allclose(out.rewards, [2.0, 0.0, 0.0, 2.0])
    assert user_module.CALLS == [(["1+2=", "1+2=", "2+2=", "2+2="], TEXTS, ["3", "3", "4", "4"], [])]
    assert out.metrics["errors"] == 0


def test_a_raising_row_stops_the_run_naming_it(user_module):
    with pytest.raises(RewardOutputError) as caught:
        build_reward("my_rewards:picky")(ROWS, TEXTS, GROUPS)
    message = str(caught.value)
    for words in ("'my_rewards:picky' failed on 1 of 4 completions", "response 2", "prompt row 1: '2+2='",
                  "completion 'bad'", "raised ValueError: cannot parse 'bad'"):
        assert words in message
    assert "reward.on_error=zero" in caught.value.hint


def test_zero_policy_gives_the_row_zero_counts_and_prints_it(user_module, capsys):
    out = build_reward("my_rewards:picky", on_error="zero")(ROWS, TEXTS, GROUPS)
    np.testing.assert_allclose(out.rewards, [1.0, 1.0, 0.0, 1.0])
    assert out.metrics["errors"] == 1
    assert "response 2" in capsys.readouterr().err
    out = build_reward("my_rewards:nan_on_bad", on_error="zero")(ROWS, TEXTS, GROUPS)
    np.testing.assert_allclose(out.rewards, [0.5, 0.5, 0.0, 0.5])
    with pytest.raises(RewardOutputError, match="returned nan"):
        build_reward("my_rewards:nan_on_bad")(ROWS, TEXTS, GROUPS)


def test_a_wrong_number_of_rewards_always_stops(user_module):
    with pytest.raises(RewardOutputError, match="returned 1 values for 4 completions"):
        build_reward("my_rewards:too_few", on_error="zero")(ROWS, TEXTS, GROUPS)


def test_a_batch_failure_no_row_explains_is_reported_as_such():
    def only_batches_fail(rows, responses, group_ids):
        if len(responses) > 1:
            raise RuntimeError("batch too large")
        from pf_jax.rewards.text_rewards import RewardOutput
        return RewardOutput(np.ones(1, np.float32), [None])

    with pytest.raises(RewardOutputError, match="on a batch of 4 completions, and on none of them alone"):
        guarded("f", only_batches_fail, "zero")(ROWS, TEXTS, GROUPS)


@pytest.mark.parametrize(("name", "words"), [
    ("no_such_module:f", "cannot import module 'no_such_module'"),
    ("my_rewards:absent", "module 'my_rewards' has no function 'absent'"),
    ("exactness", "unknown reward 'exactness'"),
])
def test_a_reward_that_does_not_exist_fails_before_any_weights_load(user_module, capsys, tmp_path, name, words):
    from tests.test_user_errors import train_fails

    train_fails(capsys, tmp_path, ["method.name=grpo", f"reward.name={name}", "model.name=/nonexistent/model"], words)


def _grpo(tmp_path, *extra):
    return load_config(TrainConfig, None, [*TINY, "method.name=grpo", "optimizer.group_lr={}", "steps=2",
                                           "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
                                           f"logging.runs_dir={tmp_path}", "logging.run_name=r", *extra])


def test_train_with_a_python_reward_fn_and_completions_in_the_logs(tmp_path):
    seen = []

    def length_reward(prompts, completions, answer, **fields):  # a closure: not importable, registered in-process
        seen.append(len(completions))
        return [float(len(c)) for c in completions]

    result = train(_grpo(tmp_path, "logging.completions_every=1", "logging.completions_count=3",
                         "logging.tensorboard=true"), reward_fn=length_reward)
    assert result.completed and seen == [8, 8]
    records = [json.loads(line) for line in (tmp_path / "r" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 1, 2, 2, 2]
    for r in records:
        assert r["reward"] == float(len(r["completion"])) and r["prompt"].endswith("=")
        assert isinstance(r["advantage"], float)
    logged = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert logged[0]["reward/errors"] == 0
    events = b"".join(p.read_bytes() for p in (tmp_path / "r" / "tensorboard").iterdir())
    assert b"completions" in events and b"| prompt | completion | reward | advantage |" in events


def test_reward_fn_and_reward_name_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="both name the reward"):
        train(_grpo(tmp_path, "reward.name=arithmetic"), reward_fn=lambda prompts, completions, **kw: [0.0])


def test_the_readme_example_reward_scores_correct_and_brief(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    reward = build_reward("rewards:correct_and_brief", scale=1.0)
    out = reward(ROWS, ["3", "3 because", "5", "x 4"], GROUPS)
    np.testing.assert_allclose(out.rewards, [1.0, 1.0 - 0.08, 0.0, 1.0])
