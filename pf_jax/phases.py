"""What a CLI is doing before its first result: loading weights, dequantising a GGUF, building the CPU
kernels, reading data, compiling the train step, the first rollout.

Each layer announces its phase on the standard `logging` logger `pf_jax.phase` (INFO), so none of them
imports anything for it; a CLI calls `show_phases()` once to print each phase as one line on stderr with
the time since it started (also when stderr is a file or a pipe, i.e. in a job's log). The trainer's
progress bar shows the current phase too, until its first step (pf_jax.training.metrics).
"""

from __future__ import annotations

import logging
import sys
import time

PHASE_LOGGER = "pf_jax.phase"


class PhaseLines(logging.Handler):
    """`[pf_jax] 0:00:12 <phase>` on the current sys.stderr (looked up per line, so a live progress display
    that redirects stderr prints it above itself)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.start = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        elapsed = int(time.monotonic() - self.start)
        stamp = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        try:
            print(f"[pf_jax] {stamp} {record.getMessage()}", file=sys.stderr, flush=True)
        except Exception:  # a closed stream must not fail the run
            self.handleError(record)


def show_phases() -> logging.Logger:
    """Print every phase announced from now on (once per process, however often it is called)."""
    logger = logging.getLogger(PHASE_LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, PhaseLines) for h in logger.handlers):
        logger.addHandler(PhaseLines())
    return logger
