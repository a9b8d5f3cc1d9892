"""Text <-> token ids for prompts and responses, the same way for every model the trainer runs.

A prompt is encoded with the tokenizer's own conventions (BOS; the chat template when asked and the
tokenizer has one); a response is encoded without special tokens and ends with EOS, which is what the
sampler emits and what likelihood losses must score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pf_jax.data.arithmetic import CharTokenizer

CHAR_TOKENIZER_FILE = "pf_jax_char_tokenizer.json"


class TextCodec(Protocol):
    vocab_size: int
    pad_id: int
    eos_ids: tuple[int, ...]

    def encode_prompt(self, text: str) -> list[int]: ...
    def encode_response(self, text: str) -> list[int]: ...
    def decode_response(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str | Path) -> None: ...


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
        return self.tokenizer.encode(text, add_bos=True)

    def encode_response(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_eos=True)

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
    """A transformers tokenizer. chat_template=True wraps the prompt as one user turn of the template."""

    def __init__(self, tokenizer: Any, *, chat_template: bool = False, eos_ids: Sequence[int] = ()) -> None:
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.chat_template=true but this tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.vocab_size = len(tokenizer)
        eos = tuple(int(i) for i in eos_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        if not eos:
            raise ValueError("the tokenizer names no EOS token and the model config gives none")
        self.eos_ids = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    def encode_prompt(self, text: str) -> list[int]:
        if self.chat_template:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False))
        return list(self.tokenizer(text)["input_ids"])

    def encode_response(self, text: str) -> list[int]:
        return [*list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), self.eos_ids[0]]

    def decode_response(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


def own_tokenizer_file(directory: str | Path) -> Path | None:
    """The pf_jax word or char tokenizer file saved beside exported weights, or None (a transformers one)."""
    from pf_jax.data.word_codec import STYLES

    for name in (*(style.file for style in STYLES.values()), CHAR_TOKENIZER_FILE):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def load_codec(directory: str | Path, *, chat_template: bool = False, eos_ids: Sequence[int] = ()) -> TextCodec:
    """The codec saved beside exported weights: pf_jax's word or char tokenizer, else a transformers one."""
    directory = Path(directory)
    own = own_tokenizer_file(directory)
    if own is not None and own.name != CHAR_TOKENIZER_FILE:
        from pf_jax.data.word_codec import load_word_codec

        return load_word_codec(own)
    if own is not None:
        spec = json.loads(own.read_text())
        return CharCodec(CharTokenizer(spec["alphabet"]))
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"no tokenizer in {directory} (expected {CHAR_TOKENIZER_FILE} or a "
                                f"transformers tokenizer): {error}") from error
    return HFCodec(tokenizer, chat_template=chat_template, eos_ids=eos_ids)
