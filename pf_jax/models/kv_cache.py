"""Static-shape key/value cache for incremental decoding (prompts left-padded, one write index per batch)."""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
from jax import Array

from pf_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer in S slots; slot s of row b holds a token iff valid[b, s].

    All rows write at the same slot `index` (prompts are left-padded to a common length), so one decode
    step writes one slot for the whole batch. `positions` holds each slot's RoPE position, used for
    sliding-window masks; causality is by slot order.
    """

    k: Array  # [L, B, S, KVH, Dh]
    v: Array  # [L, B, S, KVH, Dh]
    valid: Array  # bool [B, S]
    positions: Array  # int32 [B, S]
    index: Array  # int32 scalar: next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
        """An empty cache of max_len slots per row."""
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            positions=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def repeat_rows(self, n: int) -> KVCache:
        """Every row repeated n times in place (row b becomes rows b*n .. b*n + n - 1): n samples per
        prompt share one prefill."""
        repeat = lambda x, axis: jnp.repeat(x, n, axis=axis)
        return self.replace(k=repeat(self.k, 1), v=repeat(self.v, 1), valid=repeat(self.valid, 0),
                            positions=repeat(self.positions, 0))
