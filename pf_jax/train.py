"""`python -m pf_jax.train [--config configs/X.yaml] [key.sub=value ...] [--print-config [SECTION]] [--dry-run
[--topology NAME] [--json PATH]]`; `--help` says what each does and lists the shipped recipes.

With no arguments it runs the embedded default, configs/default.yaml: PowerFlow (alpha = 4, no labels,
no reward) on the built-in arithmetic base model, trained first by SFT on a noisy corpus if it is not
there yet, then held-out accuracy of base vs PowerFlow as a table and plots under runs/.

--dry-run prints the recipe's per-device memory plan without weights or data; with --topology (a TPU slice,
e.g. v5p:4x4x4) every program it runs is compiled for that slice by XLA's TPU compiler on this host, and
--json PATH writes that compiled plan (peak_bytes, fits, per program) as JSON.

A user's mistake (config, data, weights, an unwritable run directory, a run whose updates are all skipped:
pf_jax.config.errors.UserError) is one line on stderr, `pf_jax.train: <message>`, and exit code 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pf_jax.config import ConfigError, exit_code_of, load_config
from pf_jax.config.describe import describe_config, print_config_request, usage_text
from pf_jax.config.loading import parse_cli_args
from pf_jax.config.recipe import CONFIGS_DIR
from pf_jax.phases import show_phases

DEFAULT_RECIPE = CONFIGS_DIR / "default.yaml"


def take_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """(value of `flag VALUE` or `flag=VALUE`, argv without it); a flag without a value is a ConfigError."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{flag} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: its exit code (2 with one line on stderr for a UserError)."""
    return exit_code_of("pf_jax.train", lambda: run(list(sys.argv[1:] if argv is None else argv)))


def run(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(usage_text())
        return 0
    print_config, section, argv = print_config_request(argv)
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    from pf_jax.config.recipe import TrainConfig
    from pf_jax.methods.compose import compose
    from pf_jax.methods.recipe_checks import method_notes

    topology, argv = take_option(argv, "--topology")
    json_path, argv = take_option(argv, "--json")
    if (topology or json_path) and not dry_run:
        raise ConfigError("--topology and --json go with --dry-run")
    if json_path and not topology:
        raise ConfigError("--json writes the compiled plan: name a TPU slice with --topology (e.g. v5e:2x2)")
    if topology:  # before anything loads libtpu
        from pf_jax.sharding.topology import prepare_libtpu_environment

        prepare_libtpu_environment(topology)
    path, overrides = parse_cli_args(argv)
    show_phases()  # loading weights, compiling, ...: one line each on stderr (pf_jax/phases.py)
    cfg = load_config(TrainConfig, path or DEFAULT_RECIPE, overrides)
    if print_config:
        print(describe_config(cfg, section, notes=method_notes(cfg)), end="")
        return 0
    compose(cfg)  # the recipe against its method (a key it cannot take, a missing reward) before weights load
    if dry_run:
        from pf_jax.planning.dry_run import dry_run as plan

        plan(cfg, topology=topology, json_path=json_path)
        return 0
    from pf_jax.training.guards import check_writable
    from pf_jax.training.run import train

    check_writable(cfg)  # before any model is loaded or step is spent
    result = train(cfg)
    if not result.completed:
        print(f"[pf_jax] stopped at step {result.final_step}; rerun the same command to resume")
        return 0
    print(f"[pf_jax] finished {result.run_dir} (step {result.final_step})")
    if result.export_dir is not None:
        print(f"[pf_jax] weights exported to {result.export_dir} (HF safetensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
