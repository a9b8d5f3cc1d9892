"""Rollout throughput: static against continuous batching (rollout.batching) at the same slot count, in one
process, on the embedded Gemma 3 270M (float32, unrolled layers, CPU unless JAX_PLATFORMS says otherwise).

Prompts: the eval fixtures (pf_jax/configs/eval: word problems and arithmetic, each in its few-shot
template), repeated to --prompts, --samples each, temperature 1 over the full vocabulary, stop string
"\\n\\n" (the fixtures' answer ends there) and EOS: natural lengths with a long tail up to max_new_tokens.
The stop string ends a row inside the decode loop through the ids of the tokens whose text holds it
(e.g. "\\n\\n", "\\n\\n\\n") and through its token sequences (two "\\n" tokens:
pf_jax.sampling.stops.stop_token_sequences, as the trainer's rollouts); a stop spelled otherwise is cut
afterwards on the text (pf_jax.sampling.stops), as the trainer does, and the tokens after it are not counted.

- static: the samples in calls of --slots rows (slots / samples prompts each), each call decoding until
  its longest row ends; draws keyed per sample (sample_keys, first_sample), so that both rollouts draw
  the same samples (identical_samples_fraction reports how many came out token for token the same);
- continuous: one call with --slots rows, a row taking the next waiting sample when its sample ends;
- paged (--paged): the same call with the paged KV cache (rollout.kv_cache=paged, 16-token pages, --kv-pages
  of them for the samples): its attention gathers each row's pages on CPU (the Pallas kernel is TPU's),
  so this measures that cost, and with a small pool the cost of preempting and recomputing samples.

Useful tokens = response tokens through the stop (non-padding, after the text cut). Each timing is a whole
rollout (prefill + decode, compilation excluded by one warm-up each); runs alternate A/B and the medians
are reported, with continuous_over_static_ratio = median continuous useful tok/s / median static's.

    python benchmarks/bench_rollout.py [--prompts 64] [--samples 4] [--slots 32] [--max-new-tokens 256]
                                       [--repeats 3] [--json benchmarks/results/rollout.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from pf_jax.models.registry import load_model
from pf_jax.sampling import GenerationConfig, SamplingParams, bucket_length, generate
from pf_jax.sampling.stops import cut_at_stops, stop_token_sequences

FIXTURES = Path(__file__).resolve().parents[1] / "pf_jax" / "configs" / "eval"
STOP = "\n\n"
BINS = (1, 9, 17, 33, 65, 129, 256)  # histogram edges: [1, 8], [9, 16], ..., [129, 255], then 256+


def fixture_prompts(count: int) -> list[str]:
    """The eval fixtures' prompts in their few-shot templates, repeated to `count`."""
    texts = []
    for name in ("word_problems", "simple_arithmetic"):
        template = (FIXTURES / f"{name}_template.txt").read_text()
        rows = [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]
        texts += [template.replace("{prompt}", row["prompt"]) for row in rows]
    return [texts[i % len(texts)] for i in range(count)]


def stop_ids(tokenizer, stop: str) -> tuple[int, ...]:
    """Ids of the tokens whose own text holds `stop`."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return tuple(i for i, piece in enumerate(vocab) if piece and stop in tokenizer.convert_tokens_to_string([piece]))


def useful_lengths(result, decode) -> np.ndarray:
    """Response tokens through the stop string (text cut), per sample."""
    cut, _ = cut_at_stops(result, decode, (STOP,), 0)
    return np.asarray(cut.lengths)


def static_rollout(model, ids, key, config, n, slots):
    """The samples in static calls of `slots` rows; -> (useful lengths, decode steps of all calls)."""
    per_call = max(1, slots // n)
    results = [generate(model, ids[s : s + per_call], key, config, n=n, first_sample=s * n)
               for s in range(0, len(ids), per_call)]
    jax.block_until_ready([r.tokens for r in results])
    return results, sum(int(r.lengths.max()) for r in results)


def continuous_rollout(model, ids, key, config, n, slots, **cache):
    """One continuous call of `slots` rows (cache: the slot cache's settings, e.g. kv_cache="paged")."""
    result = generate(model, ids, key, dataclasses.replace(config, batching="continuous", slots=slots, **cache), n=n)
    jax.block_until_ready(result.tokens)
    return [result], None


def same_samples(a: list, b: list) -> float:
    """The fraction of samples whose response tokens are the same in both rollouts."""
    ta = np.concatenate([np.asarray(r.tokens) for r in a])
    tb = np.concatenate([np.asarray(r.tokens) for r in b])
    return float(np.mean(np.all(ta == tb, axis=1)))


def histogram(lengths: np.ndarray, cap: int) -> dict[str, int]:
    edges = [b for b in BINS if b < cap] + [cap, cap + 1]
    counts, _ = np.histogram(lengths, bins=edges)
    names = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(edges[:-1])] + [f"{cap}"]
    return dict(zip(names, map(int, counts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--paged", action="store_true",
                        help="also time continuous batching with the paged KV cache (paged_over_continuous_ratio)")
    parser.add_argument("--kv-pages", type=int, default=None,
                        help="--paged: the pool's pages for the samples (default: every slot's worst case)")
    args = parser.parse_args()

    model, tokenizer = load_model("gemma3-270m", dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=False)
    ids = [tokenizer(p).input_ids for p in fixture_prompts(args.prompts)]
    stops = stop_ids(tokenizer, STOP)
    decode = lambda tokens: tokenizer.decode(tokens)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=SamplingParams(temperature=1.0),
                              stop_token_ids=stops, min_prompt_bucket=8, sample_keys=True,
                              stop_sequences=stop_token_sequences((STOP,), encode, decode))
    paged = functools.partial(continuous_rollout, kv_cache="paged", page_size=16, kv_pages=args.kv_pages)
    runs = {"static": static_rollout, "continuous": continuous_rollout} | ({"paged": paged} if args.paged else {})
    times: dict[str, list[float]] = {k: [] for k in runs}
    useful: dict[str, list[int]] = {k: [] for k in runs}
    lengths: dict[str, np.ndarray] = {}
    static_steps, identical, paged_identical = [], [], []
    per_call = max(1, args.slots // args.samples)
    buckets = {bucket_length(max(map(len, ids[s : s + per_call])), minimum=8): s for s in range(0, len(ids), per_call)}
    warm = [ids[s : s + per_call] for s in buckets.values()]  # one static call per prompt bucket compiles them all
    for name, run in runs.items():  # warm-up: compilation
        start = time.perf_counter()
        for chunk in (warm if name == "static" else [ids]):
            run(model, chunk, jax.random.key(0), config, args.samples, args.slots)
        print(f"{name} warm-up (compiles) {time.perf_counter() - start:.1f}s", flush=True)
    for rep in range(args.repeats):
        outputs = {}
        for name, run in runs.items():
            start = time.perf_counter()
            results, steps = outputs[name] = run(model, ids, jax.random.key(rep + 1), config, args.samples, args.slots)
            seconds = time.perf_counter() - start
            got = np.concatenate([useful_lengths(r, decode) for r in results])
            times[name].append(seconds)
            useful[name].append(int(got.sum()))
            lengths.setdefault(name, got)
            if steps is not None:
                static_steps.append(steps)
            print(f"{name} run {rep}: {seconds:.1f}s, {got.sum()} useful tokens, {got.sum() / seconds:.1f} tok/s",
                  flush=True)
        identical.append(same_samples(outputs["static"][0], outputs["continuous"][0]))
        if args.paged:
            paged_identical.append(same_samples(outputs["paged"][0], outputs["continuous"][0]))
    rate = {k: statistics.median(u / t for u, t in zip(useful[k], times[k])) for k in runs}
    out = {
        "model": "gemma3-270m float32", "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_end": os.getloadavg()[0],
        "prompts": args.prompts, "samples_per_prompt": args.samples, "slots": args.slots,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "stop": STOP, "stop_token_ids": len(stops),
        "stop_sequences": [list(seq) for seq in config.stop_sequences],
        "seconds": times, "useful_tokens": useful, "identical_samples_fraction": identical,
        "static_decode_steps_per_run": static_steps,
        "static_useful_tok_s_median": rate["static"], "continuous_useful_tok_s_median": rate["continuous"],
        "static_seconds_median": statistics.median(times["static"]),
        "continuous_seconds_median": statistics.median(times["continuous"]),
        "continuous_over_static_ratio": rate["continuous"] / rate["static"],
        "paired_ratios": [(uc / tc) / (us / ts) for us, ts, uc, tc in
                          zip(useful["static"], times["static"], useful["continuous"], times["continuous"])],
        "length_histogram": {k: histogram(v, args.max_new_tokens) for k, v in lengths.items()},
        "mean_useful_length": {k: float(v.mean()) for k, v in lengths.items()},
    }
    if args.paged:
        out |= {"kv_pages": args.kv_pages, "paged_useful_tok_s_median": rate["paged"], "paged_over_continuous_ratio": rate["paged"] / rate["continuous"],
                "paged_identical_to_continuous_fraction": paged_identical}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
