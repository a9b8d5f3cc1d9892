"""Sampling from text prompts through a codec: the sampler's settings from a recipe's `rollout` section,
n responses per prompt as a training-layout SequenceBatch with their exact log-probs and texts, and the
same over many prompts a chunk at a time (held-out evaluation, instruction evaluation, pseudo-labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from pf_jax.config.recipe import RolloutSection
from pf_jax.data.codec import TextCodec
from pf_jax.data.sequences import SequenceBatch
from pf_jax.models.decoder import Decoder
from pf_jax.sampling.filters import SamplingParams
from pf_jax.sampling.sampler import GenerationConfig, generate
from pf_jax.sampling.stops import cut_at_stops, stop_token_sequences


def generation_config(rollout: RolloutSection, codec: TextCodec, *, temperature: float | None = None
                      ) -> GenerationConfig:
    """The sampler's settings for a recipe's rollouts (temperature: another one, e.g. the evaluation's)."""
    t = rollout.temperature if temperature is None else temperature
    return GenerationConfig(
        max_new_tokens=rollout.max_new_tokens, min_new_tokens=rollout.min_new_tokens,
        sampling=SamplingParams(temperature=t, top_k=rollout.top_k, top_p=rollout.top_p, min_p=rollout.min_p),
        eos_token_ids=tuple(codec.eos_ids), pad_token_id=codec.pad_id, min_prompt_bucket=8,
        stop_strings=tuple(rollout.stop), batching=rollout.batching, slots=rollout.slots,
        kv_cache=rollout.kv_cache, page_size=rollout.page_size, kv_pages=rollout.kv_pages,
        stop_sequences=stop_token_sequences(rollout.stop, codec.encode_response, codec.decode_response),
    )


def sample_responses(
    model: Decoder, codec: TextCodec, prompts: Sequence[Any], n: int, key: jax.Array, gen: GenerationConfig
) -> tuple[SequenceBatch, jax.Array, list[str], np.ndarray]:
    """n samples per prompt: (sequences, exact policy log-probs [N, R], decoded texts, prompt index [N]);
    a response with one of gen.stop_strings ends at it (pf_jax.sampling.stops)."""
    ids = [codec.encode_prompt(p) for p in prompts]
    res = generate(model, ids, key, gen, n=n)
    if gen.stop_strings:
        res, texts = cut_at_stops(res, codec.decode_response, gen.stop_strings, codec.pad_id)
    else:
        texts = [codec.decode_response(t) for t in res.response_token_lists()]
    seq = SequenceBatch(res.prompt_tokens, res.prompt_mask, res.tokens, res.response_mask)
    return seq, res.policy_logprobs, texts, np.asarray(res.prompt_index)


def sample_texts(
    model: Decoder, codec: TextCodec, prompts: Sequence[str], n: int, key: jax.Array, gen: GenerationConfig,
    *, chunk: int,
) -> tuple[list[str], np.ndarray]:
    """n texts per prompt, `chunk` prompts per sampler call (the key of the call starting at prompt s is
    fold_in(key, s)): (texts [N], index of each text's prompt in `prompts` [N]), prompt by prompt."""
    texts: list[str] = []
    index: list[int] = []
    for start in range(0, len(prompts), chunk):
        _, _, t, groups = sample_responses(model, codec, prompts[start : start + chunk], n,
                                           jax.random.fold_in(key, start), gen)
        texts += t
        index += [start + int(g) for g in groups]
    return texts, np.asarray(index, np.int64)
