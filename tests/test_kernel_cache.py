"""The compiled-kernel cache is trusted only when it should be: a planted library never runs.

The planted library's constructor writes a marker file the moment it is loaded; every test that plants one
asserts the marker is absent afterwards. Libraries are compiled for real with the system compiler.
"""

import hashlib
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pf_jax.kernels import library_cache, skinny_matmul
from pf_jax.kernels.library_cache import UntrustedCacheError, build, cache_dir, library_path, load_library

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")

PLANTED = r"""
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void planted() {
  if (const char* path = std::getenv("PF_JAX_PLANTED_MARKER")) {
    if (FILE* f = std::fopen(path, "w")) { std::fputs("the planted library ran", f); std::fclose(f); }
  }
}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    root.mkdir(mode=0o755)
    monkeypatch.setenv("PF_JAX_CACHE", str(root))
    monkeypatch.setenv("PF_JAX_PLANTED_MARKER", str(tmp_path / "marker"))
    return root


def source(tmp_path: Path, answer: int) -> Path:
    """A kernel source of our own (its answer makes its cached name differ from every other test's)."""
    path = tmp_path / f"answer_{answer}.cc"
    path.write_text(f'extern "C" int pf_answer() {{ return {answer}; }}\n')
    return path


def plant(at: Path, tmp_path: Path) -> None:
    """Compile the planted library to `at` (what someone who can write the cache would leave there)."""
    src = tmp_path / "planted.cc"
    src.write_text(PLANTED)
    at.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["c++", "-shared", "-fPIC", str(src), "-o", str(at)], check=True, capture_output=True)


def marker_absent(tmp_path: Path) -> bool:
    return not (tmp_path / "marker").exists()


def test_the_marker_shows_a_planted_library_that_runs(cache, tmp_path):
    """The check of the tests below can fail: loading the planted library directly writes the marker."""
    import ctypes

    plant(tmp_path / "direct.so", tmp_path)
    ctypes.CDLL(str(tmp_path / "direct.so"))
    assert not marker_absent(tmp_path)


def test_cache_directory_is_per_user_and_private(cache):
    directory = library_cache.trusted_directory()
    assert directory == cache / f"kernels-{os.geteuid()}"
    info = directory.stat()
    assert info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o700


@needs_compiler
def test_build_records_a_digest_and_loads(cache, tmp_path):
    built = build(source(tmp_path, 42))
    assert built.with_name(built.name + ".sha256").read_text().strip() == hashlib.sha256(
        built.read_bytes()).hexdigest()
    assert load_library(source(tmp_path, 42)).pf_answer() == 42


@needs_compiler
@pytest.mark.parametrize("mode", [0o777, 0o770], ids=["world-writable", "group-writable"])
def test_planted_library_in_a_writable_cache_never_runs(cache, tmp_path, mode):
    ours = source(tmp_path, 7)
    target = library_path(ours)
    plant(target, tmp_path)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    target.with_name(target.name + ".sha256").write_text(digest)  # even with a digest that matches it
    os.chmod(cache_dir(), mode)
    with pytest.raises(UntrustedCacheError, match="writable by group or others"):
        load_library(ours)
    assert marker_absent(tmp_path)


@needs_compiler
def test_planted_library_that_others_may_write_never_runs(cache, tmp_path):
    ours = source(tmp_path, 8)
    library_cache.trusted_directory()
    plant(library_path(ours), tmp_path)
    os.chmod(library_path(ours), 0o666)
    with pytest.raises(UntrustedCacheError, match=r"kernel library .* writable by group or others"):
        load_library(ours)
    assert marker_absent(tmp_path)


@needs_compiler
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_cache_owned_by_another_user_is_refused(cache, tmp_path):
    ours = source(tmp_path, 9)
    plant(library_path(ours), tmp_path)
    os.chown(cache_dir(), 65534, 65534)
    with pytest.raises(UntrustedCacheError, match="owned by uid 65534"):
        load_library(ours)
    assert marker_absent(tmp_path)


@needs_compiler
def test_cache_inside_a_directory_others_can_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # not sticky: anyone could swap the cache directory for their own
    monkeypatch.setenv("PF_JAX_CACHE", str(shared))
    with pytest.raises(UntrustedCacheError, match="others may replace it"):
        load_library(source(tmp_path, 10))


@needs_compiler
@pytest.mark.parametrize("digest", [None, "0" * 64], ids=["no-digest", "wrong-digest"])
def test_library_without_its_recorded_digest_is_rebuilt_not_loaded(cache, tmp_path, digest):
    ours = source(tmp_path, 11 if digest is None else 12)
    library_cache.trusted_directory()
    plant(library_path(ours), tmp_path)  # in our own private directory: e.g. a file damaged on disk
    if digest is not None:
        library_path(ours).with_name(library_path(ours).name + ".sha256").write_text(digest)
    assert load_library(ours).pf_answer() == (11 if digest is None else 12)
    assert marker_absent(tmp_path)


@needs_compiler
def test_the_kernel_falls_back_to_xla_with_one_warning(cache, tmp_path, caplog):
    """The real kernel library's name, planted in a world-writable cache: XLA's dot is used instead."""
    target = library_path(skinny_matmul.SOURCE)
    plant(target, tmp_path)
    os.chmod(cache_dir(), 0o777)
    skinny_matmul._library.cache_clear()
    skinny_matmul.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=skinny_matmul.__name__):
            assert not skinny_matmul.available()
            assert not skinny_matmul.available()
        warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1 and "writable by group or others" in warnings[0].getMessage()
    finally:
        skinny_matmul._library.cache_clear()
        skinny_matmul.available.cache_clear()
    assert marker_absent(tmp_path)
