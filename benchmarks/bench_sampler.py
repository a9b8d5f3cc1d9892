"""Sampler throughput: pf_jax `generate` vs transformers `generate` (PyTorch), side by side in one process.

Model: the embedded Gemma 3 270M (GGUF, dequantised), float32 by default (`--dtype bfloat16` stores and
computes in bf16), on CPU unless JAX_PLATFORMS says otherwise; transformers loads the very same weights
(exported by pf_jax to an HF directory) in the same dtype, on the same kind of device. Sampling at temperature 1 over the full vocabulary
(no top-k / top-p), min_new_tokens = max_new_tokens so that no sequence stops early. Timings are wall
clock of a whole call (prefill + decode), compilation excluded (one warm-up call each). Runs of the two
implementations alternate, so machine noise hits both; the ratio of the best runs is the headline.

Roofline: a decode step must read every weight once (the tied embedding as the output head), so
tokens/s <= batch * read bandwidth / weight bytes. The read bandwidth is measured here: on CPU, sums over
a 1 GiB array (numpy on 1 and 2 threads, XLA), the best figure being used; on an accelerator, an XLA sum
over a 4 GiB array in device memory.

    python benchmarks/bench_sampler.py [--batch 1 16] [--new-tokens 64 128] [--repeats 3] [--json out.json]
    JAX_PLATFORMS=cuda python benchmarks/bench_sampler.py --dtype bfloat16     # on a GPU (issue 9)

transformers runs on CUDA when JAX does and torch has CUDA; with JAX on an accelerator and a CPU-only
torch, the comparison would be across devices, so transformers is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.kernels import skinny_matmul
from pf_jax.models.hf_io import export_hf_directory
from pf_jax.models.registry import load_model
from pf_jax.sampling import GenerationConfig, SamplingParams, generate

PROMPT = "The history of the printing press begins"


def measure_device_read_bandwidth(gib: float = 4.0, repeats: int = 5) -> dict[str, float]:
    """Bytes/s read by an XLA sum over a gib-GiB float32 array in accelerator memory. Best of `repeats`."""
    x = jnp.ones(int(gib * 2**30) // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    return {"xla_device": best_rate(x.nbytes, lambda: total(x).block_until_ready(), repeats)}


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Bytes/s read by summing a gib-GiB float32 array: numpy on 1 thread, numpy on 2 threads (halves
    summed concurrently; numpy releases the GIL in reductions), and an XLA jnp.sum. Best of `repeats`."""
    if jax.default_backend() != "cpu":
        return measure_device_read_bandwidth()
    x = np.ones(int(gib * 2**30) // 4, np.float32)
    halves = np.array_split(x, 2)

    best = lambda fn: best_rate(x.nbytes, fn, repeats)

    def two_threads() -> None:
        threads = [threading.Thread(target=np.sum, args=(h,)) for h in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    xj = jnp.asarray(x)
    xla_sum = jax.jit(jnp.sum)
    result = {
        "numpy_1_thread": best(lambda: np.sum(x)),
        "numpy_2_threads": best(two_threads),
        "xla": best(lambda: xla_sum(xj).block_until_ready()),
    }
    return result


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_rate(nbytes: int, fn, repeats: int) -> float:
    """nbytes / the fastest of `repeats` timed calls of fn, after one untimed warm-up call."""
    fn()
    return nbytes / min(time_call(fn) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each implementation per setting")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="parameter and compute dtype of both implementations")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.torch_threads)
    backend = jax.default_backend()
    device_name = f"{backend} ({jax.devices()[0].device_kind})"
    torch_device = "cpu" if backend == "cpu" else "cuda"
    if backend != "cpu" and not (backend == "gpu" and torch.cuda.is_available()) and not args.skip_transformers:
        print(f"transformers skipped: JAX runs on {device_name}, torch has no device of that kind", flush=True)
        args.skip_transformers = True
    jax_dtype, torch_dtype = {"float32": (jnp.float32, torch.float32),
                              "bfloat16": (jnp.bfloat16, torch.bfloat16)}[args.dtype]
    load_start = time.perf_counter()
    model, tokenizer = load_model("gemma3-270m", dtype=jax_dtype, param_dtype=jax_dtype, scan_layers=False)
    print(f"loaded gemma3-270m ({args.dtype}) on {device_name} in {time.perf_counter() - load_start:.1f}s",
          flush=True)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    bandwidth = measure_read_bandwidth()
    read_bw = max(bandwidth.values())
    print("read bandwidth GB/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bandwidth.items()), flush=True)
    # pf_jax.kernels' decode matmuls (PF_JAX_CPU_KERNELS=0 turns them off, for A/B runs)
    cpu_kernel = backend == "cpu" and args.dtype == "float32" and skinny_matmul.available()
    amx = cpu_kernel and skinny_matmul.amx_available()

    hf = None
    if not args.skip_transformers:
        with tempfile.TemporaryDirectory() as tmp:
            export_hf_directory(model, tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).to(torch_device).eval()
    prompt_ids = tokenizer(PROMPT).input_ids

    rows = []
    for batch in args.batch:
        for new_tokens in args.new_tokens:
            config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      sampling=SamplingParams(temperature=1.0))
            prompts = [prompt_ids] * batch
            calls = [0]

            def ours(config=config, prompts=prompts, calls=calls) -> None:
                calls[0] += 1
                result = generate(model, prompts, jax.random.key(calls[0]), config)
                jax.block_until_ready(result.tokens)
                assert int(result.lengths.min()) == config.max_new_tokens

            def theirs(batch=batch, new_tokens=new_tokens) -> None:
                input_ids = torch.tensor([prompt_ids] * batch, device=torch_device)
                with torch.inference_mode():
                    out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=0)
                assert out.shape[1] == len(prompt_ids) + new_tokens
                if torch_device == "cuda":
                    torch.cuda.synchronize()

            compile_s = time_call(ours)
            if hf is not None:
                theirs(new_tokens=4)  # warm-up: a short call
            ours_s, theirs_s = [], []
            for _ in range(args.repeats):
                ours_s.append(time_call(ours))
                if hf is not None:
                    theirs_s.append(time_call(theirs))
            tokens = batch * new_tokens
            row = {
                "batch": batch, "new_tokens": new_tokens,
                "ours_tok_s_best": tokens / min(ours_s), "ours_tok_s_median": tokens / statistics.median(ours_s),
                "ours_first_call_s": compile_s,
                "roofline_tok_s": batch * read_bw / weight_bytes,
            }
            row["ours_roofline_fraction"] = row["ours_tok_s_best"] / row["roofline_tok_s"]
            if theirs_s:
                row.update({
                    "transformers_tok_s_best": tokens / min(theirs_s),
                    "transformers_tok_s_median": tokens / statistics.median(theirs_s),
                    "ratio_best": min(theirs_s) / min(ours_s),
                    "ratio_paired_median": statistics.median(t / o for o, t in zip(ours_s, theirs_s)),
                })
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    print(f"\nGemma 3 270M, {args.dtype}, {device_name}, {os.cpu_count()} CPU cores, torch threads "
          f"{args.torch_threads}, "
          f"T=1 full-vocabulary sampling; weights {weight_bytes / 1e6:.0f} MB, read bandwidth "
          f"{read_bw / 1e9:.1f} GB/s; pf_jax CPU kernels {'on' if cpu_kernel else 'off'}{' (AMX: the head for 12-32 and 48-64 rows, the projections packed for 12-32)' if amx else ''}; load average {os.getloadavg()[0]:.1f}; best of {args.repeats} (median)")
    print("| batch | new tokens | pf_jax tok/s | transformers tok/s | ratio | roofline tok/s | pf_jax / roofline |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        theirs_txt = (f"{r['transformers_tok_s_best']:.1f} ({r['transformers_tok_s_median']:.1f})"
                      if "transformers_tok_s_best" in r else "-")
        ratio_txt = f"{r['ratio_best']:.2f}x" if "ratio_best" in r else "-"
        print(f"| {r['batch']} | {r['new_tokens']} | {r['ours_tok_s_best']:.1f} ({r['ours_tok_s_median']:.1f}) | "
              f"{theirs_txt} | {ratio_txt} | {r['roofline_tok_s']:.1f} | {r['ours_roofline_fraction']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "dtype": args.dtype, "bandwidth_bytes_s": bandwidth,
                                         "weight_bytes": weight_bytes, "cpu_kernel": cpu_kernel, "amx": amx, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
