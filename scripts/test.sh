#!/usr/bin/env bash
# Sets up a virtual environment (idempotent) and runs ruff and the whole test suite.
# pytest exits non-zero on any failure and with code 5 when no test ran, so neither passes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
# transformers 4.57 beside the venv's 5.x, for the test that reads our exports with it (tests/test_export_serving.py)
[ -d .venv/transformers4/transformers ] || .venv/bin/pip install -q --target .venv/transformers4 --no-deps \
  transformers==4.57.1 'huggingface_hub<1' 'tokenizers<0.23'
export PF_JAX_TRANSFORMERS4="$PWD/.venv/transformers4"
.venv/bin/ruff check pf_jax tests benchmarks launch
.venv/bin/python -m pytest -n 2 "$@"
