"""LoRA against full fine-tuning on the embedded Gemma 3 270M: a GRPO step and a PowerFlow step (rollout +
scoring + update), each with a frozen reference (GRPO's k3 KL; PowerFlow's base model), and LoRA's two
ways of sampling (adapters merged into the weights once per update, or applied in every decode step).

    python benchmarks/bench_lora.py [--steps 4] [--json benchmarks/results/lora.json]

Step times: the trainers of one comparison live in one process and take their steps in turn; the first
step (compilation) is dropped and the median of the rest reported, with the ratio. Memory: each
configuration alone in a subprocess (`--one`): its resident set once the trainer is built, and the peak
resident set while it takes the same steps (sampled every 20 ms; loading the GGUF has a higher transient
peak of its own, which is not what is compared), and the bytes of its live JAX arrays (what the run holds:
weights, optimizer state, reference; not the allocator's retained heap).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.training.trainer import Trainer

METHODS = {"grpo": ["method.name=grpo", "reward.name=arithmetic"], "powerflow": ["method.name=powerflow"]}
CONFIGS = {
    "full": [],
    "lora": ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.sampler=merge"],
    "lora_apply": ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.sampler=apply"],
}


def trainer(method: str, config: str, args: argparse.Namespace, runs_dir: str) -> Trainer:
    base = [f"model.name={args.model}", "data.source=arithmetic", f"rollout.prompts_per_step={args.prompts}",
            f"rollout.samples_per_prompt={args.samples}", f"rollout.max_new_tokens={args.max_new_tokens}",
            "eval.enabled=false", "export=false", "optimizer.lr=1e-6", f"logging.runs_dir={runs_dir}",
            f"logging.run_name={method}-{config}", "logging.progress_bar=false", "logging.tensorboard=false",
            "logging.plots=false", "checkpoint.resume=false", "checkpoint.every_steps=100000"]
    return Trainer(load_config(TrainConfig, None, [*base, *METHODS[method], *CONFIGS[config]]))


def one_step(t: Trainer, step: int) -> tuple[float, float, float]:
    """(rollout + scoring s, update s, total s) of one step."""
    t0 = time.perf_counter()
    batch, _ = t.make_batch(t.prompts.next_batch(), step)
    t1 = time.perf_counter()
    t.update(batch, step)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, t2 - t0


def compare(method: str, configs: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {c: trainer(method, c, args, tmp) for c in configs}
        times = {c: [] for c in configs}
        for step in range(args.steps):
            for c, t in trainers.items():
                times[c].append(one_step(t, step))
    out = {}
    for c, rows in times.items():
        rollout, update, total = (statistics.median(r[i] for r in rows[1:]) for i in range(3))
        out[c] = {"rollout_s": rollout, "update_s": update, "step_s": total}
        print(f"{method:9s} {c:10s} step {total:7.2f} s  (rollout + scoring {rollout:6.2f} s, update {update:6.2f} s)",
              flush=True)
    return out


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def live_gib() -> float:
    """GiB held by live JAX arrays (params, optimizer state, reference, caches): what the run keeps, without
    the allocator's retained heap from loading the GGUF."""
    return sum(a.nbytes for a in jax.live_arrays()) / 2**30


def steps_with_peak_rss(t: Trainer, steps: int) -> float:
    """GiB: the largest resident set while `t` takes `steps` steps."""
    peak, done = [rss_gib()], threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            peak.append(rss_gib())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for step in range(steps):
        one_step(t, step)
    done.set()
    watcher.join()
    return max(peak)


def memory(method: str, config: str, args: argparse.Namespace) -> dict[str, float]:
    """GiB: the resident set of a subprocess that builds this one configuration, and its peak over the steps."""
    cmd = [sys.executable, __file__, "--one", method, config, "--steps", str(args.steps), "--model", args.model,
           "--prompts", str(args.prompts), "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "CONFIG"), default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.one:  # a child: one configuration alone, for its peak RSS
        with tempfile.TemporaryDirectory() as tmp:
            t = trainer(*args.one, args, tmp)
            built, live = rss_gib(), live_gib()
            peak = steps_with_peak_rss(t, args.steps)
            after = live_gib()
        print(json.dumps({"built_rss_gib": built, "steps_peak_rss_gib": peak, "live_arrays_gib": live,
                          "live_arrays_after_steps_gib": after}))
        return
    result = {"model": args.model, "shape": f"{args.prompts} prompts x {args.samples} samples x "
              f"{args.max_new_tokens} new tokens", "steps": args.steps}
    for method in METHODS:
        times = compare(method, ["full", "lora"], args)
        result[method] = {c: {**times[c], **memory(method, c, args)} for c in times}
        result[method]["lora_over_full_step_ratio"] = times["lora"]["step_s"] / times["full"]["step_s"]
    sampler = compare("grpo", ["lora", "lora_apply"], args)
    result["sampler"] = {**sampler, "apply_over_merge_rollout_ratio":
                         sampler["lora_apply"]["rollout_s"] / sampler["lora"]["rollout_s"]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
