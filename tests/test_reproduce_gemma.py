"""benchmarks/reproduce_gemma.py: its task is split cleanly and its quick run fills every row of the table
(the full run is the README's Gemma 3 270M table; this is its smoke run, a few minutes)."""

import json
import os
import sys
from pathlib import Path

import pytest

from tests.subprocesses import run_in_process_group

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import reproduce_gemma  # noqa: E402


def test_the_task_is_split_by_hash_with_correct_answers_and_no_worked_example():
    train, test = reproduce_gemma.make_problems(300, "train"), reproduce_gemma.make_problems(60, "test")
    questions = {split: [row["prompt"].rsplit("\n", 1)[1] for row in rows] for split, rows in
                 (("train", train), ("test", test))}
    assert not set(questions["train"]) & set(questions["test"])
    assert len(set(questions["train"])) == 300 and len(set(questions["test"])) == 60
    worked = reproduce_gemma.FEW_SHOT.splitlines()[:-1]
    for row, question in zip(train + test, questions["train"] + questions["test"]):
        a, op, b, equals = question.split()
        assert equals == "=" and int(row["answer"]) == eval(f"{a} {op} {b}")
        assert not any(line.startswith(question) for line in worked)
    assert {q.split()[1] for q in questions["test"]} == {"+", "-", "*"}


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


@pytest.mark.slow
def test_the_quick_run_fills_every_row_with_intervals(tmp_path):
    free = _available_gib()  # a Gemma training subprocess peaks near 10 GiB beside this worker's own memory
    if free < 12:
        pytest.skip(f"needs ~12 GiB of free memory for Gemma training subprocesses; {free:.1f} GiB available")
    out = tmp_path / "gemma.json"
    command = [sys.executable, "benchmarks/reproduce_gemma.py", "--quick", "--runs-dir", str(tmp_path / "runs"),
               "--json", str(out)]
    done = run_in_process_group(command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=1200,
                                label="reproduce_gemma")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["rows"]) == [*reproduce_gemma.INFERENCE_ROWS, *reproduce_gemma.TRAINED_ROWS]
    for label, row in report["rows"].items():
        (seed,) = row["per_seed"]
        for column in ("avg@n", "maj@n", "pass@1", "pass@n"):
            low, high = seed[column]["interval"]
            assert 0 <= low <= seed[column]["value"] <= high <= 1, (label, column)
        assert 1 <= seed["distinct_answers"]["value"] <= report["n"]
        assert row["summary"]["avg@n"]["n"] == 1
    for recipe in reproduce_gemma.TRAINED_ROWS.values():
        assert (tmp_path / "runs" / f"{Path(recipe).stem}-seed0" / "export" / "config.json").is_file()
    evaluated = json.loads((tmp_path / "runs" / "eval-trained-seed0" / "results.json").read_text())["methods"]
    assert [m["settings"]["model"] for m in evaluated] == [
        str(tmp_path / "runs" / f"{Path(r).stem}-seed0" / "export") for r in reproduce_gemma.TRAINED_ROWS.values()]
    assert "| power sampling, alpha = 4 |" in done.stdout
