"""The PowerFlow paper's table in miniature on a real pretrained model: the embedded Gemma 3 270M on few-shot
arithmetic, every row evaluated on the same held-out problems with the same checker.

    python benchmarks/reproduce_gemma.py            # the README's table (about 1-2 h on 2 CPU cores)
    python benchmarks/reproduce_gemma.py --quick    # a smoke run of every row (minutes; the tests run it)

Rows:
  - base, T = 1; low temperature, T = 1/alpha; power sampling (MCMC over p_base^alpha): inference-time
    methods on the untrained model, one evaluation per seed (the seed is the sampling key);
  - PowerFlow alpha = 4 (no labels), supervised GRPO (correctness reward), and GRPO on self-certainty
    (an RLIF baseline, no labels): trained with configs/reproduce_gemma/*.yaml, one run per seed, each
    evaluated at T = 1 with that seed's sampling key.
An answer is the response's first line read as an integer (the `arithmetic` checker, the same one the
GRPO reward uses); sampling stops at a newline token ("\n" or "\n\n", both single tokens of Gemma's
vocabulary), and what follows a first line cannot change the score. Metrics: avg@n, maj@n, pass@k and two diversity measures with spread for short answers (distinct answers
per problem, answer entropy); each seed's figure has its 95% interval bootstrapped over problems, and the
table gives the mean ± std over seeds.

The task is generated here, offline: `a + b`, `a - b` (1 <= a, b <= 20) and `a * b` (1 <= a, b <= 9), written
as an equation after four worked ones ("6 + 3 = 9\n...\n17 - 8 ="); the answer ends at the newline. A
stable hash of the equation splits train from test (~20% test), so no test problem is trained on.
(Gemma 3 270M gets ~10% of single-digit problems right when they are asked as "Question: What is 6 + 3?
Answer:", and ~45% in the equation form at T = 1: the form it saw in pretraining.) Every run's
directory, log and evaluation stay under --runs-dir; `--json` gets every seed's figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from reproduce_table import cpu_name, summary  # noqa: E402

FEW_SHOT = "6 + 3 = 9\n15 - 7 = 8\n4 * 5 = 20\n12 + 9 = 21\n{question} ="  # its answer ends at a newline
RECIPES = REPO / "configs" / "reproduce_gemma"
ALPHA = 4
INFERENCE_ROWS = {  # row label -> pf_jax.eval method
    "base, T = 1": "base:T=1",
    f"low temperature, T = 1/{ALPHA}": f"lowtemp:alpha={ALPHA}",
    f"power sampling, alpha = {ALPHA}": f"power:alpha={ALPHA},block=2,steps=4",
}
TRAINED_ROWS = {  # row label -> recipe
    f"PowerFlow, alpha = {ALPHA} (no labels)": "powerflow.yaml",
    "supervised GRPO (correctness reward)": "grpo.yaml",
    "GRPO on self-certainty (RLIF, no labels)": "self_certainty.yaml",
}
COLUMNS = ("avg@n", "maj@n", "pass@1", "pass@n", "distinct_answers", "answer_entropy")


def make_problems(count: int, split: str, seed: int = 0) -> list[dict]:
    """`count` distinct problems of `split` ('train' or 'test', chosen by a stable hash: ~20% are test)."""
    rng = np.random.default_rng([seed, split == "test"])
    seen, rows = set(), []
    while len(rows) < count:
        op = "+-*"[rng.integers(3)]
        a, b = (int(x) for x in rng.integers(1, 10 if op == "*" else 21, size=2))
        question = f"{a} {op} {b}"
        worked = any(line.startswith(f"{question} = ") for line in FEW_SHOT.splitlines())
        if question in seen or worked or (zlib.crc32(question.encode()) % 5 == 0) != (split == "test"):
            continue
        seen.add(question)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"id": f"{split}-{len(rows)}", "prompt": FEW_SHOT.format(question=question),
                     "answer": str(answer)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(argv: list[str], log: Path) -> float:
    """Run a pf_jax command, its output to `log`; the wall seconds. A failure stops the script naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}); its output: {log}\n"
                         + log.read_text()[-2000:])
    return time.perf_counter() - started


def evaluate(models: list[str], methods: list[str], test: Path, args: argparse.Namespace, seed: int,
             out_dir: Path) -> tuple[list[dict], float]:
    argv = ["-m", "pf_jax.eval", "--problems", str(test), "--checker", "arithmetic",
            "--stop", "\\n", "--stop", "\\n\\n",
            "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens), "--seed", str(seed),
            "--ks", f"1,{args.n}", "--prompts-per-call", str(args.prompts_per_call), "--run-dir", str(out_dir),
            "--diversity-metric", "distinct_answers", *[a for m in models for a in ("--model", m)],
            "--methods", *methods]
    wall = run(argv, out_dir.with_suffix(".log"))
    return json.loads((out_dir / "results.json").read_text())["methods"], wall


def row_figures(method: dict, n: int) -> dict[str, dict]:
    """Each column's value and 95% interval (over problems) from one method of an eval results.json."""
    names = {"avg@n": f"avg@{n}", "maj@n": f"maj@{n}", "pass@1": "pass@1", "pass@n": f"pass@{n}",
             "distinct_answers": "distinct_answers", "answer_entropy": "answer_entropy"}
    return {column: {"value": method["metrics"][name], "interval": method["intervals"].get(name)}
            for column, name in names.items()}


def train(recipe: str, seed: int, args: argparse.Namespace, train_rows: Path) -> tuple[Path, float | None]:
    """One trained row's run; its export and wall seconds (None: --reuse-exports found the export)."""
    name = f"{Path(recipe).stem}-seed{seed}"
    if args.reuse_exports and (args.runs_dir / name / "export" / "config.json").is_file():
        print(f"[reproduce_gemma] seed {seed}: {recipe}: reusing {args.runs_dir / name / 'export'}", flush=True)
        return args.runs_dir / name / "export", None
    print(f"[reproduce_gemma] seed {seed}: training {recipe} ({args.steps} steps)", flush=True)
    argv = ["-m", "pf_jax.train", "--config", str(RECIPES / recipe), f"seed={seed}", f"steps={args.steps}",
            f"data.source={train_rows}", f"logging.run_name={name}", f"logging.runs_dir={args.runs_dir}",
            "logging.progress_bar=false"]
    wall = run(argv, args.runs_dir / f"{name}.log")
    return args.runs_dir / name / "export", wall


def table(rows: dict[str, list[dict]], n: int) -> str:
    heads = [c.replace("@n", f"@{n}") for c in COLUMNS]
    lines = ["| row | " + " | ".join(heads) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, seeds in rows.items():
        cells = []
        for column in COLUMNS:
            s = summary([seed[column]["value"] for seed in seeds])
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=24, help="training steps of each trained row")
    ap.add_argument("--train-problems", type=int, default=512)
    ap.add_argument("--test-problems", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="samples per test problem")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--prompts-per-call", type=int, default=16)
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/reproduce_gemma"))
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/reproduce_gemma.json")
    ap.add_argument("--reuse-exports", action="store_true",
                    help="evaluate a trained row's existing export under --runs-dir instead of training it again")
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 step, 4 test problems, n 2: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.train_problems, args.test_problems, args.n = [0], 1, 16, 4, 2
    if args.json is None and not args.quick:
        args.json = REPO / "benchmarks" / "results" / "reproduce_gemma.json"
    args.runs_dir = args.runs_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    problems = args.runs_dir / "problems"
    train_rows = write_jsonl(make_problems(args.train_problems, "train"), problems / "train.jsonl")
    test = write_jsonl(make_problems(args.test_problems, "test"), problems / "test.jsonl")
    rows: dict[str, list[dict]] = {label: [] for label in [*INFERENCE_ROWS, *TRAINED_ROWS]}
    walls: dict[str, list[float]] = {}
    for seed in args.seeds:
        print(f"[reproduce_gemma] seed {seed}: base model, {len(INFERENCE_ROWS)} sampling methods", flush=True)
        methods, wall = evaluate(["gemma3-270m"], list(INFERENCE_ROWS.values()), test, args, seed,
                                 args.runs_dir / f"eval-base-seed{seed}")
        walls.setdefault("eval base", []).append(wall)
        for label, method in zip(INFERENCE_ROWS, methods):
            rows[label].append(row_figures(method, args.n))
        exports = {}
        for label, recipe in TRAINED_ROWS.items():
            exports[label], wall = train(recipe, seed, args, train_rows)
            if wall is not None:
                walls.setdefault(f"train {recipe}", []).append(wall)
        print(f"[reproduce_gemma] seed {seed}: the {len(exports)} trained policies at T = 1", flush=True)
        models = [f"{Path(recipe).stem}={exports[label]}" for label, recipe in TRAINED_ROWS.items()]
        methods, wall = evaluate(models, ["base:T=1"], test, args, seed, args.runs_dir / f"eval-trained-seed{seed}")
        walls.setdefault("eval trained", []).append(wall)
        for label, method in zip(TRAINED_ROWS, methods):
            rows[label].append(row_figures(method, args.n))
    out = {"cpu": cpu_name(), "seeds": args.seeds, "steps": args.steps, "n": args.n,
           "test_problems": args.test_problems, "train_problems": args.train_problems,
           "wall_s": time.perf_counter() - started, "wall_s_by_part": walls,
           "rows": {label: {"per_seed": seeds,
                            "summary": {c: summary([s[c]["value"] for s in seeds]) for c in COLUMNS}}
                    for label, seeds in rows.items()}}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(f"Gemma 3 270M, {args.test_problems} test problems x {args.n} samples, seeds {args.seeds}, "
          f"{args.steps} training steps, {out['cpu']}, {out['wall_s'] / 60:.1f} min; mean ± std over seeds")
    print(table(rows, args.n))
    return out


if __name__ == "__main__":
    main()
