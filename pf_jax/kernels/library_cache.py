"""Compiled kernel libraries: built once into a per-user cache, and loaded only when the cache is trusted.

A shared library runs code the moment it is loaded (its constructors), so one from a cache that someone
else can write must never be loaded. The cache is `<pf_jax cache>/kernels-<uid>`
($PF_JAX_CACHE, default `~/.cache/pf_jax`: pf_jax.config.cache), created with mode 0700. A library is loaded only if that directory and
the library file are owned by this user and writable by no one else, the directory's parent does not
let others replace it (not writable by others, or sticky like /tmp), and the file's sha256 equals the
digest recorded beside it (`<library>.sha256`) when it was built. A library without a matching digest is
rebuilt over; an untrusted directory or library is refused (UntrustedCacheError), and the caller falls
back to XLA. Since no one else can write the directory or swap it, the file verified is the file loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import jax

from pf_jax.config.cache import cache_root

_PHASE = logging.getLogger("pf_jax.phase")  # what a CLI shows while it starts (pf_jax.phases)


class KernelBuildError(RuntimeError):
    """The C++ compiler failed on the kernel source (the message holds its output)."""


class UntrustedCacheError(RuntimeError):
    """The kernel cache directory or library is owned by another user or writable by others."""


def cache_dir() -> Path:
    return cache_root() / f"kernels-{os.geteuid()}"


def _untrusted(info: os.stat_result) -> str | None:
    """Why a file or directory with this stat may not be trusted, or None."""
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def trusted_directory() -> Path:
    """The cache directory, created 0700 if missing; UntrustedCacheError if it is not this user's alone."""
    directory = cache_dir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # an existing one is checked below
        directory.mkdir(mode=0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise UntrustedCacheError(f"kernel cache {directory} is not a directory")
    if reason := _untrusted(info):
        raise UntrustedCacheError(f"kernel cache {directory} is {reason}")
    parent = os.stat(directory.parent).st_mode
    if parent & (stat.S_IWGRP | stat.S_IWOTH) and not parent & stat.S_ISVTX:
        raise UntrustedCacheError(f"kernel cache {directory} lies in {directory.parent}, where others may replace it "
                                  f"(mode {stat.S_IMODE(parent):o}, not sticky)")
    return directory


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (set CXX or install g++)")
    return compiler


def library_path(source: Path) -> Path:
    """Where the library of `source` is cached (named by the source, jaxlib and compiler)."""
    compiler = _compiler()
    key = hashlib.sha256(b"\0".join([source.read_bytes(), jax.__version__.encode(), compiler.encode()]))
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def build(source: Path) -> Path:
    """Compile `source` into the trusted cache (replacing whatever is at its name) and record its digest.
    Raises KernelBuildError with the compiler's output when compilation fails."""
    directory, target = trusted_directory(), library_path(source)
    _PHASE.info("building the CPU kernel %s (first use; cached in %s)", source.stem, directory)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # compile aside, then rename: atomic
        out = Path(tmp) / target.name
        cmd = [_compiler(), "-O3", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}", str(source),
               "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        os.chmod(out, 0o700)
        digest = Path(tmp) / "digest"
        digest.write_text(hashlib.sha256(out.read_bytes()).hexdigest() + "\n")
        os.replace(out, target)
        os.replace(digest, _digest_path(target))
    return target


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _recorded_digest(library: Path) -> str | None:
    try:
        fd = os.open(_digest_path(library), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as handle:
        if _untrusted(os.fstat(handle.fileno())):
            return None
        return handle.read().strip() or None


def _verified(library: Path) -> bool:
    """Whether `library` is this user's, writable by no one else and matches its recorded digest (False when
    missing or different: it is then rebuilt); UntrustedCacheError when someone else owns or may write it."""
    try:
        fd = os.open(library, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (reason := _untrusted(info)):
            raise UntrustedCacheError(f"kernel library {library} is {reason or 'not a regular file'}")
        digest = hashlib.sha256()
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest() == _recorded_digest(library)


def load_library(source: Path) -> ctypes.CDLL:
    """The library built from `source`, from the trusted cache (built, or rebuilt, when it has no matching
    digest). Raises UntrustedCacheError, KernelBuildError, or OSError when it cannot be loaded."""
    trusted_directory()
    library = library_path(source)
    if not _verified(library):
        build(source)
        if not _verified(library):
            raise UntrustedCacheError(f"kernel library {library} does not match the digest recorded at its build")
    return ctypes.CDLL(str(library))
