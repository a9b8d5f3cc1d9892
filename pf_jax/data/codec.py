"""Text <-> token ids for prompts and responses, the same way for every model the trainer runs.

A prompt is encoded with the tokenizer's own conventions (BOS; the chat template when asked and the
tokenizer has one); a response is encoded without special tokens and ends with EOS (or, when prompts are
chat turns, the template's end-of-turn token), which is what the sampler emits and what likelihood losses
must score. A conversation (a list of messages) is rendered with the chat template (data/chat_render.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pf_jax.data.chat_render import ChatRenderer, ChatTemplateError, named_chat_template

CHAR_TOKENIZER_FILE = "pf_jax_char_tokenizer.json"


class CharTokenizer:
    """Character-level tokenizer: one id per symbol after the special tokens pad=0, bos=1, eos=2."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    ALPHABET = "0123456789+-*=() \n"

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"tokenizer alphabet has repeated symbols: {alphabet!r}")
        self.alphabet = alphabet
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._id_of = {ch: i + len(self.SPECIALS) for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.alphabet)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of `text`'s characters, optionally wrapped in bos/eos. Unknown characters raise ValueError."""
        ids = []
        for position, ch in enumerate(text):
            if ch not in self._id_of:
                raise ValueError(
                    f"character {ch!r} at position {position} of {text!r} is not in the tokenizer alphabet "
                    f"{self.alphabet!r}"
                )
            ids.append(self._id_of[ch])
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Text of `ids`, pad/bos dropped; stops at the first eos unless `stop_at_eos=False`."""
        chars = []
        for token in ids:
            token = int(token)
            if token == self.eos_id and stop_at_eos:
                break
            if token < len(self.SPECIALS):
                continue
            if token >= self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary of size {self.vocab_size}")
            chars.append(self.alphabet[token - len(self.SPECIALS)])
        return "".join(chars)

    def pad_batch(
        self, sequences: Sequence[Sequence[int]], length: int, side: str = "right"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pad id lists to `[B, length]` int32 ids and a bool mask (True on real tokens).

        `side="left"` right-aligns the sequences (prompts for generation). A sequence longer than
        `length` raises ValueError.
        """
        if side not in ("left", "right"):
            raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
        ids = np.full((len(sequences), length), self.pad_id, np.int32)
        mask = np.zeros((len(sequences), length), bool)
        for row, seq in enumerate(sequences):
            if len(seq) > length:
                raise ValueError(f"sequence {row} has {len(seq)} tokens, more than the padded length {length}")
            start = length - len(seq) if side == "left" else 0
            ids[row, start : start + len(seq)] = seq
            mask[row, start : start + len(seq)] = True
        return ids, mask


class TextCodec(Protocol):
    vocab_size: int
    pad_id: int
    eos_ids: tuple[int, ...]

    def encode_prompt(self, text: str | list[dict[str, str]]) -> list[int]: ...
    def encode_response(self, text: str) -> list[int]: ...
    def encode_conversation(self, prompt: list[dict[str, str]], completion: list[dict[str, str]], *,
                            assistant_only: bool = True) -> tuple[list[int], list[int], list[bool]]: ...
    def decode_response(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str | Path) -> None: ...


def no_template(codec_name: str) -> ChatTemplateError:
    return ChatTemplateError(f"conversational rows need a chat template, and the {codec_name} tokenizer has none",
                             hint="use a model whose tokenizer has one, or text rows (prompt / answer fields)")


class SpecialTokenCodec:
    """A TextCodec over a tokenizer with pad/bos/eos ids and `encode(text, add_bos, add_eos)` /
    `decode(ids, stop_at_eos)` (the char and word tokenizers): prompt = BOS + tokens, response = tokens +
    EOS. Subclasses only say how the tokenizer is saved."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.pad_id = tokenizer.pad_id
        self.bos_id = tokenizer.bos_id
        self.eos_ids = (tokenizer.eos_id,)

    def encode_prompt(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise no_template(type(self.tokenizer).__name__)
        return self.tokenizer.encode(text, add_bos=True)

    def encode_response(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_eos=True)

    def encode_conversation(self, prompt: list[dict[str, str]], completion: list[dict[str, str]], *,
                            assistant_only: bool = True) -> tuple[list[int], list[int], list[bool]]:
        raise no_template(type(self.tokenizer).__name__)

    def decode_response(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, stop_at_eos=True)


class CharCodec(SpecialTokenCodec):
    """The synthetic tasks' character tokenizer: prompt = BOS + chars, response = chars + EOS."""

    def __init__(self, tokenizer: CharTokenizer | None = None) -> None:
        super().__init__(tokenizer or CharTokenizer())

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CHAR_TOKENIZER_FILE
        path.write_text(json.dumps({"type": "char", "alphabet": self.tokenizer.alphabet}))


class HFCodec:
    """A transformers tokenizer. chat_template: False encodes text prompts as they are; True wraps a text
    prompt as one user turn of the tokenizer's chat template; a template name or `.jinja` path
    (pf_jax.data.chat_render.named_chat_template) sets that template first, then does the same.
    Conversations (lists of messages) are always rendered with the template. When the template closes
    assistant turns with a token of its own, that token ends a response (and stops the sampler) too."""

    def __init__(self, tokenizer: Any, *, chat_template: bool | str = False, eos_ids: Sequence[int] = (),
                 name: str = "the tokenizer") -> None:
        if isinstance(chat_template, str):
            tokenizer.chat_template = named_chat_template(chat_template)
        elif chat_template and not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"model.chat_template=true but {name} has no chat template",
                                    hint="name one: model.chat_template=gemma3 | qwen2.5 | path/to/template.jinja")
        self.tokenizer, self.name = tokenizer, name
        self.chat_template = bool(chat_template)
        self.vocab_size = len(tokenizer)
        eos = tuple(int(i) for i in eos_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        if not eos:
            raise ValueError("the tokenizer names no EOS token and the model config gives none")
        self.renderer = ChatRenderer(tokenizer, name) if getattr(tokenizer, "chat_template", None) else None
        turn_end = self.renderer.turn_end_id if self.renderer is not None else None
        self.eos_ids = eos + ((turn_end,) if turn_end is not None and turn_end not in eos else ())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    def _chat(self) -> ChatRenderer:
        if self.renderer is None:
            raise ChatTemplateError(f"conversational rows need a chat template, and {self.name} has none",
                                    hint="set model.chat_template=gemma3 | qwen2.5 | path/to/template.jinja")
        return self.renderer

    def encode_prompt(self, prompt: str | list[dict[str, str]]) -> list[int]:
        if isinstance(prompt, list):
            return self._chat().prompt_ids(prompt)
        if self.chat_template:
            return self._chat().prompt_ids([{"role": "user", "content": prompt}])
        return list(self.tokenizer(prompt)["input_ids"])

    def response_end_id(self) -> int:
        """What ends a response: the template's end-of-turn token when prompts are chat turns, else EOS."""
        turn_end = self.renderer.turn_end_id if self.renderer is not None and self.chat_template else None
        return self.eos_ids[0] if turn_end is None else turn_end

    def encode_response(self, text: str) -> list[int]:
        return [*list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), self.response_end_id()]

    def encode_conversation(self, prompt: list[dict[str, str]], completion: list[dict[str, str]], *,
                            assistant_only: bool = True) -> tuple[list[int], list[int], list[bool]]:
        """(prompt ids, completion ids, trained flags) of a conversation (pf_jax.data.chat_render)."""
        return self._chat().completion(prompt, completion, assistant_only=assistant_only, eos_id=self.eos_ids[0])

    def decode_response(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))
