"""SHA256SUMS beside exported weights: written with the files, checked before they are loaded.

The file has `sha256sum`'s format (`<hex>  <name>` per line), so `sha256sum -c SHA256SUMS` in the
directory checks it too. A directory without one (any third-party HF model) is loaded unchecked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pf_jax.models.embedded import file_sha256
from pf_jax.models.errors import WeightsFileError

DIGESTS_FILE = "SHA256SUMS"


def write_weight_digests(directory: Path, files: Sequence[Path]) -> Path:
    """Record the sha256 of each of `files` (inside `directory`) in `directory/SHA256SUMS`, atomically."""
    lines = "".join(f"{file_sha256(path)}  {path.name}\n" for path in files)
    target = directory / DIGESTS_FILE
    partial = target.with_name(target.name + ".part")
    partial.write_text(lines)
    os.replace(partial, target)
    return target


def read_weight_digests(directory: Path) -> dict[str, str] | None:
    """{file name: sha256 hex} from `directory/SHA256SUMS`, or None when there is none."""
    path = directory / DIGESTS_FILE
    if not path.is_file():
        return None
    digests = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise WeightsFileError(f"{path} line {number} is not '<sha256 hex>  <file name>': {line[:120]!r}")
        digests[name.removeprefix("*")] = digest.lower()
    return digests


def verify_weight_digests(directory: Path, files: Sequence[Path]) -> None:
    """Raise WeightsFileError naming the first of `files` whose bytes differ from SHA256SUMS (or that it
    does not list); nothing to check when the directory has no SHA256SUMS."""
    digests = read_weight_digests(directory)
    if digests is None:
        return
    for path in files:
        expected = digests.get(path.name)
        if expected is None:
            raise WeightsFileError(f"{directory / DIGESTS_FILE} does not list {path.name}, which is loaded")
        actual = file_sha256(path)
        if actual != expected:
            raise WeightsFileError(
                f"weights file {path} does not match its digest in {DIGESTS_FILE} (sha256 {actual[:16]}..., "
                f"recorded {expected[:16]}...): it changed after it was written; re-export or re-download it")
