"""Config loading: YAML files with `extends:`, dotted overrides, unknown keys and bad values, optimizers."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pf_jax.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    OptimizerConfig,
    Section,
    config_to_yaml,
    load_config,
    parse_cli_args,
    parse_override,
    schema_keys,
)
from pf_jax.training.optimizer import build_optimizer, learning_rate_schedule


class PowerFlowSection(Section):
    alpha: float = 4.0
    log_z_lr: float = 1e-3


class Recipe(Section):
    steps: int = 10
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    data: DataConfig = DataConfig()
    powerflow: PowerFlowSection | None = None


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_without_file():
    cfg = load_config(Recipe)
    assert cfg == Recipe()
    assert cfg.optimizer.name == "adamw" and cfg.powerflow is None


def test_extends_chain_merges_sections_and_overrides_win(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "common.yaml", """
        steps: 100
        optimizer: {name: adam, lr: 1e-4, weight_decay: 0.1}
        logging: {run_name: base}
    """)
    write(tmp_path / "cpu.yaml", """
        extends: base/common.yaml
        optimizer:
          lr: 3e-4
        powerflow: {alpha: 2}
    """)
    cfg = load_config(Recipe, tmp_path / "cpu.yaml", ["optimizer.lr=1e-6", "powerflow.alpha=0.5"])
    assert cfg.steps == 100
    assert cfg.optimizer.name == "adam" and cfg.optimizer.weight_decay == 0.1
    assert cfg.optimizer.lr == 1e-6
    assert cfg.powerflow == PowerFlowSection(alpha=0.5)
    assert cfg.logging.run_name == "base"
    assert load_config(Recipe, tmp_path / "cpu.yaml").optimizer.lr == 3e-4  # YAML 1.1 would read a string


def test_extends_list_and_cycle(tmp_path):
    write(tmp_path / "a.yaml", "steps: 1\noptimizer: {lr: 0.5}\n")
    write(tmp_path / "b.yaml", "steps: 2\n")
    write(tmp_path / "c.yaml", "extends: [a.yaml, b.yaml]\n")
    cfg = load_config(Recipe, tmp_path / "c.yaml")
    assert (cfg.steps, cfg.optimizer.lr) == (2, 0.5)
    write(tmp_path / "x.yaml", "extends: y.yaml\n")
    write(tmp_path / "y.yaml", "extends: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Recipe, tmp_path / "x.yaml")


@pytest.mark.parametrize(
    ("override", "unknown", "nearest"),
    [
        ("trainer.lr=1e-6", "trainer.lr", "optimizer.lr"),
        ("optimzer.lr=1", "optimzer.lr", "optimizer.lr"),
        ("stpes=3", "stpes", "steps"),
        ("checkpoint.every_step=5", "checkpoint.every_steps", None),
        ("data.prompt_feild=q", "data.prompt_feild", "data.prompt_field"),
    ],
)
def test_unknown_key_names_full_key_and_nearest(override, unknown, nearest):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, None, [override])
    message = str(info.value)
    assert message.startswith(f"unknown config key '{key}'")
    expected = nearest or unknown
    assert f"did you mean '{expected}'?" in message


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path / "r.yaml", "logging:\n  runs_dri: out\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'logging.runs_dri'; did you mean 'logging.runs_dir'\?"):
        load_config(Recipe, path)
    with pytest.raises(ConfigError, match=r"r\.yaml"):
        load_config(Recipe, path)


@pytest.mark.parametrize(
    ("override", "field", "expects"),
    [
        ("optimizer.lr=fast", "optimizer.lr", "valid number"),
        ("optimizer.lr=-1", "optimizer.lr", "greater than 0"),
        ("optimizer.name=adagrad", "optimizer.name", "'adamw', 'adam', 'sgd' or 'lion'"),
        ("checkpoint.keep=0", "checkpoint.keep", "greater than or equal to 1"),
        ("data.on_bad_row=ignore", "data.on_bad_row", "'skip' or 'stop'"),
        ("steps=[1, 2]", "steps", "valid integer"),
        ("optimizer.group_lr={log_z: -1}", "optimizer", "group_lr.log_z must be a positive"),
    ],
)
def test_wrong_value_names_field_and_expectation(override, field, expects):
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, None, [override])
    assert f"config key '{field}'" in str(info.value)
    assert expects in str(info.value)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Recipe, tmp_path / "missing.yaml")
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Recipe, tmp_path / "list.yaml")
    write(tmp_path / "bad.yaml", "steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Recipe, tmp_path / "bad.yaml")
    for bad in ["steps", "=3", "a..b=1"]:
        with pytest.raises(ConfigError, match=r"key\.sub=value"):
            parse_override(bad)


def test_configs_are_frozen():
    cfg = load_config(Recipe)
    with pytest.raises(Exception, match="frozen"):
        cfg.optimizer.lr = 1.0  # type: ignore[misc]


@given(st.floats(min_value=1e-12, max_value=10.0, allow_nan=False, allow_infinity=False))
def test_float_overrides_round_trip(lr):
    for text in (repr(lr), f"{lr:e}"):
        assert load_config(Recipe, None, [f"optimizer.lr={text}"]).optimizer.lr == float(text)


def test_override_values_are_yaml_scalars():
    assert parse_override("a.b=1e-6") == ("a.b", 1e-6)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")
    assert parse_override("a=[1, 2]") == ("a", [1, 2])


def test_cli_args():
    assert parse_cli_args([]) == (None, [])
    assert parse_cli_args(["--config", "a.yaml", "x.y=1", "z=2"]) == ("a.yaml", ["x.y=1", "z=2"])
    assert parse_cli_args(["x=1", "--config=b.yaml"]) == ("b.yaml", ["x=1"])
    for argv, message in [
        (["--lr", "1"], "unknown option '--lr'"),
        (["--config"], "needs a path"),
        (["--config", "a", "--config", "b"], "given twice"),
        (["steps"], "key.sub=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_cli_args(argv)


@given(
    st.floats(1e-9, 10.0),
    st.sampled_from(["adamw", "adam", "sgd", "lion"]),
    st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.floats(1e-6, 1.0), max_size=2),
    st.none() | st.floats(0.5, 3.0),
)
def test_dumped_yaml_loads_back_equal(tmp_path_factory, lr, name, group_lr, alpha):
    powerflow = None if alpha is None else PowerFlowSection(alpha=alpha)
    cfg = Recipe(optimizer=OptimizerConfig(lr=lr, name=name, group_lr=group_lr), powerflow=powerflow)
    path = tmp_path_factory.mktemp("dump") / "cfg.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(Recipe, path) == cfg


def test_schema_keys_cover_sections_and_leaves():
    keys = schema_keys(Recipe)
    assert {"optimizer", "optimizer.lr", "powerflow.alpha", "data.on_bad_row", "steps"} <= set(keys)


# --- optimizer ---------------------------------------------------------------------------------------


def test_schedules_match_closed_form():
    cfg = OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=10, final_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg, total_steps=110)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    s = 50
    expected = 0.1 + 0.9 * (1 + np.cos(np.pi * s / 100)) / 2
    assert float(lr(10 + s)) == pytest.approx(expected, rel=1e-5)
    assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)
    linear = learning_rate_schedule(OptimizerConfig(lr=2.0, schedule="linear"), total_steps=4)
    assert [float(linear(i)) for i in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    with pytest.raises(ConfigError, match="decay_steps"):
        learning_rate_schedule(OptimizerConfig(schedule="cosine", warmup_steps=10), total_steps=10)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion"])
def test_each_optimizer_decreases_a_quadratic(name):
    cfg = OptimizerConfig(name=name, lr=0.05, grad_clip_norm=None)
    tx = build_optimizer(cfg, total_steps=100)
    params = {"w": jnp.array([3.0, -2.0])}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)
    start = loss(params)
    for _ in range(20):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert loss(params) < 0.5 * start


def test_group_lr_gives_log_z_its_own_rate_and_clip_is_global():
    cfg = OptimizerConfig(name="sgd", lr=0.1, group_lr={"log_z": 1.0}, grad_clip_norm=None)
    labels = lambda p: {"policy": "default", "log_z": "log_z"}
    tx = build_optimizer(cfg, total_steps=10, param_labels=labels)
    params = {"policy": jnp.ones(3), "log_z": jnp.zeros(())}
    grads = {"policy": jnp.ones(3), "log_z": jnp.ones(())}
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["policy"], -0.1 * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(updates["log_z"], -1.0, rtol=1e-6)
    # Clipping sees the norm over every group: ||g|| = 2, clip to 1 halves both.
    clipped = build_optimizer(cfg.model_copy(update={"grad_clip_norm": 1.0}), 10, param_labels=labels)
    updates, _ = clipped.update(grads, clipped.init(params), params)
    np.testing.assert_allclose(updates["log_z"], -0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["policy"], -0.05 * np.ones(3), rtol=1e-6)


def test_group_lr_errors_name_the_groups():
    cfg = OptimizerConfig(group_lr={"value_head": 1e-3})
    with pytest.raises(ConfigError, match="no parameter labels"):
        build_optimizer(cfg, 10)
    tx = build_optimizer(cfg, 10, param_labels={"w": "default"})
    with pytest.raises(ConfigError, match=r"\['value_head'\] that no parameter has"):
        tx.init({"w": jnp.ones(2)})
