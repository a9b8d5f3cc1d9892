"""Asynchronous against synchronous rollouts (rollout.mode, issue 23): steps per minute and what is learned.

arith  configs/arith/grpo.yaml (GRPO on the built-in arithmetic base model, 16 prompts x 8 samples, 100
       steps), in this process: for each seed, sync, async (max_staleness 1, tis_cap 2) and async without
       the correction (tis_cap null, the ratio against the sampler as in sync mode: an ablation) back to back.
       Reported: the training loop's wall time (the base / final evaluations excluded) as steps per minute,
       the held-out avg@8 and maj@8 of each run, their mean +- std over seeds, and
       async_over_sync_ratio = median async steps/min / median sync's.
gemma  configs/grpo/gemma3-270m-math.yaml (GRPO on the embedded Gemma 3 270M) on 8 simulated CPU devices,
       as subprocesses, both with rollout.devices=4 (the update on a (1, 4, 1) fsdp mesh of devices 0-3,
       the sampler on 4-7; a sync run on one data=8 mesh replicates the state 8 times and does not fit in
       24 GiB): sync against async k=1. Reported per mode: the median step time after the first (compile)
       step, the time the update waited for its rollout and the weights' transfer to the rollout group. A correctness rehearsal: 8 simulated devices on a 2-core CPU share the same two
       cores, so the overlap cannot pay much here.

    python benchmarks/bench_async.py --part arith [--seeds 0 1 2] [--json benchmarks/results/async_arith.json]
    python benchmarks/bench_async.py --part gemma [--steps 4] [--json benchmarks/results/async_gemma.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reproduce_table import cpu_name  # noqa: E402

CONFIGS = ROOT / "pf_jax" / "configs"
ASYNC = ["rollout.mode=async", "rollout.max_staleness=1", "rollout.tis_cap=2.0"]
MODES = {"sync": [], "async": ASYNC, "async_no_tis": [*ASYNC, "rollout.tis_cap=null"]}  # the last: an ablation
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.plots=false", "checkpoint.resume=false"]


def arith_run(runs: Path, seed: int, mode: str) -> dict:
    """One GRPO run in this process: its training loop's seconds and its held-out metrics."""
    from pf_jax.config import load_config
    from pf_jax.config.recipe import TrainConfig
    from pf_jax.training.trainer import Trainer

    name = f"{mode}-seed{seed}"
    cfg = load_config(TrainConfig, CONFIGS / "arith" / "grpo.yaml",
                      [f"seed={seed}", f"logging.runs_dir={runs}", f"logging.run_name={name}", *QUIET, *MODES[mode]])
    trainer = Trainer(cfg)
    loop, seconds = trainer._train, []

    def timed(*args):  # the steps only: the base and final evaluations are outside _train
        t0 = time.perf_counter()
        out = loop(*args)
        seconds.append(time.perf_counter() - t0)
        return out

    trainer._train = timed
    result = trainer.run()
    metrics = result.evaluation["grpo"].metrics
    return {"mode": mode, "seed": seed, "loop_s": seconds[0],
            "steps_per_min": 60 * cfg.steps / seconds[0], "avg@8": metrics["avg@8"], "maj@8": metrics["maj@8"]}


def summary(runs: list[dict], mode: str) -> dict:
    mine = [r for r in runs if r["mode"] == mode]
    spread = lambda k: {"mean": statistics.mean(r[k] for r in mine),
                        "std": statistics.stdev(r[k] for r in mine) if len(mine) > 1 else 0.0}
    return {"steps_per_min_median": statistics.median(r["steps_per_min"] for r in mine),
            "avg@8": spread("avg@8"), "maj@8": spread("maj@8")}


def arith(args: argparse.Namespace) -> dict:
    runs_dir = Path(args.runs_dir)  # the arithmetic base model is built there once (or found)
    runs = []
    for seed in args.seeds:
        for mode in MODES:
            runs.append(arith_run(runs_dir, seed, mode))
            print(json.dumps(runs[-1]), flush=True)
    out = {mode: summary(runs, mode) for mode in MODES}
    sync, asyn = out["sync"], out["async"]
    return {"part": "arith", "recipe": "configs/arith/grpo.yaml", "runs": runs, **out,
            "async_over_sync_ratio": asyn["steps_per_min_median"] / sync["steps_per_min_median"],
            "avg8_async_minus_sync": asyn["avg@8"]["mean"] - sync["avg@8"]["mean"],
            "avg8_async_no_tis_minus_sync": out["async_no_tis"]["avg@8"]["mean"] - sync["avg@8"]["mean"]}


def gemma_run(runs: Path, name: str, steps: int, extra: list[str]) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pf_jax.train", "--config", str(CONFIGS / "grpo" / "gemma3-270m-math.yaml"),
               f"steps={steps}", "eval.enabled=false", "export=false", "checkpoint.every_steps=1000",
               "logging.every_steps=1", f"logging.runs_dir={runs}", f"logging.run_name={name}", *QUIET, *extra]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
    steps_s = [r["rollout_s"] + r["update_s"] for r in records]
    median = lambda k: statistics.median(r.get(k, 0.0) for r in records[1:])
    return {"mode": name, "wall_s": time.perf_counter() - t0, "step_s": steps_s,
            "step_s_median_after_first": statistics.median(steps_s[1:]),
            "rollout_wait_s_median": median("rollout/wait_s"), "reshard_s_median": median("rollout/reshard_s"),
            "update_s_median": median("update_s"), "loss": [r["loss"] for r in records]}


def gemma(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        split = ["rollout.devices=4", "mesh.data=1", "mesh.fsdp=4"]
        sync = gemma_run(Path(tmp), "sync", args.steps, split)
        print(json.dumps(sync), flush=True)
        asyn = gemma_run(Path(tmp), "async", args.steps, [*ASYNC, *split])
        print(json.dumps(asyn), flush=True)
    return {"part": "gemma", "recipe": "configs/grpo/gemma3-270m-math.yaml", "devices": "8 simulated CPU devices",
            "sync": sync, "async": asyn,
            "async_over_sync_ratio": sync["step_s_median_after_first"] / asyn["step_s_median_after_first"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("arith", "gemma"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=4, help="gemma: steps per mode")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_async"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), **(arith(args) if args.part == "arith" else gemma(args))}
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
