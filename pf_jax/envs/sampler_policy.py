"""The sampler behind the rollout loop's `Policy` protocol: one jit sampler call per turn.

Each turn's requests (one per live episode) become prompts: the chat messages under the tokenizer's chat
template when the codec uses one, else a plain rendering (the messages' contents joined by blank lines,
encoded with the codec's prompt convention; tiny char/word-level models). The live prompts are padded to
a fixed batch size by repeating the first prompt (the padding rows' samples are dropped), and the sampler
left-pads them to a power-of-two length bucket, so a whole run compiles once per bucket, not per turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from pf_jax.config.errors import UserError
from pf_jax.data.codec import HFCodec, TextCodec
from pf_jax.envs.rollout import PolicyResponse, TurnRequest
from pf_jax.models.decoder import Decoder
from pf_jax.sampling.sampler import GenerationConfig, generate


def render_plain(messages: Sequence[Mapping[str, str]]) -> str:
    """The messages' contents joined by blank lines (the prompt of a model without a chat template)."""
    return "\n\n".join(m["content"] for m in messages)


def encode_messages(codec: TextCodec, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt token ids of a turn: the chat template (with the generation prompt) when the codec is a
    transformers tokenizer used with its template, else codec.encode_prompt(render_plain(messages))."""
    if isinstance(codec, HFCodec) and codec.chat_template:
        return list(codec.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False))
    return list(codec.encode_prompt(render_plain(messages)))


class PromptTooLongError(UserError):
    """A turn's prompt has more tokens than the run allows (`data.max_prompt_tokens`)."""


class SamplerPolicy:
    """`Policy` for `run_rollouts`: a Decoder sampled with `generate`, `batch_size` rows per call.

    Every call uses a fresh key, fold_in(key, call number), so a run is reproducible. Requests beyond
    batch_size are answered in several calls of the same shape. A turn prompt longer than
    `max_prompt_tokens` raises PromptTooLongError rather than being cut: cutting would drop the task or the
    current observation, and an unbounded prompt would outgrow the memory the run was planned for.
    """

    def __init__(self, model: Decoder, codec: TextCodec, config: GenerationConfig, *, batch_size: int,
                 key: jax.Array, max_prompt_tokens: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"SamplerPolicy: batch_size must be >= 1, got {batch_size}")
        self.model, self.codec, self.config = model, codec, config
        self.batch_size, self.key, self.calls = batch_size, key, 0
        self.max_prompt_tokens = max_prompt_tokens

    def __call__(self, requests: Sequence[TurnRequest]) -> list[PolicyResponse]:
        prompts = [encode_messages(self.codec, r.messages) for r in requests]
        limit = self.max_prompt_tokens
        if limit is not None:
            for request, prompt in zip(requests, prompts):
                if len(prompt) > limit:
                    raise PromptTooLongError(
                        f"turn {request.turn} of episode {request.episode_index}: the prompt has {len(prompt)} "
                        f"tokens, more than data.max_prompt_tokens={limit}; raise data.max_prompt_tokens or show "
                        f"fewer earlier turns (env.history_window)")
        out: list[PolicyResponse] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            padded = chunk + [chunk[0]] * (self.batch_size - len(chunk))
            result = generate(self.model, padded, jax.random.fold_in(self.key, self.calls), self.config)
            self.calls += 1
            tokens, logprobs = np.asarray(result.tokens), np.asarray(result.policy_logprobs)
            lengths = np.asarray(result.lengths)
            for i, prompt in enumerate(chunk):
                n = int(lengths[i])
                out.append(PolicyResponse(
                    text=self.codec.decode_response(tokens[i, :n].tolist()),
                    tokens=tokens[i, :n].astype(np.int32),
                    logprobs=logprobs[i, :n].astype(np.float32),
                    prompt_tokens=np.asarray(prompt, np.int32),
                ))
        return out
