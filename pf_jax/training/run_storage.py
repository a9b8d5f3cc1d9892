"""Writing a run's files so that neither a kill nor a full disk leaves something a resume cannot read.

- `probe_writable`: a directory accepts a small write (checked before a run starts and before a save);
- `write_text`: a file written whole or not at all;
- `LineLog`: a JSON-lines file appended one whole line per `os.write` on an O_APPEND descriptor, and,
  when reopened for a resume, cut back to its last complete line (a kill mid-write leaves a torn tail)
  and to the records a caller keeps, by an atomic rewrite (a kill during the rewrite keeps the old file).
Every OS error names the path and becomes a RunStorageError.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pf_jax.config.errors import RunStorageError

logger = logging.getLogger(__name__)

STORAGE_HINT = "make the directory writable or free space, then rerun the same command to resume"


def storage_error(action: str, path: Path, error: OSError) -> RunStorageError:
    return RunStorageError(f"cannot {action} {path}: {error.strerror or error}", hint=STORAGE_HINT)


def probe_writable(directory: Path) -> None:
    """Create `directory` if needed and write, sync and remove a small file in it; RunStorageError naming the
    directory and the OS error otherwise (read-only, no permission, full file system)."""
    probe = directory / f".pf_jax_write_probe.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"pf_jax\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise storage_error("write to", directory, error) from None
    finally:
        with contextlib.suppress(OSError):  # nothing was created where nothing can be written
            probe.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it); RunStorageError on an OS error."""
    partial = path.with_name(path.name + ".part")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as error:
        raise storage_error("write", path, error) from None


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The records of the complete, parseable lines; a torn last line (no newline) and a line that is not a
    JSON object are left out, with a warning."""
    data = path.read_bytes()
    records = []
    for number, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            logger.warning("%s: dropping a torn last line (%d bytes, no newline): a write was cut short", path, len(line))
            break
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            logger.warning("%s: dropping line %d, which is not a JSON object: %r", path, number, line[:80])
            continue
        records.append(record)
    return records


class LineLog:
    """Append-only JSON lines at `path`; `LineLog(path, keep=...)` reopens it keeping the records `keep` accepts."""

    def __init__(self, path: Path, keep: Callable[[dict[str, Any]], bool] = lambda record: True) -> None:
        self.path = path
        try:
            records = read_json_lines(path) if path.exists() else []
        except OSError as error:
            raise storage_error("read", path, error) from None
        self.records = [r for r in records if keep(r)]
        write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            raise storage_error("write", path, error) from None

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` as one line with a single write (a reader never sees two records interleaved)."""
        line = (json.dumps(record) + "\n").encode()
        try:
            written = os.write(self._fd, line)
        except OSError as error:
            raise storage_error("append to", self.path, error) from None
        if written != len(line):  # a full disk can accept part of a write; the resume cuts the torn tail
            raise storage_error("append to", self.path, OSError(28, f"wrote {written} of {len(line)} bytes"))
        self.records.append(record)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
