"""Running a test's subprocess in its own process group, so that an overrun kills it and all its children."""

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest


def run_in_process_group(command: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: int,
                         label: object) -> subprocess.CompletedProcess:
    """Run command to completion (stdout, stderr captured as text). Past `timeout` seconds the whole
    process group is killed and the test fails, naming `label` and showing the tail of stderr."""
    proc = subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{label} did not finish in {timeout}s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
