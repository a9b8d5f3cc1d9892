"""Run under 8 simulated CPU devices (launched by tests/test_sampling_sharded.py).

A tiny Gemma 3 (sliding + full layers) samples on one device, then with its weights in the sampler layout
(sampler_rules: no fsdp, tensor kept) on each mesh given on the command line. Prints one JSON line per
(mesh, case): the largest differences from the one-device result, the output's PartitionSpec, and the
per-device FLOPs of the compiled decode loop against the one-device program.
"""

import dataclasses
import json
import math
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np
from flax import nnx

from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.sampling import GenerationConfig, SamplingParams, continuous, generate, sampler
from pf_jax.sampling.layout import RowLayout
from pf_jax.sampling.power import PowerSamplingConfig, power_generate
from pf_jax.sharding.mesh import DEFAULT_RULES, make_mesh, sampler_rules, state_shardings

PROMPTS = [[5, 9, 13], [7, 11], [2, 3, 4, 5, 6, 7, 8, 9, 10], [21]]
CASES = {
    # name: (prompts, n, config); row counts 6, 8 and 3 exercise padding to the shard count and none
    "t1_min_new": (PROMPTS[:3], 2, GenerationConfig(max_new_tokens=12, min_new_tokens=3, eos_token_ids=(1,))),
    "topk_t07": (PROMPTS[:2], 4, GenerationConfig(max_new_tokens=10, eos_token_ids=(1,), stop_token_ids=(3,),
                                                  sampling=SamplingParams(temperature=0.7, top_k=20))),
    "greedy": (PROMPTS[1:4], 1, GenerationConfig(max_new_tokens=8, sampling=SamplingParams(temperature=0.0))),
    # 3 slots (rounded up to the shard count on a mesh) for 6 samples of 3 prompts: ended rows take waiting ones
    "continuous": (PROMPTS[:3], 2, GenerationConfig(max_new_tokens=12, eos_token_ids=(1,), stop_token_ids=(3,),
                                                    stop_sequences=((5, 6),), batching="continuous", slots=3)),
}
FIELDS = ("tokens", "response_mask", "lengths", "finish_reason", "prompt_tokens", "prompt_mask", "prompt_index")


def model() -> Decoder:
    cfg = ModelConfig.tiny("gemma3", vocab_size=96, num_heads=4, num_kv_heads=2)
    return Decoder(cfg, rngs=nnx.Rngs(3), scan_layers=False)


def on_mesh(m: Decoder, shape: tuple[int, int, int]) -> Decoder:
    """m with its weights in the sampler layout on a mesh of this shape."""
    graphdef, state = nnx.split(m)
    shardings = state_shardings(jax.eval_shape(lambda: state), make_mesh(shape), sampler_rules(DEFAULT_RULES))
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def decode_flops(m: Decoder, prompts, n: int, config: GenerationConfig) -> tuple[float, dict[str, int]]:
    """Per-device FLOPs of the compiled decode loop and its collective ops, for m's weight layout."""
    config, graphdef, state, layout, tokens, mask = sampler.prepare_prompts(m, prompts, config, n)
    # XLA's dots, not pf_jax.kernels' custom calls (whose FLOPs cost_analysis does not count)
    layout = dataclasses.replace(layout, one_device=False, cpu=False)
    hidden, cache = sampler.prefill(graphdef, state, *layout.place_rows((tokens, mask)),
                                     cache_len=tokens.shape[1] + config.max_new_tokens, n=n, layout=layout)
    lengths = layout.place_rows(np.repeat(mask.sum(-1), n).astype(np.int32))
    compiled = sampler._decode.lower(graphdef, state, hidden, cache, lengths, jax.random.key(0), config=config,
                                     layout=layout).compile()
    text = compiled.as_text()
    collectives = {op: len(re.findall(rf"\b{op}\(", text)) for op in ("all-gather", "all-to-all", "collective-permute")}
    return float(compiled.cost_analysis()["flops"]), collectives


def continuous_gathers(m: Decoder) -> dict[str, int]:
    """The continuous case's compiled decode loop on m's mesh: the element count of its largest all-gather,
    against one token's keys or values per slot (kv heads x head dim x slots)."""
    prompts, n, config = CASES["continuous"]
    args, kwargs, _ = continuous.continuous_call(m, prompts, jax.random.key(0), config, n=n)
    text = continuous._decode_continuous.lower(*args, **kwargs).compile().as_text()
    shapes = [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"= \w+\[([0-9,]*)\]\S* all-gather\(", text)]
    return {"max_gather_elements": max((math.prod(s) for s in shapes), default=0),
            "one_token_kv": kwargs["slots"] * m.cfg.num_kv_heads * m.cfg.head_dim,
            "prompt_cache_elements": math.prod(args[3]["k"].shape)}


def diff(ref, out) -> dict[str, float]:
    exact = max(int(np.sum(np.asarray(getattr(ref, f)) != np.asarray(getattr(out, f)))) for f in FIELDS)
    logp = max(float(np.max(np.abs(np.asarray(getattr(ref, f)) - np.asarray(getattr(out, f)))))
               for f in ("policy_logprobs", "sampling_logprobs"))
    return {"mismatched_entries": exact, "max_logprob_diff": logp}


def main(shapes: list[tuple[int, int, int]]) -> None:
    assert jax.device_count() == 8, jax.devices()
    one = model()
    key = jax.random.key(7)
    refs = {name: generate(one, p, key, c, n=n) for name, (p, n, c) in CASES.items()}
    power_cfg = GenerationConfig(max_new_tokens=8, eos_token_ids=(1,))
    power = PowerSamplingConfig(alpha=2.0, block_size=4, mcmc_steps=2)
    power_ref, power_acc = power_generate(one, PROMPTS[:3], key, power_cfg, power, n=2)
    flops_one, _ = decode_flops(one, PROMPTS[:2], 4, CASES["topk_t07"][2])

    for shape in shapes:
        placed = on_mesh(one, shape)
        layout = RowLayout.of(nnx.split(placed)[1])
        for name, (prompts, n, config) in CASES.items():
            out = generate(placed, prompts, key, config, n=n)
            print(json.dumps({"mesh": shape, "case": name, "shards": layout.shards, "rows": len(prompts) * n,
                              "tokens_spec": str(out.tokens.sharding.spec), **diff(refs[name], out)}), flush=True)
        out, acc = power_generate(placed, PROMPTS[:3], key, power_cfg, power, n=2)
        print(json.dumps({"mesh": shape, "case": "power", "shards": layout.shards, "rows": 6, **diff(power_ref, out),
                          "acceptance_diff": float(np.max(np.abs(np.asarray(acc) - np.asarray(power_acc))))}),
              flush=True)
        flops, collectives = decode_flops(placed, PROMPTS[:2], 4, CASES["topk_t07"][2])
        print(json.dumps({"mesh": shape, "case": "cost", "shards": layout.shards, "flops_ratio": flops / flops_one,
                          "collectives": collectives}), flush=True)
        print(json.dumps({"mesh": shape, "case": "continuous_cost", **continuous_gathers(placed)}), flush=True)


if __name__ == "__main__":
    main([tuple(int(x) for x in arg.split(",")) for arg in sys.argv[1:]])
