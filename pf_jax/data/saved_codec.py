"""The codec saved beside exported weights, read back: pf_jax's word or char tokenizer, else a transformers one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pf_jax.data.codec import CHAR_TOKENIZER_FILE, CharCodec, CharTokenizer, HFCodec, TextCodec
from pf_jax.data.word_codec import STYLES, load_word_codec


def load_codec(directory: str | Path, *, chat_template: bool = False, eos_ids: Sequence[int] = ()) -> TextCodec:
    """The codec saved beside exported weights: pf_jax's word or char tokenizer, else a transformers one."""
    directory = Path(directory)
    for style in STYLES.values():
        if (directory / style.file).is_file():
            return load_word_codec(directory / style.file)
    char_file = directory / CHAR_TOKENIZER_FILE
    if char_file.is_file():
        spec = json.loads(char_file.read_text())
        return CharCodec(CharTokenizer(spec["alphabet"]))
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"no tokenizer in {directory} (expected {CHAR_TOKENIZER_FILE} or a "
                                f"transformers tokenizer): {error}") from error
    return HFCodec(tokenizer, chat_template=chat_template, eos_ids=eos_ids)
