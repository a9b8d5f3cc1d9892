"""Closed-vocabulary word tokenizers and codecs for tiny models trained from scratch.

The arithmetic character tokenizer has digits and operators only, so a tiny model of the instruction
tasks or of a text environment gets a small vocabulary of words and punctuation marks (ids after the
specials pad=0, bos=1, eos=2, unk=3). A word outside the vocabulary encodes as <unk> (decoded as
"<unk>", so a checker sees it; environment feedback can quote arbitrary text, so encoding never raises).
Two styles, fixed per model (a model must keep the one it was trained with):

    cased  (instruction tasks)   words of letters and digits with inner apostrophes / hyphens, and single
                                 punctuation marks; decoding attaches closing punctuation to the word before
    lower  (text environments)   the lower-cased text's runs of letters, runs of digits and single
                                 punctuation marks; decoding joins tokens with single spaces

The vocabulary is saved beside exported weights (`pf_jax_word_tokenizer.json` for the cased style,
`pf_jax_maze_tokenizer.json` for the lower one) and read back by `pf_jax.data.codec.load_codec`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from pf_jax.data.codec import SpecialTokenCodec

WORD_TOKENIZER_FILE = "pf_jax_word_tokenizer.json"
MAZE_TOKENIZER_FILE = "pf_jax_maze_tokenizer.json"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_CLOSING = set(".,!?:;)]}>\"")
_OPENING = set("([{<")


@dataclasses.dataclass(frozen=True)
class WordStyle:
    """How a word tokenizer splits and joins text, and the file (and its "type") it is saved as."""

    name: str
    file: str
    pattern: re.Pattern[str]
    lowercase: bool
    attach_punctuation: bool

    def split(self, text: str) -> list[str]:
        """Words and single punctuation marks of `text`, in order (whitespace dropped)."""
        return self.pattern.findall(text.lower() if self.lowercase else text)


CASED = WordStyle("words", WORD_TOKENIZER_FILE, re.compile(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]"),
                  lowercase=False, attach_punctuation=True)
LOWER = WordStyle("maze-word", MAZE_TOKENIZER_FILE, re.compile(r"[a-z]+|\d+|[^\sa-z\d]"),
                  lowercase=True, attach_punctuation=False)
STYLES = {style.name: style for style in (CASED, LOWER)}


def split_words(text: str) -> list[str]:
    """The cased style's words and single punctuation marks of `text`, in order."""
    return CASED.split(text)


class WordTokenizer:
    """Closed-vocabulary word tokenizer: specials <pad>=0, <bos>=1, <eos>=2, <unk>=3, then `words`."""

    SPECIALS = SPECIALS

    def __init__(self, words: Sequence[str], style: WordStyle = CASED) -> None:
        words = list(words)
        if len(set(words)) != len(words):
            raise ValueError("word tokenizer vocabulary has repeated words")
        clash = [w for w in words if w in SPECIALS]
        if clash:
            raise ValueError(f"word tokenizer vocabulary words {clash} collide with the special tokens {SPECIALS}")
        bad = [w for w in words if style.split(w) != [w]]
        if bad:
            raise ValueError(f"word tokenizer vocabulary entries must be single words or marks of the "
                             f"{style.name!r} style; got {bad[:5]}")
        self.words, self.style = words, style
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self._id_of = {w: i + len(SPECIALS) for i, w in enumerate(words)}
        self._token_of = [*SPECIALS, *words]

    @classmethod
    def from_texts(cls, texts: Iterable[str], style: WordStyle = CASED) -> WordTokenizer:
        """The sorted set of words and marks of `texts` as the vocabulary."""
        return cls(sorted({w for t in texts for w in style.split(t)}), style)

    @property
    def vocab_size(self) -> int:
        return len(self._token_of)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self._id_of.get(w, self.unk_id) for w in self.style.split(text)]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        """The text of `ids`: pad / bos skipped, <unk> kept, up to the first EOS when stop_at_eos. An id
        outside the vocabulary is a ValueError (no sampler of this model can emit it)."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the word vocabulary of size {self.vocab_size}")
            if i in (self.pad_id, self.bos_id, self.eos_id):
                continue
            token = self._token_of[i]
            if self.style.attach_punctuation and out and (token in _CLOSING or out[-1] in _OPENING):
                out[-1] += token
            else:
                out.append(token)
        return " ".join(out)


class WordCodec(SpecialTokenCodec):
    """TextCodec over a WordTokenizer: prompt = BOS + words, response = words + EOS."""

    def __init__(self, tokenizer: WordTokenizer) -> None:
        super().__init__(tokenizer)
        self.words, self.eos_id, self.unk_id = tokenizer.words, tokenizer.eos_id, tokenizer.unk_id

    def encode(self, text: str) -> list[int]:
        """The words of `text` without BOS / EOS."""
        return self.tokenizer.encode(text)

    def save(self, directory: str | Path) -> None:
        style = self.tokenizer.style
        (Path(directory) / style.file).write_text(json.dumps({"type": style.name, "words": self.words}))


def load_word_codec(path: str | Path) -> WordCodec:
    """The WordCodec saved at `path` (a WORD_TOKENIZER_FILE or MAZE_TOKENIZER_FILE); a malformed file
    names what it expected."""
    spec = json.loads(Path(path).read_text())
    if not isinstance(spec, dict) or spec.get("type") not in STYLES or not isinstance(spec.get("words"), list):
        raise ValueError(f"{path}: expected {{'type': one of {sorted(STYLES)}, 'words': [...]}}")
    return WordCodec(WordTokenizer(spec["words"], STYLES[spec["type"]]))
