"""`python -m pf_jax.train --config X.yaml --dry-run [--topology NAME] [--json PATH]`: the recipe's
per-device memory on its mesh without weights or data, analytic (pf_jax.planning.recipe_plan) or, with a
TPU slice named, every program compiled for it by XLA's TPU compiler on this host
(pf_jax.planning.compiled_plan)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pf_jax.config.recipe import TrainConfig
from pf_jax.planning.compiled_plan import CompiledPlan, compile_recipe
from pf_jax.planning.compiled_report import format_compiled_plan, write_json
from pf_jax.planning.memory_plan import MemoryPlan, format_plan
from pf_jax.planning.recipe_plan import plan_recipe


def dry_run(cfg: TrainConfig, *, device_count: int | None = None, echo: Callable[[str], None] = print,
            topology: str | None = None, json_path: str | Path | None = None) -> MemoryPlan | CompiledPlan:
    """Print the recipe's per-device memory table and fit verdicts; returns the plan. With `topology` (a TPU
    slice such as v5p:4x4x4) every program of the recipe is compiled for it instead
    (pf_jax.planning.compiled_plan), and `json_path` receives the compiled plan as JSON."""
    if topology is None:
        plan, note = plan_recipe(cfg, device_count=device_count)
        echo(format_plan(plan) + note)
        return plan
    compiled = compile_recipe(cfg, topology)
    echo(format_compiled_plan(compiled, cfg))
    if json_path is not None:
        echo(f"[pf_jax] compiled plan written to {write_json(compiled, cfg, json_path)}")
    return compiled
