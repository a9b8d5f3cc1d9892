"""The tokenizer a GGUF file describes, converted once by transformers and cached on disk.

transformers rebuilds a fast tokenizer from the GGUF's `tokenizer.ggml.*` metadata (and its
`tokenizer.chat_template`, where present); for Gemma's 262k-token vocabulary that takes ~20 s. The result
is saved with `save_pretrained` under `<cache>/tokenizers/<sha256 of the GGUF>/` and loaded from there
afterwards (a few seconds). The cache key is the file's content hash, so a changed file is never served a
stale tokenizer.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pf_jax.models.embedded import file_sha256, pf_jax_cache_dir
from pf_jax.models.errors import WeightsFileError

_PHASE = logging.getLogger("pf_jax.phase")  # what a CLI shows while it starts (pf_jax.phases)


def tokenizer_cache_path(sha256: str, cache_dir: Path | None = None) -> Path:
    """Where the converted tokenizer of the GGUF with this content hash is cached."""
    return (cache_dir or pf_jax_cache_dir()) / "tokenizers" / sha256


def load_gguf_tokenizer(gguf_path: str | os.PathLike, *, sha256: str | None = None,
                        cache_dir: Path | None = None) -> Any:
    """transformers tokenizer for a GGUF file: the cached conversion if present, else convert and cache.

    sha256: the file's known hash (skips hashing it); it must be the true hash of the file's bytes.
    """
    from transformers import AutoTokenizer

    path = Path(gguf_path)
    if not path.is_file():
        raise WeightsFileError(f"GGUF file {str(path)!r} does not exist")
    cached = tokenizer_cache_path(sha256 or file_sha256(path), cache_dir)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    _PHASE.info("building the tokenizer of %s (first use; cached in %s)", path.name, cached.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:
        raise WeightsFileError(f"GGUF file {str(path)!r}: transformers could not build its tokenizer "
                         f"({type(err).__name__}: {err})") from err
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=cached.name + ".", suffix=".part"))
    try:
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, cached)  # atomic; fails if another process cached it first, which is fine
        except OSError:
            if not (cached / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
