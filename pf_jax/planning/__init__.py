"""The dry run (`python -m pf_jax.train --dry-run [--topology NAME]`): a recipe's per-device memory without
weights or data, analytic (recipe_plan, memory_plan) or from every program it runs compiled for a TPU slice
by XLA's TPU compiler on this host (compiled_plan, compiled_report)."""
