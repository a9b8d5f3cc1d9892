"""TRL's side of bench_rl_step.py: GRPOTrainer steps on the shared spec, one JSON line per optimizer step.

    python benchmarks/rl_step_peers/trl_step.py SPEC.json        (TRL 1.16, transformers, torch CPU)

GRPOConfig: per_device_train_batch_size = spec micro_batch sequences, gradient_accumulation_steps (=
steps_per_generation) = spec grad_accum_steps, so one optimizer step generates every prompt x sample at
once with transformers' generate and then accumulates the micro-batches into one AdamW update; beta 0.04
(the k3 KL to the frozen reference), loss_type "grpo", epsilon 0.2, num_iterations 1, temperature 1 over
the full vocabulary (top_k 0, top_p 1), generation_kwargs min_new_tokens = max_completion_length (EOS
suppressed), max_grad_norm 1, torch threads = spec threads. The rollout time is the trainer's
_generate_and_score_completions (generation, reward, advantages, the reference's log-probs); the update
is the rest of the optimizer step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


class StepTimer(TrainerCallback):
    """Times each optimizer step and the rollout inside it; prints one JSON line per step."""

    def __init__(self, warmup: int):
        self.warmup, self.rollout_s, self.t0 = warmup, 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0, self.rollout_s = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, **kwargs):
        total = time.perf_counter() - self.t0
        step = state.global_step - 1
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), math.nan)
        print(json.dumps({"step": step, "warmup": step < self.warmup, "step_s": total, "rollout_s": self.rollout_s,
                          "update_s": total - self.rollout_s, "loss": loss}), flush=True)


def timed_rollouts(trainer: GRPOTrainer, timer: StepTimer) -> None:
    generate = trainer._generate_and_score_completions

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        timer.rollout_s += time.perf_counter() - t0
        return out

    trainer._generate_and_score_completions = wrapped


def grpo_config(spec: dict, out_dir: str) -> GRPOConfig:
    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=spec["dtype"] == "bfloat16", report_to="none", save_strategy="no",
        logging_steps=1, max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=1.0, per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["grad_accum_steps"], num_generations=spec["samples"],
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_k=0, top_p=1.0,
        generation_kwargs={"min_new_tokens": spec["max_new_tokens"]}, beta=spec["beta"], loss_type="grpo",
        epsilon=0.2, num_iterations=1, shuffle_dataset=False, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, log_completions=False,
    )


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, str(Path(__file__).parent))
    from reward import boxed_match

    torch.set_num_threads(spec["threads"])
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    timer = StepTimer(spec["warmup"])
    trainer = GRPOTrainer(model=model, reward_funcs=boxed_match, args=grpo_config(spec, "/tmp/trl_grpo_bench"),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer])
    timed_rollouts(trainer, timer)
    trainer.train()


if __name__ == "__main__":
    main()
