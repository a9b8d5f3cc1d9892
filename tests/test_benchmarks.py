"""The sampler benchmark runs end to end (a tiny setting): it is the issue's measuring tool, and a GPU
session must find it working. Speed itself is not asserted here (see benchmarks/)."""

import json
import os
import sys
from pathlib import Path

import pytest

from tests.subprocesses import run_in_process_group

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", ["bfloat16"])  # float32 is the default every other sampler test runs; one run
def test_sampler_benchmark_reports_both_implementations(tmp_path, dtype):  # of the script costs a minute
    out = tmp_path / "bench.json"
    command = [sys.executable, "benchmarks/bench_sampler.py", "--batch", "2", "--new-tokens", "3", "--repeats", "1",
               "--dtype", dtype, "--json", str(out)]
    done = run_in_process_group(command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600,
                                label="bench_sampler")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dtype"] == dtype and report["device"].startswith("cpu")
    bytes_per_param = {"float32": 4, "bfloat16": 2}[dtype]
    assert report["weight_bytes"] == bytes_per_param * 268_098_176  # Gemma 3 270M, every weight once
    (row,) = report["rows"]
    assert (row["batch"], row["new_tokens"]) == (2, 3)
    assert row["ours_tok_s_best"] > 0 and row["transformers_tok_s_best"] > 0
    assert row["ratio_best"] == pytest.approx(row["ours_tok_s_best"] / row["transformers_tok_s_best"])
    assert row["roofline_tok_s"] == pytest.approx(2 * max(report["bandwidth_bytes_s"].values()) / report["weight_bytes"])
    assert f"Gemma 3 270M, {dtype}, cpu" in done.stdout
