"""Regenerate the README's table of the embedded default job: each arithmetic recipe trained with several
seeds from the same base model, evaluated on the same held-out problems, reported as mean ± std over the
seeds with every seed's figures in the JSON.

    python benchmarks/reproduce_table.py                      # 3 recipes x seeds 0 1 2 (about 20 min on 2 cores)
    python benchmarks/reproduce_table.py --seeds 0 --steps 2  # a smoke run

What a seed changes: the trainer's seed (`seed=`), i.e. the policy's rollouts and updates, and the evaluation's
sampling key, so the base row's spread (one evaluation per seed) is the evaluation's own sampling noise over the
same model. The base
model itself is built once (runs_dir/arith-base) and shared, as in the README.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {  # README row label -> recipe; the base row comes from every run's own evaluation of the base
    "PowerFlow, alpha = 4 (default)": "configs/default.yaml",
    "supervised GRPO (correctness reward)": "configs/arith/grpo.yaml",
    "PowerFlow, alpha = 0.5": "configs/arith/powerflow-alpha0.5.yaml",
}
COLUMNS = ("avg@8", "maj@8", "pass@2", "pass@8", "distinct-1")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (" (AMX)" if "amx_tile" in flags else " (no AMX)")
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train(recipe: str, seed: int, runs_dir: Path, steps: int | None) -> tuple[Path, float]:
    """One training run (with its final evaluation beside the base model's); returns its directory and wall time."""
    name = f"{Path(recipe).stem}-seed{seed}"
    argv = [sys.executable, "-m", "pf_jax.train", "--config", recipe, f"seed={seed}", f"logging.run_name={name}",
            f"logging.runs_dir={runs_dir}", "export=false", "logging.progress_bar=false",
            *([f"steps={steps}"] if steps else [])]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:])} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return runs_dir / name, time.perf_counter() - started


def row_metrics(method: dict) -> dict[str, float]:
    """The README's columns from one method of an eval/results.json."""
    metrics, passes = method["metrics"], method["pass_at_k"]
    return {"avg@8": metrics["avg@8"], "maj@8": metrics["maj@8"], "pass@2": passes["2"], "pass@8": passes["8"],
            "distinct-1": metrics["distinct_1"]}


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def table(rows: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| policy | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, columns in rows.items():
        cells = [f"{summary(columns[c])['mean']:.3f} ± {summary(columns[c])['std']:.3f}" for c in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, help="override the recipes' steps (smoke runs)")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/reproduce_table"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/reproduce_table.json"))
    args = ap.parse_args(argv)
    rows: dict[str, dict[str, list[float]]] = {"base (SFT on the noisy corpus)": {c: [] for c in COLUMNS}}
    runs = []
    for label, recipe in RECIPES.items():
        rows[label] = {c: [] for c in COLUMNS}
        for seed in args.seeds:
            print(f"[reproduce_table] {recipe} seed {seed} ...", file=sys.stderr, flush=True)
            run_dir, wall = train(recipe, seed, args.runs_dir, args.steps)
            methods = json.loads((run_dir / "eval" / "results.json").read_text())["methods"]
            by_name = {m["name"]: row_metrics(m) for m in methods}
            base, trained = by_name.pop("base"), next(iter(by_name.values()))
            for column in COLUMNS:
                rows[label][column].append(trained[column])
                if recipe == next(iter(RECIPES.values())):  # one base evaluation per seed (same key in every recipe)
                    rows["base (SFT on the noisy corpus)"][column].append(base[column])
            runs.append({"recipe": recipe, "seed": seed, "wall_s": wall, "base": base, "trained": trained})
    out = {"cpu": cpu_name(), "seeds": args.seeds, "steps": args.steps, "runs": runs,
           "rows": {label: {c: summary(v) for c, v in columns.items()} for label, columns in rows.items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"{len(args.seeds)} seeds, {out['cpu']}; mean ± std over seeds (the base row: over the runs' evaluations)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
