"""A full PowerFlow training step vs a GRPO step on the same model, prompts and rollout shape, in one
process (the paper reports about 10% overhead for PowerFlow over GRPO).

    python benchmarks/bench_train_step.py [--model arith-base|tiny|gemma3-270m] [--steps 6] [--json out.json]

All trainers are built from the same recipe except the method (PowerFlow: frozen base-model scoring, the
log Z' head, the TB loss; GRPO: correctness reward, group advantages, clipped loss, without and with the
k3 KL to a frozen reference, which costs the same extra scoring pass as PowerFlow's base model). Each
step = sampling + scoring + reward/estimator + optimizer updates. The first step (compilation) is
dropped; the median of the rest is reported, with the ratio PowerFlow / GRPO.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.training.trainer import Trainer


def step_times(method_overrides: list[str], base: list[str], steps: int) -> list[float]:
    cfg = load_config(TrainConfig, None, [*base, *method_overrides])
    trainer = Trainer(cfg)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        rows = trainer.prompts.next_batch()
        batch, _ = trainer.make_batch(rows, step)
        trainer.update(batch, step)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="arith-base")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = [
            f"model.name={args.model}", "data.source=arithmetic", f"rollout.prompts_per_step={args.prompts}",
            f"rollout.samples_per_prompt={args.samples}", f"rollout.max_new_tokens={args.max_new_tokens}",
            "rollout.updates_per_batch=1", "rollout.minibatches=1", "eval.enabled=false", "export=false",
            f"logging.runs_dir={tmp}", "optimizer.lr=1e-6",
        ]
        if args.model == "arith-base":  # the built-in base model lives in the runs directory
            base[0] = f"model.name={args.runs_dir}/arith-base/export"
        pf = step_times(["method.name=powerflow"], base, args.steps)
        grpo = step_times(["method.name=grpo", "reward.name=arithmetic", "method.loss={kl_coef: 0.0}"], base, args.steps)
        grpo_kl = step_times(["method.name=grpo", "reward.name=arithmetic"], base, args.steps)
    result = {
        "model": args.model, "prompts": args.prompts, "samples": args.samples,
        "powerflow_step_s": statistics.median(pf), "grpo_step_s": statistics.median(grpo),
        "grpo_kl_step_s": statistics.median(grpo_kl),
    }
    result["ratio_powerflow_over_grpo"] = result["powerflow_step_s"] / result["grpo_step_s"]
    result["ratio_powerflow_over_grpo_kl"] = result["powerflow_step_s"] / result["grpo_kl_step_s"]
    print(f"PowerFlow step {result['powerflow_step_s']:.3f} s | GRPO without KL {result['grpo_step_s']:.3f} s "
          f"(ratio {result['ratio_powerflow_over_grpo']:.2f}) | GRPO with the k3 KL to a reference "
          f"{result['grpo_kl_step_s']:.3f} s (ratio {result['ratio_powerflow_over_grpo_kl']:.2f}); "
          f"median of {args.steps - 1} steps each")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
