"""The codec saved beside exported weights, read back: pf_jax's word or char tokenizer, else a transformers one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pf_jax.data.codec import CHAR_TOKENIZER_FILE, CharCodec, CharTokenizer, HFCodec, TextCodec
from pf_jax.data.word_codec import STYLES, load_word_codec


def own_tokenizer_file(directory: str | Path) -> Path | None:
    """The pf_jax word or char tokenizer file saved beside exported weights, or None (a transformers one)."""
    for name in (*(style.file for style in STYLES.values()), CHAR_TOKENIZER_FILE):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def load_codec(directory: str | Path, *, chat_template: bool = False, eos_ids: Sequence[int] = ()) -> TextCodec:
    """The codec saved beside exported weights: pf_jax's word or char tokenizer, else a transformers one."""
    directory = Path(directory)
    own = own_tokenizer_file(directory)
    if own is not None and own.name != CHAR_TOKENIZER_FILE:
        return load_word_codec(own)
    if own is not None:
        return CharCodec(CharTokenizer(json.loads(own.read_text())["alphabet"]))
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"no tokenizer in {directory} (expected {CHAR_TOKENIZER_FILE} or a "
                                f"transformers tokenizer): {error}") from error
    return HFCodec(tokenizer, chat_template=chat_template, eos_ids=eos_ids)
