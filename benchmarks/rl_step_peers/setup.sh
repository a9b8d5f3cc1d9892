#!/usr/bin/env bash
# The peers of benchmarks/bench_rl_step.py: TRL 1.16 in the project's .venv (the `bench` extra: its pins agree
# with ours), Tunix 0.1.7 in .venv-tunix (its own environment: it pulls tensorflow-datasets, numba, grain,
# qwix and an older transformers). Idempotent; needs PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test,bench]'
[ -x .venv-tunix/bin/python ] || python3 -m venv .venv-tunix
.venv-tunix/bin/pip install -q 'jax==0.10.2' 'google-tunix==0.1.7'
