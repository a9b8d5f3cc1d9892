"""A full GRPO step of pf_jax against TRL's GRPOTrainer and Tunix's GrpoLearner, on the same model, prompts,
shapes and settings, on this machine (issue 23, part 3).

    bash benchmarks/rl_step_peers/setup.sh          # TRL in .venv (extra `bench`), Tunix in .venv-tunix
    python benchmarks/bench_rl_step.py [--prompts 16 --samples 8 --max-new-tokens 128] [--steps 3]
                                       [--frameworks pf_jax trl tunix] [--json out.json]

Shared by all three (a spec file each framework's worker reads, benchmarks/rl_step_peers/*_step.py):
- model: the embedded Gemma 3 270M, exported once by pf_jax to an HF directory (safetensors + the Gemma 3
  tokenizer with its chat template), which TRL and Tunix load; float32 unless --dtype bfloat16;
- prompts: the first --prompts word problems of configs/data/math_word_problems.jsonl, one user turn each,
  rendered by the same chat template (TRL and pf_jax render the conversation; Tunix gets the rendered text);
- rollout: --samples samples per prompt at temperature 1 over the full vocabulary, exactly
  --max-new-tokens tokens each (EOS suppressed: min_new_tokens = max_new_tokens), so every framework
  decodes and trains on the same number of tokens;
- reward: rl_step_peers/reward.py (boxed answer match), group-normalised advantages;
- loss: GRPO's clipped ratio (one update per batch, so the ratio is 1) + the k3 KL to the frozen start at
  beta 0.04; AdamW at lr 1e-6, gradient clipping at norm 1; one optimizer update per step, over
  micro-batches of --micro-batch sequences (gradient accumulation; no framework holds the 262k-vocabulary
  logits of every sequence at once).

Each framework runs in its own process (Tunix needs its own environment; torch gets 2 threads), one after
the other: --warmup steps (compilation) then --steps timed steps; the median step is reported with its
rollout / update split where the framework exposes it, and the ratios pf_jax_over_trl_ratio and
pf_jax_over_tunix_ratio (the peer's median step time / pf_jax's: > 1 means pf_jax is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "rl_step_peers"
DATA = ROOT / "pf_jax" / "configs" / "data" / "math_word_problems.jsonl"
PYTHON = {"pf_jax": ROOT / ".venv" / "bin" / "python", "trl": ROOT / ".venv" / "bin" / "python",
          "tunix": ROOT / ".venv-tunix" / "bin" / "python"}


def export_model(directory: Path, dtype: str) -> None:
    """The embedded Gemma 3 270M as an HF directory, with the Gemma 3 tokenizer and its chat template."""
    import jax.numpy as jnp

    from pf_jax.data.chat_render import named_chat_template
    from pf_jax.models.hf_io import export_hf_directory
    from pf_jax.models.registry import load_model

    model, tokenizer = load_model("gemma3-270m", dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype),
                                  scan_layers=False)
    export_hf_directory(model, directory)
    tokenizer.chat_template = named_chat_template("gemma3")
    tokenizer.save_pretrained(str(directory))


def make_spec(args: argparse.Namespace, work: Path) -> dict:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[: args.prompts]]
    if len(rows) < args.prompts:
        raise SystemExit(f"{DATA} has only {len(rows)} prompts")
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model_dir": str(work / "model"), "data": str(work / "prompts.jsonl"), "dtype": args.dtype,
        "reward": "reward:boxed_match", "prompts": args.prompts, "samples": args.samples,
        "max_new_tokens": args.max_new_tokens, "beta": 0.04, "lr": 1e-6,
        "grad_accum_steps": args.prompts * args.samples // args.micro_batch, "micro_batch": args.micro_batch,
        "pf_jax_logprob_chunk": args.logprob_chunk, "pf_jax_scan_layers": not args.unrolled_layers, "warmup": args.warmup,
        "steps": args.steps, "threads": args.threads,
    }


def step_line(line: str) -> dict | None:
    """A worker's step record (a JSON object with step_s), or None for its other output."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step_s" in record else None


def run_worker(framework: str, spec_path: Path, threads: int) -> list[dict] | None:
    """The framework's worker in its own process: its JSON step lines, or None (its stderr's tail printed)
    when it fails, so that one peer's failure keeps the others' figures."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(PYTHON[framework]), str(PEERS / f"{framework}_step.py"), str(spec_path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [step for x in proc.stdout.splitlines() if (step := step_line(x)) is not None]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        print(f"{framework} worker failed (rc {proc.returncode}): {' '.join(cmd)}", flush=True)
        return None
    print(f"{framework}: {len(lines)} steps in {time.perf_counter() - start:.0f} s wall", flush=True)
    return lines


def summary(steps: list[dict]) -> dict:
    timed = [s for s in steps if not s["warmup"]]
    out = {"steps": steps, "step_s": statistics.median(s["step_s"] for s in timed)}
    for part in ("rollout_s", "update_s"):
        if all(part in s for s in timed):
            out[part] = statistics.median(s[part] for s in timed)
    return out


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.machine())


def report(results: dict) -> dict:
    figures = {name: {k: v for k, v in r.items() if k != "steps"} for name, r in results.items()}
    print(f"{'framework':<10} {'step s':>8} {'rollout s':>10} {'update s':>9}")
    for name, r in figures.items():
        cells = [f"{r.get(k, float('nan')):>{w}.1f}" for k, w in (("step_s", 8), ("rollout_s", 10), ("update_s", 9))]
        print(f"{name:<10} {' '.join(cells)}")
    ratios = {}
    for peer in ("trl", "tunix"):
        if "pf_jax" in results and peer in results:
            ratios[f"pf_jax_over_{peer}_ratio"] = results[peer]["step_s"] / results["pf_jax"]["step_s"]
            print(f"pf_jax_over_{peer}_ratio = {ratios[f'pf_jax_over_{peer}_ratio']:.2f}")
            for part in ("rollout_s", "update_s"):
                if part in results[peer] and part in results["pf_jax"]:
                    ratios[f"pf_jax_over_{peer}_{part[:-2]}_ratio"] = results[peer][part] / results["pf_jax"][part]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frameworks", nargs="+", default=["pf_jax", "trl", "tunix"], choices=list(PYTHON))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per gradient-accumulation step")
    parser.add_argument("--logprob-chunk", type=int, default=256, help="pf_jax's model.logprob_chunk")
    parser.add_argument("--unrolled-layers", action="store_true",
                        help="pf_jax's model.scan_layers=false (unrolled, as Tunix's and torch's layers; default: scanned)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if (args.prompts * args.samples) % args.micro_batch:
        parser.error("--micro-batch must divide prompts x samples")
    missing = [f for f in args.frameworks if not PYTHON[f].exists()]
    if missing:
        raise SystemExit(f"no environment for {missing}: run bash benchmarks/rl_step_peers/setup.sh")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = make_spec(args, work)
        export_model(work / "model", args.dtype)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        steps = {f: run_worker(f, spec_path, args.threads) for f in args.frameworks}
    results = {f: summary(s) for f, s in steps.items() if s is not None}
    ratios = report(results)
    if args.json:
        failed = [f for f, s in steps.items() if s is None]
        out = {"spec": {k: v for k, v in spec.items() if k not in ("model_dir", "data")}, "results": results,
               "failed": failed, **ratios, "machine": cpu_name(), "cpu_count": os.cpu_count()}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
