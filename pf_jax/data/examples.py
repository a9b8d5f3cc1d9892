"""One training example's token ids from a row's prompt and response, text or conversation, and a batch of
them in the training layout.

    text prompt + text response        the codec's prompt encoding, the response + its end token
    messages + messages (or text)      the chat template's rendering (pf_jax.data.chat_render): the
                                       prompt's tokens, the completion's, and which of those are trained
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pf_jax.data.codec import TextCodec
from pf_jax.data.sequences import SequenceBatch, bucket_length, pack_sequences


@dataclass(frozen=True)
class Example:
    """prompt / response token ids; trained: per response token, whether a likelihood loss trains on it
    (None: all of them)."""

    prompt: list[int]
    response: list[int]
    trained: list[bool] | None = None

    @property
    def targets(self) -> list[bool]:
        return [True] * len(self.response) if self.trained is None else self.trained


def encode_example(codec: TextCodec, prompt: Any, response: Any, *, assistant_only: bool = True) -> Example:
    """The example of a prompt (text or messages) and a response (text or messages)."""
    if isinstance(prompt, str) and isinstance(response, str):
        return Example(codec.encode_prompt(prompt), codec.encode_response(response))
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    p, r, trained = codec.encode_conversation(prompt_msgs, completion, assistant_only=assistant_only)
    return Example(p, r, trained)


def sft_example(codec: TextCodec, row: Mapping[str, Any], field: str, *, assistant_only: bool = True) -> Example:
    """A dataset row's example: its conversation's turns after the prompt when it has one (SFT on
    messages), else its prompt and `field` ("answer" for SFT, "completion" for KTO)."""
    if "messages" in row:
        return encode_example(codec, row["prompt"], row["messages"][len(row["prompt"]):], assistant_only=assistant_only)
    return encode_example(codec, row["prompt"], row[field], assistant_only=assistant_only)


def layout(examples: Sequence[Example], pad_id: int, *, prompt_len: int | None = None,
           response_len: int | None = None) -> SequenceBatch:
    """The examples as one SequenceBatch (lengths: power-of-two buckets of the longest), with a target
    mask when any example trains on part of its response only."""
    P = prompt_len or bucket_length(max(len(e.prompt) for e in examples))
    R = response_len or bucket_length(max(len(e.response) for e in examples))
    partial = any(e.trained is not None for e in examples)
    return pack_sequences([e.prompt for e in examples], [e.response for e in examples], pad_id=pad_id,
                          prompt_len=P, response_len=R, targets=[e.targets for e in examples] if partial else None)
