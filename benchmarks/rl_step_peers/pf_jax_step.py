"""pf_jax's side of bench_rl_step.py: GRPO steps of the Trainer on the shared spec, one JSON line per step.

    python benchmarks/rl_step_peers/pf_jax_step.py SPEC.json

A step = the rollout (sampling, reward, group advantages, the frozen reference's scoring: make_batch) +
the update (policy log-probs, backward, AdamW over optimizer.grad_accum_steps micro-batches), each timed
after block_until_ready.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jax

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.training.trainer import Trainer


def overrides(spec: dict, runs_dir: str) -> list[str]:
    """The recipe: spec's model, prompts, shapes and GRPO settings (k3 KL to the frozen start)."""
    return [
        "model.name=gemma3-270m", f"model.dtype={spec['dtype']}", f"model.param_dtype={spec['dtype']}",
        "model.chat_template=gemma3", f"model.logprob_chunk={spec['pf_jax_logprob_chunk']}",
        f"model.scan_layers={str(spec['pf_jax_scan_layers']).lower()}",
        f"data.source={spec['data']}", "data.shuffle=false",
        "method.name=grpo", f"method.loss={{kl_coef: {spec['beta']}}}",
        f"reward.name={spec['reward']}",
        f"rollout.prompts_per_step={spec['prompts']}", f"rollout.samples_per_prompt={spec['samples']}",
        f"rollout.max_new_tokens={spec['max_new_tokens']}", f"rollout.min_new_tokens={spec['max_new_tokens']}",
        "rollout.temperature=1.0", "rollout.updates_per_batch=1", "rollout.minibatches=1",
        f"optimizer.lr={spec['lr']}", f"optimizer.grad_accum_steps={spec['grad_accum_steps']}",
        "optimizer.grad_clip_norm=1.0", "eval.enabled=false", "export=false", f"logging.runs_dir={runs_dir}",
        "checkpoint.every_steps=100000",
    ]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, str(Path(__file__).parent))  # the shared reward module
    with tempfile.TemporaryDirectory() as runs:
        trainer = Trainer(load_config(TrainConfig, None, overrides(spec, runs)))
        for step in range(spec["warmup"] + spec["steps"]):
            t0 = time.perf_counter()
            batch, _ = trainer.make_batch(trainer.prompts.next_batch(), step)
            jax.block_until_ready(batch)
            t1 = time.perf_counter()
            metrics = trainer.update(batch, step)
            jax.block_until_ready(trainer.state.params)
            t2 = time.perf_counter()
            print(json.dumps({"step": step, "warmup": step < spec["warmup"], "rollout_s": t1 - t0,
                              "update_s": t2 - t1, "step_s": t2 - t0,
                              "loss": float(metrics.get("loss", float("nan")))}), flush=True)


if __name__ == "__main__":
    main()
