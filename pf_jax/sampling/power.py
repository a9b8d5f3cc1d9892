"""Power sampling on a real model (Karan & Du 2025, "Reasoning with Sampling: Your Language Model is
Secretly a Reasoner", arXiv 2510.14901): the KV-cache ``ProposeSuffix`` and ``power_generate``.

Target pi(y | x) ∝ p(y | x)^alpha; proposal q = the model sampled at T = 1/alpha (through the sampler's
``sample_next_token``, so top-k / top-p / min-p filters of the GenerationConfig apply to q too). The chain
logic (blocks, MH moves, acceptance) is ``power_math.power_sample``; this file supplies the model part:

    propose(key, state, start[b], end): decode the rows left to right from the prompt's KV cache;
        position t < start[b]: feed the chain's own token (teacher forcing, its stored log p / log q kept);
        position t >= start[b]: draw y_t ~ q(. | x, y_<t) until EOS / stop id or t = end;
        returns per token log p (T = 1) and log q (the proposal), and the mask of existing tokens.

The prompt is prefilled once per call; every proposal starts from that cache and re-decodes the kept
prefix one token per step (static shapes, one compiled loop). A proposal therefore costs up to ``end``
decode steps, and a whole call about  sum_blocks (1 + mcmc_steps) * block_end  steps: for K blocks of
size B with S moves each, (1 + S) * B * K (K + 1) / 2, against K * B for plain sampling.

The one jit boundary is ``_power_generate``: static in the model graph, the padded shapes, the
GenerationConfig and the PowerSamplingConfig, so a run whose prompts share a length bucket compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from pf_jax.models.decoder import Decoder
from pf_jax.models.kv_cache import KVCache
from pf_jax.sampling.filters import SamplingParams, sample_next_token
from pf_jax.sampling.layout import RowLayout
from pf_jax.sampling.power_math import ChainState, ProposeSuffix, power_sample
from pf_jax.sampling.result import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SampleResult
from pf_jax.sampling.sampler import GenerationConfig, decode_packing, prefill, prepare_prompts


@dataclasses.dataclass(frozen=True)
class PowerSamplingConfig:
    """alpha: the power of the target p^alpha (> 0; the proposal temperature is 1/alpha).
    block_size: tokens added per block (max_new_tokens must be a multiple of it).
    mcmc_steps: Metropolis–Hastings moves after each block (0 = plain T = 1/alpha sampling)."""

    alpha: float = 4.0
    block_size: int = 16
    mcmc_steps: int = 4

    def __post_init__(self) -> None:
        if not (self.alpha > 0.0 and math.isfinite(self.alpha)):
            raise ValueError(f"power sampling alpha must be a finite number > 0, got {self.alpha}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"power sampling block_size must be an int >= 1, got {self.block_size!r}")
        if not (isinstance(self.mcmc_steps, int) and self.mcmc_steps >= 0):
            raise ValueError(f"power sampling mcmc_steps must be an int >= 0, got {self.mcmc_steps!r}")

    def proposal(self, sampling: SamplingParams) -> SamplingParams:
        """The proposal's SamplingParams: ``sampling``'s filters at temperature 1/alpha."""
        return dataclasses.replace(sampling, temperature=1.0 / self.alpha)


def kv_cache_suffix_proposer(model: Decoder, prompt_hidden: Array, prompt_cache: KVCache, prompt_lengths: Array,
                             proposal: SamplingParams, end_token_ids: Sequence[int], pad_token_id: int,
                             layout: RowLayout | None = None,
                             packed: tuple[dict[str, Array], ...] | None = None) -> ProposeSuffix:
    """The ``ProposeSuffix`` (see power_math) of a Decoder, for use inside a traced function.

    prompt_hidden: [N, D] final hidden state after each row's last prompt token; prompt_cache: the
    prompts' KV cache (batch N, index at the padded prompt length, room for the response);
    prompt_lengths: int32 [N] real prompt tokens (RoPE position of response token t = length + t).
    end_token_ids: EOS and stop ids (a response ends after emitting one, which stays in it).
    layout: how the rows are split over devices (pf_jax.sampling.layout; None = not split).
    packed: the model's projections packed for the decode steps (pf_jax.sampling.sampler.decode_packing).
    """
    ends = jnp.asarray(tuple(end_token_ids), jnp.int32)
    ops = model.ops if layout is None else layout.decode_ops(model.ops.on_mesh(layout.mesh), packed)

    def propose(key: Array, state: ChainState, start: Array, end: Array) -> ChainState:
        batch, max_len = state.tokens.shape

        def emit(t: Array, hidden: Array, carry: dict[str, Array]) -> dict[str, Array]:
            logits = model.logits(hidden[:, None], ops=ops)[:, 0]
            drawn, logp_drawn, logq_drawn = sample_next_token(jax.random.fold_in(key, t), logits, proposal,
                                                                rowwise=None if layout is None else layout.rowwise)
            column = lambda x: jax.lax.dynamic_index_in_dim(x, t, axis=1, keepdims=False)
            resample = t >= start
            exists = jnp.where(resample, carry["alive"] & (t < end), column(state.mask))
            token = jnp.where(exists, jnp.where(resample, drawn, column(state.tokens)), pad_token_id)
            logp = jnp.where(exists, jnp.where(resample, logp_drawn, column(state.logp)), 0.0)
            logq = jnp.where(exists, jnp.where(resample, logq_drawn, column(state.logq)), 0.0)
            put = lambda buf, value: buf.at[:, t].set(value)
            return dict(carry, t=t + 1, tokens=put(carry["tokens"], token), logp=put(carry["logp"], logp),
                        logq=put(carry["logq"], logq), mask=put(carry["mask"], exists),
                        alive=carry["alive"] & exists & ~jnp.isin(token, ends))

        def keep_going(carry: dict[str, Array]) -> Array:
            return (carry["t"] < jnp.minimum(end, max_len)) & jnp.any(carry["alive"])

        def step(carry: dict[str, Array]) -> dict[str, Array]:
            t = carry["t"]
            previous = jax.lax.dynamic_index_in_dim(carry["tokens"], t - 1, axis=1, keepdims=True)  # [N, 1]
            # A row that has ended keeps decoding its pad token (static shapes); emit masks it out.
            hidden, cache = model(previous, (prompt_lengths + t - 1)[:, None], None, carry["cache"], ops=ops)
            return emit(t, hidden[:, 0], dict(carry, cache=cache))

        carry = dict(t=jnp.zeros((), jnp.int32), cache=prompt_cache,
                     tokens=jnp.full((batch, max_len), pad_token_id, jnp.int32),
                     logp=jnp.zeros((batch, max_len), jnp.float32), logq=jnp.zeros((batch, max_len), jnp.float32),
                     mask=jnp.zeros((batch, max_len), bool), alive=jnp.ones((batch,), bool))
        carry = jax.lax.while_loop(keep_going, step, emit(carry["t"], prompt_hidden, carry))
        return ChainState(tokens=carry["tokens"], logp=carry["logp"], logq=carry["logq"], mask=carry["mask"])

    return propose


def power_generate(model: Decoder, prompts: Sequence[Sequence[int]], key: Array,
                   config: GenerationConfig | None = None, power: PowerSamplingConfig | None = None,
                   *, n: int = 1) -> tuple[SampleResult, Array]:
    """n power-sampled continuations of each prompt (token-id lists): approximately y ~ p(y | x)^alpha.

    config (default GenerationConfig()): max_new_tokens (a multiple of power.block_size), EOS / stop / pad ids and the proposal's
    filters (its temperature is replaced by 1/alpha); min_new_tokens is not supported (it would change
    the target). Returns (SampleResult with policy_logprobs = log p at T = 1 and sampling_logprobs =
    log q of the proposal that drew each token, acceptance rate float32 [N]).
    """
    config = GenerationConfig() if config is None else config
    power = PowerSamplingConfig() if power is None else power
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    if config.max_new_tokens % power.block_size:
        raise ValueError(f"power sampling: max_new_tokens {config.max_new_tokens} is not a multiple of "
                         f"block_size {power.block_size}")
    if config.min_new_tokens:
        raise ValueError("power sampling does not support min_new_tokens > 0 (it would change the target p^alpha)")
    config, graphdef, state, layout, tokens, mask = prepare_prompts(model, prompts, config, n)
    packed = decode_packing(model, layout, tokens.shape[0] * n)
    out, acceptance = _power_generate(graphdef, state, *layout.place_rows((tokens, mask)), key, packed,
                                      config=config, power=power, n=n, layout=layout)
    return layout.result(out, tokens, mask, num_prompts=len(prompts), n=n), acceptance[: len(prompts) * n]


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "power", "n", "layout"))
def _power_generate(graphdef: nnx.GraphDef, state: nnx.State, tokens: Array, mask: Array, key: Array,
                    packed: tuple[dict[str, Array], ...] | None = None, *, config: GenerationConfig,
                    power: PowerSamplingConfig, n: int, layout: RowLayout) -> tuple[dict[str, Array], Array]:
    """Prefill the left-padded prompts [B, P], repeat each row n times, run ``power_sample``."""
    model = nnx.merge(graphdef, state)
    hidden, cache = prefill(graphdef, state, tokens, mask, cache_len=tokens.shape[1] + config.max_new_tokens, n=n,
                             layout=layout)
    prompt_lengths = layout.constrain_rows(jnp.repeat(jnp.sum(mask, axis=-1).astype(jnp.int32), n, axis=0))
    propose = kv_cache_suffix_proposer(model, hidden, cache, prompt_lengths,
                                       power.proposal(config.sampling),
                                       config.eos_token_ids + config.stop_token_ids, config.pad_token_id, layout,
                                       packed)
    chains, acceptance = power_sample(key, propose, tokens.shape[0] * n, config.max_new_tokens,
                                      power.block_size, power.mcmc_steps, power.alpha)
    lengths = jnp.sum(chains.mask, axis=-1).astype(jnp.int32)
    last = jnp.take_along_axis(chains.tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=-1)[:, 0]
    ended = lengths > 0
    finish = jnp.where(ended & jnp.isin(last, jnp.asarray(config.eos_token_ids, jnp.int32)), FINISH_EOS,
                       jnp.where(ended & jnp.isin(last, jnp.asarray(config.stop_token_ids, jnp.int32)),
                                 FINISH_STOP, FINISH_LENGTH))
    out = dict(tokens=chains.tokens, response_mask=chains.mask, lengths=lengths, finish_reason=finish,
               policy_logprobs=chains.logp, sampling_logprobs=chains.logq)
    return out, acceptance.astype(jnp.float32)
