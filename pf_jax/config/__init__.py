"""Typed configs: YAML recipes (with `extends:`) plus dotted CLI overrides, validated by pydantic schemas.

`load_config(Schema, "configs/x.yaml", ["optimizer.lr=1e-6"])` is the one config loader; the sections in
`pf_jax.config.sections` are the building blocks a trainer schema composes.
"""

from pf_jax.config.errors import ConfigError, RunStorageError, UserError, exit_code_of
from pf_jax.config.loading import (
    config_to_yaml,
    load_config,
    parse_cli_args,
    parse_override,
    schema_keys,
)
from pf_jax.config.sections import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimizerConfig,
    Section,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "OptimizerConfig",
    "RunStorageError",
    "Section",
    "UserError",
    "config_to_yaml",
    "exit_code_of",
    "load_config",
    "parse_cli_args",
    "parse_override",
    "schema_keys",
]
