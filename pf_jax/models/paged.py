"""A paged key/value cache: every layer's keys and values in one pool of fixed-size pages, each row reading
its tokens through its own page table (Kwon et al. 2023, vLLM's PagedAttention).

    k, v      [L, KVH, pages, page_size, Dh]   the pool (the Pallas TPU kernel's layout, per layer)
    pages     int32 [B, pages_per_row]         row b's token s lives in page pages[b, s // page_size]
                                               at offset s % page_size
    lengths   int32 [B]                        tokens row b holds (its next token's slot)

A row's tokens start at slot 0 (no left padding), so slot s holds the token at RoPE position s: no validity or
position arrays, a row is valid on [0, length). Rows may share pages (the n samples of one prompt read the
prompt's full pages; pf_jax.sampling.continuous), which a dense cache of rows x max length cannot.

Reading: `gather_rows` is the portable reference (XLA gathers each row's pages into a dense [B, S, KVH, Dh]
block); on TPU, pf_jax.models.ops.SplashOps.paged_attention runs
jax.experimental.pallas.ops.tpu.paged_attention, which streams the pages through VMEM without that block.
The last page of the pool is the scratch page: rows that hold no sample point at it and write into it.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
from jax import Array

from pf_jax.models.config import ModelConfig


@flax.struct.dataclass
class PagedKVCache:
    """See the module doc. A decode step writes token t of row b at slot lengths[b] + t."""

    k: Array  # [L, KVH, P, page_size, Dh]
    v: Array  # [L, KVH, P, page_size, Dh]
    pages: Array  # int32 [B, pages_per_row]
    lengths: Array  # int32 [B]

    @classmethod
    def init(cls, cfg: ModelConfig, rows: int, pages_per_row: int, num_pages: int, page_size: int,
             dtype: jnp.dtype = jnp.float32) -> PagedKVCache:
        """An empty pool of num_pages pages plus the scratch page (index num_pages), every row's table on it."""
        shape = (cfg.num_layers, cfg.num_kv_heads, num_pages + 1, page_size, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   pages=jnp.full((rows, pages_per_row), num_pages, jnp.int32), lengths=jnp.zeros((rows,), jnp.int32))

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def scratch(self) -> int:
        """The scratch page's index (the pool's last)."""
        return self.k.shape[2] - 1

    @property
    def max_len(self) -> int:
        """Slots a row can address: pages_per_row x page_size."""
        return self.pages.shape[1] * self.page_size

    def key_slots(self, valid: Array, positions: Array) -> tuple[Array, Array, Array]:
        """(the new tokens' slots [B, T], the keys' valid flags and positions [B, S] once they are written):
        row b's slots [0, lengths[b] + T) hold tokens, slot s at position s."""
        t = valid.shape[1]
        slots = jnp.arange(self.max_len, dtype=jnp.int32)
        k_valid = slots[None, :] < (self.lengths + t)[:, None]
        return self.lengths[:, None] + jnp.arange(t), k_valid, jnp.broadcast_to(slots, k_valid.shape)

    def write_layer(self, stacked: Array, new: Array, layer: Array | int) -> Array:
        """The pool [L, KVH, P, page_size, Dh] with layer `layer`'s new keys or values [B, T, KVH, Dh] written
        at each row's slots [lengths, lengths + T)."""
        slots = self.lengths[:, None] + jnp.arange(new.shape[1])  # [B, T]
        page = jnp.take_along_axis(self.pages, jnp.minimum(slots // self.page_size, self.pages.shape[1] - 1), 1)
        # advanced indices around a slice: the update's leading dims are [B, T], then KVH, Dh
        return stacked.at[layer, :, page, slots % self.page_size].set(new.astype(stacked.dtype), mode="drop")

    def attend(self, ops, q: Array, k: Array, v: Array, k_all: Array, v_all: Array, layer: Array | int, mask,
               window: Array | int, *, fresh: bool, scale: float, softcap: float | None) -> Array:
        """The new tokens' attention over their rows' pages (ops.paged_attention)."""
        del k, v, fresh
        return ops.paged_attention(q, k_all, v_all, layer, self.pages, self.lengths + q.shape[1], mask, window,
                                   scale=scale, softcap=softcap)

    def advanced(self, k_all: Array, v_all: Array, k_valid: Array, k_positions: Array, t: int) -> PagedKVCache:
        """The cache after a pass of t new tokens per row."""
        del k_valid, k_positions
        return self.replace(k=k_all, v=v_all, lengths=self.lengths + t)


def gather_rows(pool: Array, layer: Array | int, pages: Array) -> Array:
    """Layer `layer` of the pool [L, KVH, P, page_size, Dh] as each row's dense [B, S, KVH, Dh] block
    (S = pages_per_row x page_size; slots past a row's length hold whatever their page holds)."""
    one = pool[layer]  # [KVH, P, ps, Dh]
    rows = one[:, pages]  # [KVH, B, pages_per_row, ps, Dh]
    kvh, b, n, ps, dh = rows.shape
    return rows.reshape(kvh, b, n * ps, dh).transpose(1, 2, 0, 3)


def pages_for(length: int, page_size: int) -> int:
    """Pages that hold `length` tokens."""
    return -(-length // page_size)
