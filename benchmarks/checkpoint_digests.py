"""What the content digests of a checkpoint cost: save and restore of a Gemma 3 270M train state (float32
parameters + AdamW moments, 3.2 GB) with digests and without, on this host.

    python benchmarks/checkpoint_digests.py [--repeats 3] [--dir /tmp/pf_jax_digest_bench] [--json out.json]

"without" is the same Checkpointer with the digest function returning None (what a state spanning several
processes records), so the two differ by the digests alone. Timed per variant, interleaved, median of the
repeats: `save_call_s` (the step loop is blocked: device-to-host copy, digests), `save_total_s` (until the
checkpoint is committed on disk), `restore_s` (read, and with digests verify). Also the SHA256SUMS of an
export: hashing the 1.07 GB model.safetensors, as the export writes it and a load checks it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pf_jax.models.embedded import file_sha256
from pf_jax.models.registry import load_model
from pf_jax.training import checkpoint
from pf_jax.training.checkpoint import Checkpointer
from pf_jax.training.state_digests import state_digests
from pf_jax.training.step import TrainState


def gemma_train_state() -> TrainState:
    model, _ = load_model("gemma3-270m")
    params = {"policy": nnx.state(model, nnx.Param)}
    tx = optax.adamw(1e-5)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.key(0))


def timed_round(state: TrainState, directory: Path, digests: bool) -> dict[str, float]:
    shutil.rmtree(directory, ignore_errors=True)
    checkpoint.state_digests = state_digests if digests else (lambda tree: None)
    try:
        with Checkpointer(directory, every_steps=1, keep=1) as ckpt:
            began = time.perf_counter()
            ckpt.save(1, state, {"data": None}, force=True)
            called = time.perf_counter()
            ckpt.wait()
            saved = time.perf_counter()
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
            restored = ckpt.restore(1, target)
            jax.block_until_ready(jax.tree.leaves(restored.state))
            done = time.perf_counter()
    finally:
        checkpoint.state_digests = state_digests
    return {"save_call_s": called - began, "save_total_s": saved - began, "restore_s": done - saved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pf_jax_digest_bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    state = gemma_train_state()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes") and x.dtype != jax.dtypes.float0)
    began = time.perf_counter()
    state_digests(state)
    digest_s = time.perf_counter() - began
    rounds: dict[str, list[dict[str, float]]] = {"with": [], "without": []}
    for _ in range(args.repeats):
        for variant in ("without", "with"):
            rounds[variant].append(timed_round(state, args.dir, digests=variant == "with"))
            print(variant, {k: round(v, 3) for k, v in rounds[variant][-1].items()}, flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    median = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in rounds.items()}
    weights = next(Path(p) for p in (Path.home() / ".cache" / "pf_jax" / "dequantised").glob("*-v2/model.safetensors"))
    began = time.perf_counter()
    file_sha256(weights)
    export_s = time.perf_counter() - began
    report = {"state_bytes": nbytes, "digest_only_s": digest_s, "median": median, "rounds": rounds,
              "export_weights_bytes": weights.stat().st_size, "export_weights_sha256_s": export_s,
              "device": str(jax.devices()[0]), "repeats": args.repeats}
    print(f"Gemma 3 270M train state, {nbytes / 1e9:.2f} GB, median of {args.repeats}:")
    for key in ("save_call_s", "save_total_s", "restore_s"):
        w, wo = median["with"][key], median["without"][key]
        print(f"  {key:13s} without {wo:6.2f} s   with digests {w:6.2f} s   (+{w - wo:.2f} s)")
    print(f"  digests alone {digest_s:.2f} s; SHA256SUMS of the exported weights ({weights.stat().st_size / 1e9:.2f} GB) "
          f"{export_s:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
