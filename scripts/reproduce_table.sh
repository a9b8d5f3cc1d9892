#!/usr/bin/env bash
# Regenerates the README's table of the embedded default job: the base model once, then PowerFlow (alpha 4),
# supervised GRPO and PowerFlow (alpha 0.5) with seeds 0 1 2, each evaluated beside the base; prints mean ± std
# over the seeds and writes every seed's figures to benchmarks/results/reproduce_table.json.
# About 25 minutes on 2 CPU cores. Extra arguments go to benchmarks/reproduce_table.py (e.g. --seeds 0 1 2 3).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e .
.venv/bin/python benchmarks/reproduce_table.py "$@"
