"""Where continuous batching's slots keep their keys and values (GenerationConfig.kv_cache).

    DenseSlots  "dense": a KVCache row of prompt bucket + max_new_tokens slots per slot; admitting a sample
                copies its prompt's cache slots into the row (prompt left-padded, as the static sampler's)
    PagedSlots  "paged": one pool of pages (pf_jax.models.paged). The prompts are written once, from slot 0,
                into the pool's first pages; a sample's page table starts with its prompt's full pages
                (shared by the prompt's n samples), then a copy of the prompt's last, partial page taken
                when it is admitted, then one more free page each time it writes past its pages; it gives
                them back when it ends. When a step's growing samples need more pages than are free, the
                youngest running samples (highest ids) are preempted: their pages freed, they start again
                later and draw the same tokens (keyed by sample and position). The pool
                (GenerationConfig.kv_pages, at least one sample's worst case) may hold far fewer pages than
                slots x worst case: memory then follows the tokens held, not the slots.

Both keep what the decode loop needs in its carry under "cache" (and, for pages, the free pages, each
slot's own pages, the preempted samples) and are static (hashable) parts of the loop's program. The loop
calls: init, admissible / retries / admit (when slots are free), grow (before each decode step), for_step,
release (when samples end), pending (whether preempted samples wait).
"""

from __future__ import annotations

import dataclasses

import jax
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

    def init(self, model, slots: int, prompt: dict[str, Array], capacity: int) -> dict[str, Array]:
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

    def retries(self, c: dict) -> tuple[Array, Array]:
        """(samples waiting to start again, their count): none, a dense slot is never preempted."""
        return jnp.zeros(c["running"].shape, jnp.int32), jnp.int32(0)

    def pending(self, c: dict) -> Array:
        return jnp.bool_(False)

    def grow(self, c: dict) -> dict:
        return c

    def admit(self, c: dict, admitted: Array, row: Array, prompt: dict[str, Array], retried: Array,
              waiting: Array) -> dict:
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
    beyond the prompts' (None: every slot's worst case, `reserve`; at least one sample's)."""

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
        """Pages of one prompt (its bucket, from slot 0)."""
        return pages_for(self.prompt_len, self.page_size)

    @property
    def reserve(self) -> int:
        """The most pages a sample takes: its prompt's partial page and every response token."""
        return pages_for(self.page_size - 1 + self.steps, self.page_size)

    def pool_pages(self, slots: int) -> int:
        return self.reserve * slots if self.pages is None else self.pages

    def init(self, model, slots: int, prompt: dict[str, Array], capacity: int) -> dict[str, Array]:
        """The pool (the prompts' pages, then the free pages, then the scratch page), each slot's own pages
        and their count, the preempted samples (by id < capacity) and how many preemptions."""
        rows, free = prompt["k"].shape[1], self.pool_pages(slots)
        cache = PagedKVCache.init(model.cfg, slots, self.prompt_pages + self.reserve, rows * self.prompt_pages + free,
                                  self.page_size, model.dtype)
        held = [_pages_from_slot_zero(prompt[name], prompt["lengths"], self.page_size) for name in ("k", "v")]
        cache = cache.replace(k=cache.k.at[:, :, : held[0].shape[2]].set(held[0]),
                              v=cache.v.at[:, :, : held[1].shape[2]].set(held[1]))
        is_free = jnp.arange(cache.scratch + 1) >= rows * self.prompt_pages
        return dict(cache=cache, free_pages=is_free & (jnp.arange(cache.scratch + 1) < cache.scratch),
                    own=jnp.full((slots, self.reserve), cache.scratch, jnp.int32),
                    held=jnp.zeros((slots,), jnp.int32), requeued=jnp.zeros((capacity,), bool),
                    preempted=jnp.int32(0))

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
        """Samples the free pages take now: one page each (the prompt's partial page), keeping one page of
        headroom per running sample."""
        return jnp.maximum(jnp.sum(c["free_pages"], dtype=jnp.int32) - jnp.sum(c["running"], dtype=jnp.int32), 0)

    def retries(self, c: dict) -> tuple[Array, Array]:
        """(the preempted samples waiting to start again, lowest first, [slots]; their count, at most slots)."""
        slots = c["running"].shape[0]
        ids = jnp.nonzero(c["requeued"], size=slots, fill_value=0)[0].astype(jnp.int32)
        return ids, jnp.minimum(jnp.sum(c["requeued"], dtype=jnp.int32), slots)

    def pending(self, c: dict) -> Array:
        return jnp.any(c["requeued"])

    def admit(self, c: dict, admitted: Array, row: Array, prompt: dict[str, Array], retried: Array,
              waiting: Array) -> dict:
        """Each admitted slot takes one free page (lowest first, in slot order), a copy of its prompt's
        partial page, and a page table of its prompt's full pages then that page."""
        cache, ps = c["cache"], self.page_size
        rank = jnp.cumsum(admitted.astype(jnp.int32)) - 1
        page = self._take(c["free_pages"], admitted, rank, cache.scratch)
        full = prompt["lengths"][row] // ps  # the prompt's full pages, shared
        t = jnp.arange(cache.pages.shape[1])
        first = row * self.prompt_pages
        table = jnp.where(t < full[:, None], first[:, None] + t, jnp.where(t == full[:, None], page[:, None],
                                                                           cache.scratch))
        partial = first + jnp.minimum(full, self.prompt_pages - 1)
        dst = jnp.where(admitted, page, cache.scratch + 1)  # out of range: dropped
        copy = lambda pool: pool.at[:, :, dst].set(pool[:, :, partial], mode="drop")
        own = jnp.full_like(c["own"], cache.scratch).at[:, 0].set(page)
        return dict(c, cache=cache.replace(k=copy(cache.k), v=copy(cache.v),
                                           pages=jnp.where(admitted[:, None], table, cache.pages)),
                    own=jnp.where(admitted[:, None], own, c["own"]), held=jnp.where(admitted, 1, c["held"]),
                    free_pages=c["free_pages"].at[dst].set(False, mode="drop"),
                    requeued=c["requeued"].at[jnp.where(retried, waiting, c["requeued"].shape[0])].set(
                        False, mode="drop"))

    def grow(self, c: dict) -> dict:
        """Before a decode step: each running slot about to write past its pages takes a free page; while
        the free pages are too few, the running sample of the highest id (the youngest) is preempted: its
        pages freed, it starts again later (its tokens are keyed by sample and position, so it draws them
        again). The oldest sample always goes on, so every sample ends."""
        ps, slots = self.page_size, c["running"].shape[0]
        written = (c["prompt_length"] + jnp.maximum(c["j"] - 1, 0)) // ps  # the page this step writes
        need = lambda c: c["running"] & (written >= c["prompt_length"] // ps + c["held"])

        def preempt(c: dict) -> dict:
            victim = jnp.arange(slots) == jnp.argmax(jnp.where(c["running"], c["sample"], -1))
            requeued = c["requeued"].at[jnp.where(victim, c["sample"], c["requeued"].shape[0])].set(True, mode="drop")
            return dict(self._free(c, victim), running=c["running"] & ~victim, requeued=requeued,
                        preempted=c["preempted"] + 1)

        c = jax.lax.while_loop(lambda c: jnp.sum(need(c)) > jnp.sum(c["free_pages"]), preempt, c)
        grows = need(c)
        cache, rows = c["cache"], jnp.arange(slots)
        page = self._take(c["free_pages"], grows, jnp.cumsum(grows.astype(jnp.int32)) - 1, cache.scratch)
        at = jnp.minimum(c["prompt_length"] // ps + c["held"], cache.pages.shape[1] - 1)
        own_at = jnp.minimum(c["held"], self.reserve - 1)
        return dict(c, cache=cache.replace(pages=cache.pages.at[rows, at].set(
                        jnp.where(grows, page, cache.pages[rows, at]))),
                    own=c["own"].at[rows, own_at].set(jnp.where(grows, page, c["own"][rows, own_at])),
                    held=c["held"] + grows.astype(jnp.int32),
                    free_pages=c["free_pages"].at[jnp.where(grows, page, cache.scratch + 1)].set(False, mode="drop"))

    def release(self, c: dict, ended: Array) -> dict:
        """Slots whose sample ended give their pages back and point at the scratch page."""
        return self._free(c, ended)

    @staticmethod
    def _take(free_pages: Array, taking: Array, rank: Array, scratch: int) -> Array:
        """The free page each taking slot gets (the rank-th lowest free page; scratch for the others)."""
        ids = jnp.nonzero(free_pages, size=taking.shape[0], fill_value=scratch)[0].astype(jnp.int32)
        return jnp.where(taking, ids[jnp.clip(rank, 0, taking.shape[0] - 1)], scratch)

    @staticmethod
    def _free(c: dict, rows: Array) -> dict:
        """The slots `rows` with their own pages freed and their tables on the scratch page."""
        cache = c["cache"]
        back = jnp.where(rows[:, None] & (c["own"] != cache.scratch), c["own"], cache.scratch + 1)  # never scratch
        return dict(c, free_pages=c["free_pages"].at[back].set(True, mode="drop"),
                    own=jnp.where(rows[:, None], cache.scratch, c["own"]), held=jnp.where(rows, 0, c["held"]),
                    cache=cache.replace(pages=jnp.where(rows[:, None], cache.scratch, cache.pages)))


def _pages_from_slot_zero(kv: Array, lengths: Array, page_size: int) -> Array:
    """The prompts' left-padded keys or values [L, rows, P, KVH, Dh] (lengths [rows]) moved to start at slot 0
    (token i at slot i) and cut into pages: [L, KVH, rows x pages_for(P), page_size, Dh], prompt r's pages together."""
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
