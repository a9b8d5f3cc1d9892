"""The at-scale recipes compiled by XLA's TPU compiler for their target slices, on this CPU host (libtpu,
`pip install 'pf_jax[tpu]'`): the README's table of per-device peaks, HBM, headroom and train-step FLOPs,
and the 7B PowerFlow train step at 4k / 8k / 16k tokens with splash attention against the einsum.

    python benchmarks/compile_at_scale.py [--only NAME ...] [--skip-context] [--json PATH]

Each recipe is `python -m pf_jax.train --config X --dry-run --topology T` (pf_jax.planning.compiled_plan);
the context rows compile the train step alone; the sampler rows (--sampler) compile the 7B GRPO recipe's
sampler programs alone, static against continuous batching at several slot counts. Compiles of a 7B step
take 2-4 minutes each on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pf_jax.sharding.topology import prepare_libtpu_environment

prepare_libtpu_environment("v5p:4x4x4")  # before libtpu loads

from pf_jax.config import load_config  # noqa: E402
from pf_jax.config.recipe import TrainConfig  # noqa: E402
from pf_jax.models.ops import XlaOps  # noqa: E402
from pf_jax.planning.compiled_plan import (  # noqa: E402
    SAMPLER_ALIVE,
    abstract_recipe,
    compile_recipe,
    compile_sampler,
    compile_train_step,
)
from pf_jax.planning.compiled_report import plan_json  # noqa: E402
from pf_jax.sharding.topology import tpu_topology  # noqa: E402

GiB = 1024**3
# (name, recipe, target topology): each recipe's header names the same topology
RECIPES = [
    ("powerflow-7b", "configs/powerflow/qwen2.5-math-7b.yaml", "v5p:4x4x4"),
    ("powerflow-1.5b", "configs/powerflow/qwen2.5-math-1.5b.yaml", "v5p:2x2x2"),
    ("grpo-7b", "configs/grpo/qwen2.5-7b-math.yaml", "v5p:4x4x4"),
    ("dpo-8b", "configs/preference/dpo-llama3.1-8b.yaml", "v5p:2x4x4"),
    ("rewardflow-3b", "configs/rewardflow/textworld-qwen2.5-3b-gpu.yaml", "v5p:2x2x2"),
]
CONTEXT = ("configs/powerflow/qwen2.5-math-7b.yaml", "v5p:4x4x4", (4096, 8192, 16384))
# The 7B PowerFlow recipe with LoRA (rank 64, all linear layers) against full fine-tuning: the per-device
# peak on the recipe's slice, and the smallest of these slices each fits on (compiled, ascending).
LORA = ["model.lora.rank=64", "model.lora.alpha=128"]
SLICES = ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4")


def recipe_row(name: str, recipe: str, topology: str) -> dict:
    started = time.perf_counter()
    cfg = load_config(TrainConfig, recipe, [])
    plan = compile_recipe(cfg, topology)
    out = plan_json(plan, cfg)
    out.update(name=name, config=recipe, wall_s=time.perf_counter() - started)
    return out


def context_row(length: int, attention: str) -> dict:
    """The 7B PowerFlow train step at `length` tokens per row (1024 prompt + the rest response)."""
    recipe, topology, _ = CONTEXT
    started = time.perf_counter()
    cfg = load_config(TrainConfig, recipe, [f"rollout.max_new_tokens={length - 1024}"])
    r = abstract_recipe(cfg, tpu_topology(topology), ops=XlaOps() if attention == "einsum" else None)
    plan, flops = compile_train_step(r)
    return {"length": length, "attention": attention, "topology": topology, "temp_bytes": plan.temp_bytes,
            "peak_bytes": plan.peak_bytes(r.resident), "hbm_bytes": r.topology.hbm_bytes,
            "out_of_memory": plan.out_of_memory, "error": plan.error, "splash_kernels": plan.kernels,
            "matmul_flops": flops, "wall_s": time.perf_counter() - started}


def lora_row(config: str, topology: str) -> dict:
    """The 7B PowerFlow recipe, full fine-tuning or LoRA, compiled for `topology` (the mesh's fsdp axis
    takes every chip)."""
    recipe = CONTEXT[0]
    started = time.perf_counter()
    overrides = ["mesh.fsdp=-1", *(LORA if config == "lora" else [])]
    plan = compile_recipe(load_config(TrainConfig, recipe, overrides), topology)
    out = plan_json(plan, load_config(TrainConfig, recipe, overrides))
    return {"config": config, "topology": topology, "peak_bytes": out["peak_bytes"], "fits": out["fits"],
            "verdict": out["verdict"], "wall_s": time.perf_counter() - started}


# The 7B GRPO recipe's sampler (64 prompts x 8 samples, prompt bucket 1024 + 2048 new tokens): static
# batching's 512 rows against continuous batching's slots.
SAMPLER = ("configs/grpo/qwen2.5-7b-math.yaml", "v5p:4x4x4", (None, 512, 256, 128))


def sampler_row(slots: int | None) -> dict:
    """The sampler's prefill and decode loop, static (slots None) or continuous with `slots` rows: the
    resident KV cache, the decode loop's temporaries (the slots' cache under continuous batching) and the
    decode program's per-device peak with the weights and optimizer state alive."""
    recipe, topology, _ = SAMPLER
    started = time.perf_counter()
    overrides = [] if slots is None else ["rollout.batching=continuous", f"rollout.slots={slots}"]
    r = abstract_recipe(load_config(TrainConfig, recipe, overrides), tpu_topology(topology))
    prefill, decode = compile_sampler(r)
    rows = slots or r.sizes.sampler_prompts * r.sizes.samples  # static: one row per sample
    return {"batching": "static" if slots is None else "continuous", "slots": rows, "topology": topology,
            "kv_cache_bytes": r.resident["KV cache"], "decode_temp_bytes": decode.temp_bytes,
            "prefill_temp_bytes": prefill.temp_bytes, "decode_peak_bytes": decode.peak_bytes(r.resident),
            "hbm_bytes": r.topology.hbm_bytes, "error": decode.error or prefill.error, "alive": list(SAMPLER_ALIVE),
            "wall_s": time.perf_counter() - started}


# Continuous batching's slot cache, dense against paged (rollout.kv_cache), on one chip (paged runs on one
# device for now): (name, recipe, topology, overrides); every sample has a slot.
PAGED = [
    ("Gemma 3 270M GRPO, 16 prompts x 8, 256 + 512 tokens", "configs/grpo/gemma3-270m-math.yaml", "v5e:1x1",
     ["rollout.prompts_per_step=16", "rollout.samples_per_prompt=8", "rollout.max_new_tokens=512"],
     4224 // 4),  # a quarter of the 128 slots' worst case (33 pages each)
    ("Qwen2.5 7B GRPO, 8 prompts x 8, 1024 + 2048 tokens", "configs/grpo/qwen2.5-7b-math.yaml", "v6e:1x1",
     ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=8"], 8256 // 4),  # 64 slots x 129 pages / 4
]


def paged_row(name: str, recipe: str, topology: str, overrides: list[str], kv_cache: str,
              kv_pages: int | None = None) -> dict:
    """The continuous sampler's decode loop with the `kv_cache` slot cache (paged: kv_pages for the samples,
    None every slot's worst case): its temporaries (the slots' cache or the page pool), the resident
    prompts' cache, and its Pallas kernel calls."""
    started = time.perf_counter()
    pages = [] if kv_pages is None else [f"rollout.kv_pages={kv_pages}"]
    cfg = load_config(TrainConfig, recipe, [*overrides, "rollout.batching=continuous", f"rollout.kv_cache={kv_cache}",
                                            *pages])
    r = abstract_recipe(cfg, tpu_topology(topology))
    _, decode = compile_sampler(r)
    return {"name": name, "kv_cache": kv_cache, "kv_pages": kv_pages, "topology": topology, "note": decode.note,
            "kv_cache_bytes": r.resident["KV cache"], "decode_temp_bytes": decode.temp_bytes,
            "decode_peak_bytes": decode.peak_bytes(r.resident), "kernels": decode.kernels,
            "hbm_bytes": r.topology.hbm_bytes, "error": decode.error, "wall_s": time.perf_counter() - started}


def paged_table(rows: list[dict]) -> str:
    lines = ["| continuous sampler | chip | KV cache | resident prompts' cache | decode-loop temporaries | "
             "Pallas calls in the loop |", "|---|---|---|---|---|---|"]
    kind = lambda r: r["kv_cache"] + ("" if r.get("kv_pages") is None else f", {r['kv_pages']} pages")
    lines += [f"| {r['name']} | {r['topology']} | {kind(r)} | {r['kv_cache_bytes'] / GiB:.2f} GiB | "
              f"{r['decode_temp_bytes'] / GiB:.2f} GiB | {r['kernels']}{' (' + r['error'] + ')' if r['error'] else ''} |"
              for r in rows]
    return "\n".join(lines)


def sampler_table(rows: list[dict]) -> str:
    lines = ["| 7B GRPO sampler | decode rows | resident KV cache | decode-loop temporaries | decode peak (per device) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['batching']} | {r['slots']} | {r['kv_cache_bytes'] / GiB:.2f} GiB | "
              f"{r['decode_temp_bytes'] / GiB:.2f} GiB | {r['decode_peak_bytes'] / GiB:.1f} GiB"
              f"{' (' + r['error'] + ')' if r['error'] else ''} |" for r in rows]
    return "\n".join(lines)


def lora_rows() -> list[dict]:
    """Each configuration on the recipe's slice, then on the smaller slices until one does not fit."""
    rows = []
    for config in ("full", "lora"):
        for topology in reversed(SLICES):
            print(f"[compile_at_scale] 7B PowerFlow {config} on {topology} ...", file=sys.stderr, flush=True)
            rows.append(lora_row(config, topology))
            if not rows[-1]["fits"]:
                break
    return rows


def lora_table(rows: list[dict]) -> str:
    lines = ["| 7B PowerFlow | slice | per-device peak (compiled) | fits |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['topology']} | {r['peak_bytes'] / GiB:.1f} GiB | {'yes' if r['fits'] else 'no'} |"
              for r in rows]
    return "\n".join(lines)


def recipe_table(rows: list[dict]) -> str:
    lines = ["| recipe | topology | per-device peak (compiled) | HBM | headroom | train-step FLOPs | "
             "compiled / 6·N·tokens | analytic estimate |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["train_flops"]
        lines.append(
            f"| `{r['config']}` | {r['topology']} ({r['devices']} chips) | {r['peak_bytes'] / GiB:.1f} GiB "
            f"({r['peak_program']}) | {r['hbm_bytes'] / GiB:.0f} GiB | {r['headroom_bytes'] / GiB:.1f} GiB"
            f"{'' if r['fits'] else ' (does NOT fit)'} | {(f['matmul_flops_per_update'] or 0) / 1e15:.2f} P | "
            f"{f['ratio_to_6NT']:.2f} | {r['analytic']['per_device_bytes'] / GiB:.1f} GiB |")
    return "\n".join(lines)


def context_table(rows: list[dict]) -> str:
    lines = ["| tokens per row | attention | train-step temporaries | per-device peak | fits (95 GiB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        oom = " (compiler: out of memory)" if r["out_of_memory"] else ""
        lines.append(f"| {r['length']} | {r['attention']} | {r['temp_bytes'] / GiB:.1f} GiB{oom} | "
                     f"{r['peak_bytes'] / GiB:.1f} GiB | {'yes' if r['peak_bytes'] <= r['hbm_bytes'] and not r['error'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help=f"recipe names ({', '.join(n for n, *_ in RECIPES)})")
    ap.add_argument("--skip-context", action="store_true")
    ap.add_argument("--skip-recipes", action="store_true")
    ap.add_argument("--lora", action="store_true", help="also LoRA vs full fine-tuning for the 7B PowerFlow recipe")
    ap.add_argument("--sampler", action="store_true", help="also the 7B GRPO sampler, static against continuous")
    ap.add_argument("--paged", action="store_true", help="also continuous batching's dense against paged KV cache")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/compile_at_scale.json"))
    args = ap.parse_args(argv)
    results: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if not args.skip_recipes:
        rows = {r["name"]: r for r in results.get("recipes", [])}
        for name, recipe, topology in RECIPES:
            if args.only and name not in args.only:
                continue
            print(f"[compile_at_scale] {name}: {recipe} on {topology} ...", file=sys.stderr, flush=True)
            rows[name] = recipe_row(name, recipe, topology)
            print(f"[compile_at_scale]   {rows[name]['verdict']} ({rows[name]['wall_s']:.0f} s)", file=sys.stderr)
            results["recipes"] = [rows[n] for n, *_ in RECIPES if n in rows]
            _write(args.json, results)
    if not args.skip_context:
        context = []
        for length in CONTEXT[2]:
            for attention in ("splash", "einsum"):
                print(f"[compile_at_scale] 7B PowerFlow train step, {length} tokens, {attention} ...",
                      file=sys.stderr, flush=True)
                context.append(context_row(length, attention))
                results["context"] = context
                _write(args.json, results)
    if args.lora:
        results["lora"] = lora_rows()
        _write(args.json, results)
        print(lora_table(results["lora"]))
    if args.sampler:
        results["sampler"] = []
        for slots in SAMPLER[2]:
            print(f"[compile_at_scale] 7B GRPO sampler, {slots or 'static'} ...", file=sys.stderr, flush=True)
            results["sampler"].append(sampler_row(slots))
            _write(args.json, results)
        print(sampler_table(results["sampler"]))
    if args.paged:
        results["paged"] = []
        for name, recipe, topology, overrides, quarter in PAGED:
            for kv_cache, kv_pages in (("dense", None), ("paged", None), ("paged", quarter)):
                print(f"[compile_at_scale] {name}, {kv_cache} {kv_pages or ''} ...", file=sys.stderr, flush=True)
                results["paged"].append(paged_row(name, recipe, topology, overrides, kv_cache, kv_pages))
                _write(args.json, results)
        print(paged_table(results["paged"]))
    print(recipe_table(results.get("recipes", [])))
    print()
    print(context_table(results.get("context", [])))
    return 0


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
