"""RewardFlow vs GRPO (episode reward) on the built-in maze: success rate over training steps, same seeds,
same budget, one plot.

    python benchmarks/rewardflow_maze.py [--steps 40] [--seeds 0 1] [--target 0.6] [--out DIR]
    python benchmarks/rewardflow_maze.py --merge A/results.json B/results.json --out DIR   (plot runs together)

Both recipes (configs/rewardflow/maze.yaml and maze_grpo.yaml) start from the same warm-start policy
(`maze-base`, built on first use) and see the same task order and sampler keys for a given seed. The
trainer's own steps run (Trainer.make_batch + Trainer.update); after every `--eval-every` steps the policy
is evaluated on the whole task pool (every maze of the recipe x `--eval-episodes` sampled episodes, a
fixed evaluation key), which is the success rate plotted. Steps-to-target = the first evaluated step
whose success rate reaches the target. Writes results.json and success.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.methods.env_rollouts import episode_metrics, task_pool_rows
from pf_jax.training.trainer import Trainer

CONFIGS = {"RewardFlow": "configs/rewardflow/maze.yaml", "GRPO (episode)": "configs/rewardflow/maze_grpo.yaml"}


def evaluate(trainer: Trainer, episodes_per_task: int, key: jax.Array) -> float:
    rows = task_pool_rows(trainer.cfg.env)
    group = trainer.cfg.env.group_size
    wins = []
    for k in range(max(1, episodes_per_task // group)):
        episodes = trainer.responses.rollouts(rows, trainer.models().sampler_model(), jax.random.fold_in(key, k))
        wins.append(episode_metrics(episodes)["success_rate"])
    return float(np.mean(wins))


def run_one(config: str, seed: int, steps: int, eval_every: int, eval_episodes: int, runs_dir: str) -> dict:
    cfg = load_config(TrainConfig, config, [f"seed={seed}", f"data.shuffle_seed={seed}", f"steps={steps}",
                                            f"logging.runs_dir={runs_dir}"])
    trainer = Trainer(cfg)
    eval_key = jax.random.key(10_000 + seed)
    curve = {0: evaluate(trainer, eval_episodes, eval_key)}
    train_success, seconds = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        batch, info = trainer.make_batch(trainer.prompts.next_batch(), step)
        trainer.update(batch, step)
        seconds.append(time.perf_counter() - t0)
        train_success.append(info["success_rate"])
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve[step + 1] = evaluate(trainer, eval_episodes, eval_key)
        print(f"[{cfg.method.name} seed {seed}] step {step + 1}: train success {info['success_rate']:.3f}"
              + (f", eval success {curve[step + 1]:.3f}" if step + 1 in curve else ""), flush=True)
    return {"eval_success": curve, "train_success": train_success, "step_seconds": seconds}


def steps_to_target(curve: dict[int, float], target: float) -> int | None:
    return next((s for s, v in sorted(curve.items()) if v >= target), None)


def plot(results: dict[str, dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, per_seed), color in zip(results.items(), ("tab:blue", "tab:orange")):
        for r in per_seed.values():
            xs, ys = zip(*sorted((int(k), v) for k, v in r["eval_success"].items()))
            ax.plot(xs, ys, color=color, alpha=0.9 if len(per_seed) == 1 else 0.35, marker="o", ms=3,
                    label=name if len(per_seed) == 1 else None)
        if len(per_seed) > 1:
            steps = sorted(int(k) for k in next(iter(per_seed.values()))["eval_success"])
            mean = [np.mean([r["eval_success"][s] for r in per_seed.values()]) for s in steps]
            ax.plot(steps, mean, color=color, lw=2.5, label=f"{name} (mean of {len(per_seed)} seeds)")
    ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.0%}")
    ax.set_xlabel("training step (2 mazes x 8 episodes each)")
    ax.set_ylabel("success rate on the maze pool")
    ax.set_title("Maze 4x4, tiny policy warm-started on random walks")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(files: list[str]) -> dict[str, dict]:
    """Combine the results.json of several runs (e.g. one process per seed); eval steps become ints."""
    results: dict[str, dict] = {}
    for f in files:
        for name, per_seed in json.loads(Path(f).read_text())["results"].items():
            for seed, r in per_seed.items():
                r["eval_success"] = {int(k): v for k, v in r["eval_success"].items()}
                results.setdefault(name, {})[seed] = r
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--eval-episodes", type=int, default=16)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--out", default="runs/rewardflow-maze-bench")
    parser.add_argument("--merge", nargs="+", help="only combine these results.json files and plot them")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = merge(args.merge)
    else:
        results = {}
        for name, config in CONFIGS.items():
            for seed in args.seeds:
                r = run_one(config, seed, args.steps, args.eval_every, args.eval_episodes, args.runs_dir)
                results.setdefault(name, {})[str(seed)] = r
                (out / "results.json").write_text(json.dumps({"target": args.target, "results": results}, indent=1))
    for per_seed in results.values():
        for r in per_seed.values():
            r["steps_to_target"] = steps_to_target(r["eval_success"], args.target)
    (out / "results.json").write_text(json.dumps({"target": args.target, "results": results}, indent=1))
    plot(results, args.target, out / "success.png")
    for name, per_seed in results.items():
        print(name, "steps to", args.target, {s: r["steps_to_target"] for s, r in per_seed.items()})
    print(f"wrote {out / 'results.json'} and {out / 'success.png'}")


if __name__ == "__main__":
    main()
