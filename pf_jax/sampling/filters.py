"""Sampling distributions over next-token logits: temperature, top-k, top-p (nucleus), min-p, and an
inverse-CDF sampler that draws one uniform per row instead of one Gumbel variate per vocabulary entry."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a next token is drawn from the logits z (a static, hashable part of the compiled program).

    temperature: 0 = greedy (argmax); otherwise z / temperature.
    top_k: keep tokens whose logit is >= the k-th largest (0 = off; ties with the k-th are kept).
    top_p: keep the tokens with p >= p*, p* the largest probability such that the tokens with p >= p*
        carry mass >= top_p: the smallest nucleus (1.0 = off; ties with p* are kept).
    min_p: keep tokens with p >= min_p * max p (0.0 = off).
    Filters apply in that order (as transformers' logits warpers do), each to the renormalised result of
    the previous one.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"sampling temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"sampling top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"sampling min_p must be in [0, 1] (0 = off), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """True when some filter can remove tokens (top-k, top-p or min-p is on)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def _top_p_keep(logp: Array, top_p: float) -> Array:
    """Tokens kept by nucleus filtering: p_i >= p*, the largest p* with sum_{p_j >= p*} p_j >= top_p.

    logp [B, V] -> bool [B, V]. p* is found by bisection over the bit patterns of the non-negative float32
    probabilities (an int order equal to the value order), so it is one of the row's own probabilities,
    exactly, after 31 masked sums instead of a sort of the vocabulary.
    """
    probs = jnp.exp(logp)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

    def bisect(_, bounds):
        lo, hi = bounds  # invariant: the mass of {bits >= lo} is >= top_p, that of {bits >= hi} is not
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros((logp.shape[0], 1), jnp.int32)
    hi = jnp.max(bits, axis=-1, keepdims=True) + 1
    lo, _ = jax.lax.fori_loop(0, 31, bisect, (lo, hi))
    return bits >= lo


RowWise = Callable[[Callable[[Array], Array]], Callable[[Array], Array]]


def filtered_logits(logits: Array, params: SamplingParams, *, rowwise: RowWise | None = None) -> Array:
    """Logits of the sampling distribution: z' = z / T on the kept tokens, -inf elsewhere.

    logits: [B, V] float32 -> [B, V] float32; softmax(z') is the distribution actually sampled from.
    top-k: keep z_i >= z_(k) (Fan et al. 2018, "Hierarchical Neural Story Generation").
    top-p: keep p_i >= p* where p* is the largest probability with sum_{p_j >= p*} p_j >= top_p
        (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").
    min-p: keep p_i >= min_p * max_j p_j (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling").
    Greedy (temperature 0) keeps only the argmax (first index among ties), with the argmax's logit 0.
    rowwise: wraps the row-wise top-k (e.g. pf_jax.sampling.layout.RowLayout.rowwise: one call per row
    shard, since XLA's partitioner would gather a batch-split operand of lax.top_k); None = direct.
    """
    z = logits.astype(jnp.float32)
    neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
    if params.greedy:
        best = jnp.argmax(z, axis=-1)
        return jnp.where(jnp.arange(z.shape[-1])[None, :] == best[:, None], 0.0, neg_inf)
    z = z / params.temperature
    if params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = (rowwise or (lambda f: f))(lambda x: jax.lax.top_k(x, params.top_k)[0][:, -1:])(z)
        z = jnp.where(z >= kth, z, neg_inf)
    if params.top_p < 1.0:
        z = jnp.where(_top_p_keep(jax.nn.log_softmax(z, axis=-1), params.top_p), z, neg_inf)
    if params.min_p > 0.0:
        z = jnp.where(z >= jnp.max(z, axis=-1, keepdims=True) + math.log(params.min_p), z, neg_inf)
    return z


def sample_categorical(key: Array, logits: Array) -> Array:
    """One draw per row from softmax(logits), by inversion of the CDF with a single uniform u ~ U[0, 1).
    logits: [B, V] float32 with at least one finite entry per row -> tokens int32 [B]. See draw_from_logits."""
    return draw_from_logits(key, logits)[0]


def draw_from_logits(key: Array, logits: Array, excluded_tokens: Array | None = None) -> tuple[Array, Array]:
    """Draw y ~ softmax(z) over the tokens not excluded, and return (y int32 [B], log sum_{kept} exp z [B]).

    Inversion of the CDF with one uniform u per row: y = min{i : sum_{j <= i} w_j > u * sum_j w_j},
    w = exp(z - max z) on kept tokens (0 for excluded ones and z = -inf). The CDF is built in two levels:
    blocks of ~sqrt(V) tokens, then the chosen block. The [B, V] logits are read twice (the maximum, then
    the exponentials summed per block, in one fused pass) and nothing of size V is written, so the draw
    costs two memory passes over the logits plus B uniforms (a Gumbel-max draw needs B * V variates).
    excluded_tokens: optional int32 [B, K] ids to leave out (ids outside [0, V) are ignored); each row
    must keep a token with a finite logit.
    """
    b, v = logits.shape
    block = 1 << max(0, math.ceil(math.log2(math.sqrt(v))))
    num_blocks = -(-v // block)
    z = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, num_blocks * block - v)), constant_values=-jnp.inf)
    z = z.reshape(b, num_blocks, block)
    if excluded_tokens is not None:  # elementwise, so it fuses into both passes below
        ids = jnp.arange(num_blocks * block, dtype=jnp.int32).reshape(num_blocks, block)
        for k in range(excluded_tokens.shape[1]):
            z = jnp.where(ids == excluded_tokens[:, k, None, None], -jnp.inf, z)
    z_max = jnp.max(z, axis=(1, 2))  # [B]
    block_mass = jnp.sum(jnp.exp(z - z_max[:, None, None]), axis=-1)  # [B, NB]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    total = block_cdf[:, -1]
    target = jax.random.uniform(key, (b,)) * total
    chosen_block = _first_true_or_last_positive(block_cdf > target[:, None], block_mass)
    in_block = jnp.exp(jnp.take_along_axis(z, chosen_block[:, None, None], axis=1)[:, 0] - z_max[:, None])
    below = jnp.take_along_axis(block_cdf - block_mass, chosen_block[:, None], axis=1)  # exclusive cdf
    inner_cdf = jnp.cumsum(in_block, axis=-1)
    chosen = _first_true_or_last_positive((inner_cdf > target[:, None] - below) & (in_block > 0), in_block)
    return (chosen_block * block + chosen).astype(jnp.int32), z_max + jnp.log(total)


def _first_true_or_last_positive(hit: Array, weight: Array) -> Array:
    """First index where hit [B, N] holds; if rounding left none, the last index with weight > 0."""
    n = hit.shape[-1]
    idx = jnp.arange(n)
    last_positive = jnp.max(jnp.where(weight > 0, idx, 0), axis=-1)
    first_hit = jnp.min(jnp.where(hit & (weight > 0), idx, n), axis=-1)
    return jnp.where(first_hit < n, first_hit, last_positive)


def sample_next_token(key: Array, logits: Array, params: SamplingParams, excluded_tokens: Array | None = None,
                      *, rowwise: RowWise | None = None) -> tuple[Array, Array, Array]:
    """Draw y ~ softmax(filtered_logits(z)) and score it.

    logits: [B, V]; excluded_tokens: optional int32 [B, K] distinct token ids whose sampling logit is set
    to -inf before filtering (ids outside [0, V) are ignored), e.g. EOS before min_new_tokens.
    Returns (token int32 [B], log pi(y) under the unmodified policy softmax(z) [B], log q(y) under the
    sampling distribution actually used [B]; 0 for greedy). rowwise: see filtered_logits.
    """
    z = logits.astype(jnp.float32)
    rows = jnp.arange(z.shape[0])[:, None]
    z_y = lambda token: jnp.take_along_axis(z, token[:, None], axis=-1)[:, 0]
    if not params.greedy and not params.truncates and params.temperature == 1.0:  # the policy itself
        token, log_norm = draw_from_logits(key, z, excluded_tokens)
        if excluded_tokens is None:
            return token, z_y(token) - log_norm, z_y(token) - log_norm
        # The policy's normaliser adds the excluded tokens' mass back: a gather of K logits, not a pass.
        in_range = (excluded_tokens >= 0) & (excluded_tokens < z.shape[-1])
        z_excluded = jnp.where(in_range, jnp.take_along_axis(z, jnp.clip(excluded_tokens, 0, z.shape[-1] - 1), -1),
                               -jnp.inf)
        policy_norm = jnp.logaddexp(log_norm, jax.nn.logsumexp(z_excluded, axis=-1))
        return token, z_y(token) - policy_norm, z_y(token) - log_norm
    policy_norm = jax.nn.logsumexp(z, axis=-1)
    zs = z if excluded_tokens is None else z.at[rows, excluded_tokens].set(-jnp.inf, mode="drop")
    if params.greedy:
        token = jnp.argmax(zs, axis=-1).astype(jnp.int32)
        sample_logp = jnp.zeros(z.shape[:1], jnp.float32)
    else:
        zq = filtered_logits(zs, params, rowwise=rowwise)
        token, sample_norm = draw_from_logits(key, zq)
        sample_logp = jnp.take_along_axis(zq, token[:, None], axis=-1)[:, 0] - sample_norm
    return token, z_y(token) - policy_norm, sample_logp
