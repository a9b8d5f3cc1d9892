"""A held-out share of a data set chosen by hashing each row's prompt (eval.fraction): the same rows on
every run, machine and process, whatever the order of the file, and a prompt that appears twice is held
out (or trained on) both times, so no held-out prompt is ever trained on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

SALT = b"pf_jax eval.fraction v1\0"


def held_out(row: Mapping[str, Any], fraction: float) -> bool:
    """Whether the row's prompt falls in the held-out share `fraction` (0 < fraction < 1)."""
    key = json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False).encode()
    value = int.from_bytes(hashlib.sha256(SALT + key).digest()[:8], "big") / 2**64
    return value < fraction


def split_held_out(rows: Sequence[Mapping[str, Any]], fraction: float) -> tuple[list[Any], list[Any]]:
    """(the rows to train on, the held-out rows)."""
    train, test = [], []
    for row in rows:
        (test if held_out(row, fraction) else train).append(row)
    return train, test
