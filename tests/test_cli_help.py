"""The trainer explains itself: --help, --print-config [section] (every key with its default and its
description, YAML that loads back to the same recipe), method-specific keys checked before any weights
load, the startup phases on stderr, and one cache variable."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from pf_jax.config import load_config, schema_keys
from pf_jax.config.cache import cache_root
from pf_jax.config.describe import describe_config, section_names, shipped_recipes
from pf_jax.config.key_docs import KEY_DOCS
from pf_jax.config.recipe import CONFIGS_DIR, TrainConfig
from pf_jax.train import DEFAULT_RECIPE, main
from tests.test_user_errors import TINY, train_fails

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_usage_recipes_overrides_and_the_schema(capsys, flag):
    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m pf_jax.train")
    for words in ("--print-config [SECTION]", "key.sub=value", "pf_jax/config/recipe.py", "PF_JAX_CACHE",
                  "configs/default.yaml", "configs/powerflow/gemma3-270m.yaml"):
        assert words in out, words
    assert len(shipped_recipes()) == len(list(CONFIGS_DIR.rglob("*.yaml")))


def test_every_schema_key_has_one_description_and_no_description_is_stale():
    keys = set(schema_keys(TrainConfig))
    assert sorted(keys - set(KEY_DOCS)) == []
    assert sorted(set(KEY_DOCS) - keys) == []
    assert all(doc and "\n" not in doc for doc in KEY_DOCS.values())


def test_print_config_is_the_resolved_recipe_with_defaults_and_descriptions(capsys):
    assert main(["--print-config", "optimizer.lr=3e-4", "rollout.stop=[\"\\n\\n\", </answer>]"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(TrainConfig, DEFAULT_RECIPE, ["optimizer.lr=3e-4", "rollout.stop=[\"\\n\\n\", </answer>]"])
    assert yaml.safe_load(out) == cfg.model_dump(mode="json")  # the comments carry the rest
    lr = next(line for line in out.splitlines() if line.strip().startswith("lr:"))
    assert "0.0003" in lr and "(default: 1.0e-05)" in lr and KEY_DOCS["optimizer.lr"] in lr
    loss = next(line for line in out.splitlines() if line.strip().startswith("loss:"))
    assert "powerflow_loss" in loss and "clip_eps=0.2" in loss  # the method's own defaults, as a note


def test_print_config_of_one_section_and_of_an_optional_section(capsys):
    assert main(["--print-config", "rollout"]) == 0
    out = capsys.readouterr().out
    assert list(yaml.safe_load(out)) == ["rollout"]
    assert "samples_per_prompt" in out and "steps:" not in out
    cfg = load_config(TrainConfig, DEFAULT_RECIPE)
    lora = yaml.safe_load(describe_config(cfg, "model.lora"))
    assert lora["model"]["lora"]["rank"] == 16  # off in the recipe: what turning it on would give
    assert "model.lora" in section_names(TrainConfig) and "method" in section_names(TrainConfig)


def test_print_config_of_an_unknown_section_names_the_sections(capsys):
    assert main(["--print-config", "optimiser"]) == 2
    err = capsys.readouterr().err
    assert "'optimiser' is not a section" in err and "optimizer" in err


def test_keys_of_another_method_fail_before_any_weights_load(capsys, tmp_path):
    """The default recipe (PowerFlow) switched to GRPO keeps clip_eps and the log_z head's learning rate.
    The model named does not exist: the message proves the recipe was refused before loading it."""
    line = train_fails(capsys, tmp_path, ["method.name=grpo", "reward.name=arithmetic", "method.loss={clip_eps: 0.2}",
                                          "optimizer.group_lr={log_z: 0.01}", "model.name=/nonexistent/model"],
                       "keys that do not apply to method 'grpo'", "method.loss.clip_eps", "taken by powerflow",
                       "optimizer.group_lr.log_z", "no parameter group 'log_z'")
    assert "/nonexistent/model" not in line


@pytest.mark.parametrize(("overrides", "words"), [
    (["method.name=dpo", "method.alpha=0.5"], ["method.alpha=0.5", "GFlowNet methods", "powerflow, tb"]),
    (["method.name=sft", "method.entropy_coef=0.01"], ["method.entropy_coef=0.01", "policy-gradient"]),
    (["method.name=grpo", "reward.name=arithmetic", "method.reward_kl_coef=0.1"],
     ["method.reward_kl_coef=0.1", "read token rewards", "ppo, reinforce_pp"]),
    (["method.name=grpo", "reward.name=arithmetic", "method.value_coef=0.5"], ["method.value_coef", "ppo"]),
    (["method.name=sft", "env.max_steps=3"], ["env.max_steps=3", "agentic methods", "rewardflow"]),
    (["method.name=sft", "method.advantage={eps: 0.1}"], ["method.advantage.eps", "sft has no advantage estimator"]),
    (["method.name=grpo", "reward.name=arithmetic", "method.advantage={gamma: 1.0}"],
     ["method.advantage.gamma", "grpo_outcome_advantages", "ppo"]),
    (["method.name=kto", "reward.format_penalty=-1"], ["reward.format_penalty=-1.0", "GFlowNet"]),
])
def test_each_method_specific_key_names_the_methods_it_belongs_to(capsys, tmp_path, overrides, words):
    train_fails(capsys, tmp_path, ["model.name=/nonexistent/model", *overrides], *words)


def test_a_key_set_back_to_its_default_is_cleared(capsys, tmp_path):
    from pf_jax.methods.compose import check_recipe

    cfg = load_config(TrainConfig, DEFAULT_RECIPE, ["method.name=grpo", "reward.name=arithmetic", "method.loss={}",
                                                    "optimizer.group_lr={}", "method.alpha=4.0"])
    assert check_recipe(cfg).name == "grpo"


def test_startup_phases_are_logged_when_stderr_is_not_a_tty(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PF_JAX_CPU_KERNELS": "0"}
    proc = subprocess.run([sys.executable, "-m", "pf_jax.train", *TINY, f"logging.runs_dir={tmp_path}", "steps=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = [line.split(" ", 2)[2] for line in proc.stderr.splitlines() if line.startswith("[pf_jax] 0:")]
    assert phases[0] == "reading the training rows (arithmetic)", phases
    assert phases[1:] == ["step 1: first batch (the first rollout compiles the sampler)",
                          "step 1: compiling and running the train step"], phases


def test_one_cache_variable_for_models_tokenizers_and_kernels(monkeypatch, tmp_path):
    from pf_jax.kernels.library_cache import cache_dir
    from pf_jax.models.embedded import pf_jax_cache_dir
    from pf_jax.models.gguf_tokenizer import tokenizer_cache_path

    monkeypatch.setenv("PF_JAX_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("PF_JAX_CACHE_DIR", str(tmp_path / "old"))
    assert pf_jax_cache_dir() == cache_root() == tmp_path / "c"
    assert cache_dir().parent == tokenizer_cache_path("x").parent.parent == tmp_path / "c"
    monkeypatch.delenv("PF_JAX_CACHE")
    with pytest.warns(FutureWarning, match="PF_JAX_CACHE_DIR is renamed PF_JAX_CACHE"):
        assert cache_root() == tmp_path / "old"
    monkeypatch.delenv("PF_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_root() == tmp_path / "xdg" / "pf_jax"
