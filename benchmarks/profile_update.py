"""Where the time of pf_jax's GRPO update goes (issue 23: the update was 16% slower than Tunix's).

    python benchmarks/profile_update.py [--prompts 1 --samples 4 --max-new-tokens 64] [--repeats 3]

Builds the GRPO trainer of bench_rl_step.py's spec (Gemma 3 270M, k3 KL 0.04, AdamW + clipping), makes one
rollout batch, then times, each compiled once and run --repeats times (median, after block_until_ready):
  loss       the loss alone (policy forward + log-probs over the response + the GRPO terms)
  grad       value_and_grad of the loss (forward + backward, gradient accumulation included)
  optimizer  clipping + AdamW + apply_updates on gradients of the parameters' shape
  step       the trainer's whole jitted update (grad + optimizer + the non-finite guard)
  unguarded  grad + optimizer in one program, without the guard (its cost: step - unguarded)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent / "rl_step_peers"))

from pf_jax_step import overrides

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.methods.compose import compose
from pf_jax.models.decoder import with_layer_layout
from pf_jax.training.step import accumulated_grads, params_loss
from pf_jax.training.trainer import Trainer
from pf_jax.training.update import build_update

DATA = Path(__file__).resolve().parent.parent / "pf_jax" / "configs" / "data" / "math_word_problems.jsonl"


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the whole batch")
    parser.add_argument("--logprob-chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="*", default=["loss", "grad", "optimizer", "step", "unguarded"])
    parser.add_argument("--chunks", type=int, nargs="*", default=[], help="grad_s at these model.logprob_chunk")
    parser.add_argument("--unrolled", action="store_true", help="also grad_s with the layers unrolled")
    parser.add_argument("--trace", default=None, help="write a profiler trace of one grad call here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = args.prompts * args.samples
    spec = {"dtype": "float32", "data": str(DATA), "beta": 0.04, "reward": "reward:boxed_match",
            "prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens, "lr": 1e-6,
            "grad_accum_steps": n // (args.micro_batch or n), "pf_jax_logprob_chunk": args.logprob_chunk, "pf_jax_scan_layers": True}
    with tempfile.TemporaryDirectory() as runs:
        cfg = load_config(TrainConfig, None, overrides(spec, runs))
        trainer = Trainer(cfg)
        batch, _ = trainer.make_batch(trainer.prompts.next_batch(), 0)
        policy = nnx.merge(trainer.graphdefs["policy"], trainer.state.params["policy"])
        update = build_update(cfg, trainer.composition, policy)
        step_fn = jax.jit(lambda s, b: update.step_fn(s, b, trainer.frozen))
        params, opt_state, frozen = trainer.state.params, trainer.state.opt_state, trainer.frozen
        loss_of = params_loss(update.graphdefs, update.loss_fn, update.compute_dtype)
        accum = cfg.optimizer.grad_accum_steps
        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        grads = jax.tree_util.tree_map(lambda x: x * 1e-3, params)

        def unguarded(p, o, b):  # grad + optimizer without the step's non-finite guard
            _, g = accumulated_grads(grad_fn, p, b, frozen, None, accum)
            updates, o = trainer.tx.update(g, o, p)
            return optax.apply_updates(p, updates), o

        parts = {
            "loss_s": lambda: timed(jax.jit(lambda p, b: loss_of(p, b, frozen, None)), params, batch,
                                    repeats=args.repeats),
            "grad_s": lambda: timed(jax.jit(lambda p, b: accumulated_grads(grad_fn, p, b, frozen, None, accum)),
                                    params, batch, repeats=args.repeats),
            "optimizer_s": lambda: timed(jax.jit(lambda g, o, p: optax.apply_updates(p, trainer.tx.update(g, o, p)[0])),
                                         grads, opt_state, params, repeats=args.repeats),
            "step_s": lambda: timed(step_fn, trainer.state, batch, repeats=args.repeats),
            "unguarded_s": lambda: timed(jax.jit(lambda p, o, b: unguarded(p, o, b)), params, opt_state, batch,
                                         repeats=args.repeats),
        }
        figures = {name: part() for name, part in parts.items() if name[:-2] in args.parts}
        for chunk in args.chunks:  # the update's grad with another model.logprob_chunk
            c_cfg = load_config(TrainConfig, None, overrides({**spec, "pf_jax_logprob_chunk": chunk}, runs))
            c_update = build_update(c_cfg, compose(c_cfg), policy)
            c_grad = jax.value_and_grad(params_loss(c_update.graphdefs, c_update.loss_fn, c_update.compute_dtype),
                                        has_aux=True)
            figures[f"grad_chunk{chunk}_s"] = timed(
                jax.jit(lambda p, b, g=c_grad: accumulated_grads(g, p, b, frozen, None, accum)), params, batch,
                repeats=args.repeats)
        if args.unrolled:  # the same update with the layers unrolled (per-layer weights, no scan)
            u_update = build_update(cfg, trainer.composition, with_layer_layout(policy, scan_layers=False))
            u_grad = jax.value_and_grad(params_loss(u_update.graphdefs, u_update.loss_fn, u_update.compute_dtype),
                                        has_aux=True)
            figures["grad_unrolled_s"] = timed(
                jax.jit(lambda p, b: accumulated_grads(u_grad, p, b, frozen, None, accum)), u_update.params, batch,
                repeats=args.repeats)
        if args.trace:
            grad = jax.jit(lambda p, b: accumulated_grads(grad_fn, p, b, frozen, None, accum))
            jax.block_until_ready(grad(params, batch))
            with jax.profiler.trace(args.trace, create_perfetto_trace=True):
                jax.block_until_ready(grad(params, batch))
            Path(args.trace, "grad.hlo.txt").write_text(grad.lower(params, batch).compile().as_text())
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
