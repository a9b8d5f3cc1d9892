"""Where pf_jax keeps what it builds or converts once and reuses: the dequantised embedded model and its
tokenizer, the compiled CPU kernels, generated TextWorld games, NLTK data.

One variable names the root: `PF_JAX_CACHE` (default `$XDG_CACHE_HOME/pf_jax`, else `~/.cache/pf_jax`).
`PF_JAX_CACHE_DIR`, the name the model cache once read, is still honoured when `PF_JAX_CACHE` is unset,
with a warning saying to rename it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

CACHE_VARIABLE = "PF_JAX_CACHE"
OLD_CACHE_VARIABLE = "PF_JAX_CACHE_DIR"


def cache_root() -> Path:
    """The root of every pf_jax cache: $PF_JAX_CACHE, else $XDG_CACHE_HOME/pf_jax, else ~/.cache/pf_jax."""
    if value := os.environ.get(CACHE_VARIABLE):
        return Path(value).expanduser()
    if value := os.environ.get(OLD_CACHE_VARIABLE):
        warnings.warn(f"{OLD_CACHE_VARIABLE} is renamed {CACHE_VARIABLE} (one variable for every pf_jax cache); "
                      f"reading {OLD_CACHE_VARIABLE}={value} this time", FutureWarning, stacklevel=2)
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pf_jax"
