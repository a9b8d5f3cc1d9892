"""Static-shape key/value cache for incremental decoding (prompts left-padded; one write index for the
batch, or one per row for continuous batching)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import Array

from pf_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer in S slots; slot s of row b holds a token iff valid[b, s].

    All rows write at the same slot `index` (prompts are left-padded to a common length), so one decode
    step writes one slot for the whole batch; or, with an int32 [B] index (per_row=True, the
    continuous-batching sampler), row b writes at index[b]. `positions` holds each slot's RoPE position,
    used for sliding-window masks; causality is by slot order.
    """

    k: Array  # [L, B, S, KVH, Dh]
    v: Array  # [L, B, S, KVH, Dh]
    valid: Array  # bool [B, S]
    positions: Array  # int32 [B, S]
    index: Array  # int32 scalar (or [B] per row): next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32, *,
             per_row: bool = False) -> KVCache:
        """An empty cache of max_len slots per row (per_row: a write index per row)."""
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            positions=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((batch,) if per_row else (), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, buf: Array, new: Array) -> Array:
        """buf [B, S] with new [B, T] written at slots [index, index + T) (of each row, for a per-row index)."""
        if jnp.ndim(self.index) == 0:
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, self.index))
        slots = self.index[:, None] + jnp.arange(new.shape[1])
        return buf.at[jnp.arange(buf.shape[0])[:, None], slots].set(new.astype(buf.dtype), mode="drop")

    def key_slots(self, valid: Array, positions: Array) -> tuple[Array, Array, Array]:
        """(the new tokens' slots [1 or B, T], the keys' valid flags and positions [B, S] once they are written)."""
        q_slots = jnp.reshape(self.index, (-1, 1)) + jnp.arange(valid.shape[1])
        return q_slots, self.write(self.valid, valid), self.write(self.positions, positions)

    def write_layer(self, stacked: Array, new: Array, layer: Array | int) -> Array:
        """The stacked keys or values with layer `layer`'s new ones [B, T, KVH, Dh] written at the index."""
        return write_slots(stacked, new.astype(stacked.dtype), self.index, layer)

    def attend(self, ops, q: Array, k: Array, v: Array, k_all: Array, v_all: Array, layer: Array | int, mask,
               window: Array | int, *, fresh: bool, scale: float, softcap: float | None) -> Array:
        """The new tokens' attention over the layer's valid slots (ops.cached_attention)."""
        return ops.cached_attention(q, k, v, k_all, v_all, layer, mask, window, fresh=fresh, scale=scale,
                                    softcap=softcap)

    def advanced(self, k_all: Array, v_all: Array, k_valid: Array, k_positions: Array, t: int) -> KVCache:
        """The cache after a pass of t new tokens."""
        return KVCache(k=k_all, v=v_all, valid=k_valid, positions=k_positions, index=self.index + t)

    def repeat_rows(self, n: int) -> KVCache:
        """Every row repeated n times in place (row b becomes rows b*n .. b*n + n - 1): n samples per
        prompt share one prefill."""
        repeat = lambda x, axis: jnp.repeat(x, n, axis=axis)
        return self.replace(k=repeat(self.k, 1), v=repeat(self.v, 1), valid=repeat(self.valid, 0),
                            positions=repeat(self.positions, 0))


def write_slots(stacked: Array, new: Array, index: Array | int, layer: Array | int) -> Array:
    """The stacked keys or values [L, B, S, KVH, Dh] with layer `layer`'s new ones [B, T, KVH, Dh] written at
    slots [index, index + T): one index for every row (a scalar), or one per row (int32 [B])."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(stacked, new[None], (layer, 0, index, 0, 0))
    slots = jnp.asarray(index)[:, None] + jnp.arange(new.shape[1])
    return stacked.at[layer, jnp.arange(new.shape[0])[:, None], slots].set(new, mode="drop")
