"""One process of a multi-process sampling check; started by launch/local.sh from tests/test_sharding_multihost.py.

The trainer's placement moves a tiny Gemma 3's weights from the global (data, fsdp) mesh to the sampler
layout of several processes: a whole copy on each of this process's devices, as a mesh of its own. Each
process samples its own prompts there and again with the weights on its first device only, and writes
OUT/result_<process>.json: where the rows ran and how the two results differ.
"""

import json
import os
import sys
from pathlib import Path

from pf_jax.sharding.distributed import initialize_distributed

INFO = initialize_distributed(timeout_s=120)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pf_jax.models.config import ModelConfig  # noqa: E402
from pf_jax.models.decoder import Decoder  # noqa: E402
from pf_jax.sampling import GenerationConfig, SamplingParams, generate  # noqa: E402
from pf_jax.sharding.mesh import MeshConfig  # noqa: E402
from pf_jax.training.placement import MeshPlacement  # noqa: E402


def main(out: Path) -> None:
    model = Decoder(ModelConfig.tiny("gemma3", vocab_size=96), rngs=nnx.Rngs(5), scan_layers=False)
    graphdef, params = nnx.split(model)
    placement = MeshPlacement(MeshConfig(data=2, fsdp=-1))
    sampler = nnx.merge(graphdef, placement.sampler_params(placement.place_params(params)))
    first = nnx.merge(graphdef, jax.device_put(params, jax.local_devices()[0]))

    p = jax.process_index()
    prompts = [[3 + p, 5, 7], [11, 13 + p], [2, 4, 6, 8 + p]]  # this process's own prompts
    config = GenerationConfig(max_new_tokens=10, eos_token_ids=(1,), sampling=SamplingParams(top_k=30))
    key = jax.random.key(11)
    split = generate(sampler, prompts, key, config, n=2)
    whole = generate(first, prompts, key, config, n=2)
    mismatched = sum(int(np.sum(np.asarray(getattr(split, f)) != np.asarray(getattr(whole, f))))
                     for f in ("tokens", "response_mask", "lengths", "finish_reason"))
    logp = max(float(np.max(np.abs(np.asarray(getattr(split, f)) - np.asarray(getattr(whole, f)))))
               for f in ("policy_logprobs", "sampling_logprobs"))
    result = {"process": p, "local_device_count": INFO.local_device_count, "process_count": INFO.process_count,
              "row_devices": sorted(d.id for d in split.tokens.sharding.device_set),
              "local_devices": sorted(d.id for d in jax.local_devices()),
              "spec": str(getattr(split.tokens.sharding, "spec", None)), "mismatched_entries": mismatched, "max_logprob_diff": logp}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"result_{p}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(Path(sys.argv[1]))
