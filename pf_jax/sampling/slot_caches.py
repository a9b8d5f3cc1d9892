"""Where continuous batching's slots keep their keys and values (GenerationConfig.kv_cache).

    DenseSlots  "dense": a KVCache row of prompt bucket + max_new_tokens slots per slot; admitting a sample
                copies its prompt's cache slots into the row (prompt left-padded, as the static sampler's)
    PagedSlots  "paged": one pool of pages (pf_jax.models.paged). The prompts are written once, right-aligned,
                into the pool's first pages; a sample's page table starts with its prompt's full pages
                (shared by the prompt's n samples) and goes on with `reserve` pages of its own, taken from
                the free pages when it is admitted (a copy of the prompt's last, partial page first) and
                given back when it ends. A sample waits for pages as it waits for a slot, so the pool
                (GenerationConfig.kv_pages) may hold fewer than slots x reserve pages: memory then follows
                the samples decoding, not the slots.

Both keep what the decode loop needs in its carry under "cache" (and "free_pages", "own" for pages) and
are static (hashable) parts of the loop's program.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import Array

from pf_jax.config.errors import ConfigError
from pf_jax.models.kv_cache import KVCache
from pf_jax.models.paged import PagedKVCache, pages_for


def kv_bytes(model, tokens: int) -> int:
    """Bytes of the keys and values of `tokens` cache slots over every layer."""
    cfg = model.cfg
    return 2 * cfg.num_layers * tokens * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(model.dtype).itemsize


def _where_rows(mask: Array, new: Array, old: Array, axis: int = 0) -> Array:
    """new where mask [B] (rows along `axis`), else old."""
    return jnp.where(mask.reshape((-1,) + (1,) * (old.ndim - axis - 1)), new, old)


@dataclasses.dataclass(frozen=True)
class DenseSlots:
    """Each slot a dense cache row of prompt_len + steps slots (prompt in [0, prompt_len), left-padded)."""

    prompt_len: int
    steps: int

    def init(self, model, slots: int, prompt: dict[str, Array]) -> dict[str, Array]:
        return dict(cache=KVCache.init(model.cfg, slots, self.prompt_len + self.steps, model.dtype, per_row=True))

    def memory(self, model, slots: int, prompts: int) -> tuple[int, str]:
        """(bytes of the slots' keys and values, how they add up)."""
        length = self.prompt_len + self.steps
        return kv_bytes(model, slots * length), f"{slots} slots x ({self.prompt_len} prompt + {self.steps} new tokens)"

    def for_step(self, c: dict) -> KVCache:
        """The cache as the next decode step writes it: each slot's last token at prompt_len + j - 1."""
        return c["cache"].replace(index=self.prompt_len + jnp.maximum(c["j"] - 1, 0))

    def admissible(self, c: dict) -> Array | int:
        """How many samples the cache can take now (any: a slot is a row)."""
        return c["j"].shape[0]

    def admit(self, c: dict, admitted: Array, row: Array, prompt: dict[str, Array]) -> dict:
        """The admitted slots' rows hold their prompts' cache slots."""
        cache, P = c["cache"], self.prompt_len
        k = cache.k.at[:, :, :P].set(_where_rows(admitted, prompt["k"][:, row], cache.k[:, :, :P], 1))
        v = cache.v.at[:, :, :P].set(_where_rows(admitted, prompt["v"][:, row], cache.v[:, :, :P], 1))
        fill = lambda buf, head: _where_rows(admitted, jnp.zeros_like(buf).at[:, :P].set(head), buf)
        return dict(c, cache=cache.replace(k=k, v=v, valid=fill(cache.valid, prompt["valid"][row]),
                                           positions=fill(cache.positions, prompt["positions"][row])))

    def release(self, c: dict, ended: Array) -> dict:
        return c


@dataclasses.dataclass(frozen=True)
class PagedSlots:
    """See the module doc. prompt_len: the prompt bucket; steps: max_new_tokens; pages: the pool's pages
    beyond the prompts' (None: every slot's reserve)."""

    prompt_len: int
    steps: int
    page_size: int
    pages: int | None = None

    def __post_init__(self) -> None:
        if self.pages is not None and self.pages < self.reserve:
            raise ConfigError(
                f"rollout.kv_pages={self.pages} cannot hold one sample: a sample takes up to {self.reserve} pages "
                f"of {self.page_size} tokens (its prompt's last page and {self.steps} new tokens)",
                hint=f"set rollout.kv_pages to at least {self.reserve}, or leave it out (every slot's worst case)")

    @property
    def prompt_pages(self) -> int:
        """Pages of one prompt (its bucket, right-aligned)."""
        return pages_for(self.prompt_len, self.page_size)

    @property
    def reserve(self) -> int:
        """Pages a sample takes: its prompt's partial page and every response token, at most."""
        return pages_for(self.page_size - 1 + self.steps, self.page_size)

    def pool_pages(self, slots: int) -> int:
        return self.reserve * slots if self.pages is None else self.pages

    def init(self, model, slots: int, prompt: dict[str, Array]) -> dict[str, Array]:
        """The pool: the prompts' pages, then the free pages, then the scratch page."""
        rows, free = prompt["k"].shape[1], self.pool_pages(slots)
        cache = PagedKVCache.init(model.cfg, slots, self.prompt_pages + self.reserve, rows * self.prompt_pages + free,
                                  self.page_size, model.dtype)
        held = [_right_aligned_pages(prompt[name], prompt["lengths"], self.page_size) for name in ("k", "v")]
        cache = cache.replace(k=cache.k.at[:, :, : held[0].shape[2]].set(held[0]),
                              v=cache.v.at[:, :, : held[1].shape[2]].set(held[1]))
        is_free = jnp.arange(cache.scratch + 1) >= rows * self.prompt_pages
        return dict(cache=cache, free_pages=is_free & (jnp.arange(cache.scratch + 1) < cache.scratch),
                    own=jnp.full((slots, self.reserve), cache.scratch, jnp.int32))

    def memory(self, model, slots: int, prompts: int) -> tuple[int, str]:
        """(bytes of the pool's keys and values, how they add up)."""
        pages = prompts * self.prompt_pages + self.pool_pages(slots) + 1
        return kv_bytes(model, pages * self.page_size), (
            f"{pages} pages of {self.page_size} tokens ({prompts} prompts x {self.prompt_pages} + "
            f"{self.pool_pages(slots)} for the samples + 1 scratch)")

    def for_step(self, c: dict) -> PagedKVCache:
        """The cache as the next decode step writes it: each slot holds its prompt and j - 1 response tokens."""
        return c["cache"].replace(lengths=c["prompt_length"] + jnp.maximum(c["j"] - 1, 0))

    def admissible(self, c: dict) -> Array:
        """Samples whose reserve the free pages hold."""
        return jnp.sum(c["free_pages"], dtype=jnp.int32) // self.reserve

    def admit(self, c: dict, admitted: Array, row: Array, prompt: dict[str, Array]) -> dict:
        """Each admitted slot takes `reserve` free pages (lowest first, in slot order) and a page table of
        its prompt's full pages then its own; its first own page gets a copy of the prompt's partial page."""
        cache, R, ps = c["cache"], self.reserve, self.page_size
        slots = admitted.shape[0]
        rank = jnp.cumsum(admitted.astype(jnp.int32)) - 1
        free_ids = jnp.nonzero(c["free_pages"], size=slots * R, fill_value=cache.scratch)[0]
        mine = free_ids[jnp.clip(rank[:, None] * R + jnp.arange(R), 0, slots * R - 1)]
        own = jnp.where(admitted[:, None], mine, c["own"])
        taken = jnp.where(admitted[:, None], mine, cache.scratch + 1)  # out of range: dropped
        free_pages = c["free_pages"].at[taken].set(False, mode="drop")
        full = prompt["lengths"][row] // ps  # the prompt's full pages, shared
        t = jnp.arange(cache.pages.shape[1])
        first = row[:, None] * self.prompt_pages
        table = jnp.where(t < full[:, None], first + t,
                          jnp.take_along_axis(own, jnp.clip(t - full[:, None], 0, R - 1), 1))
        table = jnp.where(t - full[:, None] < R, table, cache.scratch)
        partial = first[:, 0] + jnp.minimum(full, self.prompt_pages - 1)
        dst = jnp.where(admitted, own[:, 0], cache.scratch + 1)
        copy = lambda pool: pool.at[:, :, dst].set(pool[:, :, partial], mode="drop")
        cache = cache.replace(k=copy(cache.k), v=copy(cache.v),
                              pages=jnp.where(admitted[:, None], table, cache.pages))
        return dict(c, cache=cache, own=own, free_pages=free_pages)

    def release(self, c: dict, ended: Array) -> dict:
        """Slots whose sample ended give their pages back and point at the scratch page."""
        cache = c["cache"]
        back = jnp.where(ended[:, None], c["own"], cache.scratch + 1)
        return dict(c, free_pages=c["free_pages"].at[back].set(True, mode="drop"),
                    own=jnp.where(ended[:, None], cache.scratch, c["own"]),
                    cache=cache.replace(pages=jnp.where(ended[:, None], cache.scratch, cache.pages)))


def _right_aligned_pages(kv: Array, lengths: Array, page_size: int) -> Array:
    """The prompts' left-padded keys or values [L, rows, P, KVH, Dh] (lengths [rows]) right-aligned (token i
    at slot i) and cut into pages: [L, KVH, rows x pages_for(P), page_size, Dh], prompt r's pages together."""
    L, rows, P, kvh, dh = kv.shape
    slots = jnp.arange(P)[None, :] + (P - lengths)[:, None]  # [rows, P]; past a prompt's length: clipped
    aligned = jnp.take_along_axis(kv, jnp.minimum(slots, P - 1)[None, :, :, None, None], axis=2)
    n = pages_for(P, page_size)
    aligned = jnp.pad(aligned, ((0, 0), (0, 0), (0, n * page_size - P), (0, 0), (0, 0)))
    paged = aligned.reshape(L, rows, n, page_size, kvh, dh).transpose(0, 4, 1, 2, 3, 5)
    return paged.reshape(L, kvh, rows * n, page_size, dh)


SLOT_CACHES = {  # GenerationConfig.kv_cache -> the slot cache for a prompt bucket
    "dense": lambda config, prompt_len: DenseSlots(prompt_len, config.max_new_tokens),
    "paged": lambda config, prompt_len: PagedSlots(prompt_len, config.max_new_tokens, config.page_size,
                                                   config.kv_pages),
}
