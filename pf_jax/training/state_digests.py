"""Content digests of a train state's arrays: recorded in a checkpoint's sidecar when it is saved and
compared with the arrays restored from it, so that a checkpoint whose bytes changed on disk (a flipped
block with the file size kept) is never resumed from.

A digest is the sha256 of the array's bytes as the host holds them (typed PRNG keys: their key data),
with its dtype and shape; names are `jax.tree_util.keystr` paths (`.params['policy']['embed'].value`).
Arrays are hashed on a thread pool (hashlib releases the GIL). Arrays that span several processes have
no single host copy to hash: such a state gets no digests (None), and its restore is not verified.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

Digests = dict[str, dict[str, Any]]  # name -> {"sha256": hex, "dtype": str, "shape": [int]}


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def host_array(x: Any) -> np.ndarray:
    """The leaf's bytes on the host, C-contiguous (typed keys as their uint32 key data)."""
    return np.ascontiguousarray(np.asarray(jax.random.key_data(x) if _is_key(x) else x))


def array_digest(x: Any) -> dict[str, Any]:
    array = host_array(x)
    digest = hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest()
    return {"sha256": digest, "dtype": str(array.dtype), "shape": list(array.shape)}


def named_leaves(state: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)]


def state_digests(state: Any) -> Digests | None:
    """{array name: digest} of every leaf of `state`; None when an array spans several processes."""
    leaves = named_leaves(state)
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for _, x in leaves):
        return None
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: array_digest(item[1]), leaves))
    return {name: digest for (name, _), digest in zip(leaves, digests)}


def first_difference(state: Any, recorded: Digests) -> str | None:
    """What differs between the arrays of `state` and the digests recorded for them (the first array
    whose bytes, dtype or shape differ, or that has no digest), or None when every array matches."""
    for name, got in (state_digests(state) or {}).items():
        want = recorded.get(name)
        if not isinstance(want, dict):
            return f"array {name} has no recorded digest"
        if got != want:
            return (f"array {name} differs from what was saved (sha256 {got['sha256'][:16]}... {got['dtype']} "
                    f"{tuple(got['shape'])}, recorded {str(want.get('sha256'))[:16]}... {want.get('dtype')} "
                    f"{tuple(want.get('shape') or ())})")
    return None


def as_saved(target: Any, recorded: Digests) -> Any:
    """The restore target with each array in the dtype it was saved in (when the run now wants another
    dtype), so that the bytes read can be checked; `cast_to` then gives the run its dtypes."""

    def leaf(path: Any, t: Any) -> Any:
        want = recorded.get(jax.tree_util.keystr(path))
        if not isinstance(want, dict) or jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
            return t
        if want.get("dtype") == str(t.dtype):
            return t
        return jax.ShapeDtypeStruct(t.shape, jax.numpy.dtype(want["dtype"]), sharding=getattr(t, "sharding", None))

    return jax.tree_util.tree_map_with_path(leaf, target)


def cast_to(state: Any, target: Any) -> Any:
    """`state` with every array in its `target` leaf's dtype."""
    return jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), state, target)
