"""Instruction-following reward: scale * mean over an instruction's constraints of s_i.

    r(x, y) = scale * (1 / k) * sum_{i=1..k} s_i,
    s_i = 1[verifier_i(y)]             for a hard constraint (IFEval / IFBench checker),
    s_i = P_classifier(adheres | y, c_i) for a soft constraint (soft scorer),

self-supervised IF (arXiv 2510.14420, Sec. 3.3): the average, not all-or-nothing; the trainer places it at
the last response token. Bad input scores 0 and is counted per reason (REASONS); a failing checker or soft
scorer raises `RewardFunctionError` carrying the row index, never a silent 0.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import langdetect
import numpy as np

from pf_jax.tasks.instructions.classifier import SoftScorer
from pf_jax.tasks.instructions.constraints import (
    Constraint,
    MalformedKwargsError,
    UnknownConstraintError,
    check_hard_constraint,
    constraint_type,
    constraints_from_row,
    validate_kwargs,
)

REASONS = ("scored", "unknown_instruction_id", "malformed_kwargs", "no_constraints", "empty_response",
           "wrong_language")


class RewardFunctionError(RuntimeError):
    """A checker or the soft scorer failed on a row; `row_index` and `row` say which."""

    def __init__(self, row_index: int, row: Any, message: str):
        super().__init__(f"reward function failed on row {row_index}: {message}; row={row!r}")
        self.row_index = row_index
        self.row = row


@dataclasses.dataclass(frozen=True)
class InstructionRewardBatch:
    """rewards [B]; per-row constraint scores and reason; counts per reason (every name of REASONS)."""

    rewards: np.ndarray
    constraint_scores: list[np.ndarray]
    reasons: list[str]
    reason_counts: dict[str, int]
    levels: list[int | None] = dataclasses.field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        scored = [s for s, r in zip(self.constraint_scores, self.reasons) if r == "scored"]
        flat = np.concatenate(scored) if scored else np.zeros((0,))
        return {
            "reward/mean": float(self.rewards.mean()) if self.rewards.size else 0.0,
            "reward/constraint_mean": float(flat.mean()) if flat.size else 0.0,
            "reward/all_constraints_met": float(np.mean([s.min() >= 1.0 for s in scored])) if scored else 0.0,
            **{f"reward/count_{k}": float(v) for k, v in self.reason_counts.items()},
            **{f"reward/level_{j}": float(np.mean([r for r, lv in zip(self.rewards, self.levels) if lv == j]))
               for j in sorted({lv for lv in self.levels if lv is not None})},
        }


def _row_prompt(row: Any) -> str:
    if hasattr(row, "prompt"):
        return str(row.prompt)
    return str(row.get("prompt", "")) if isinstance(row, Mapping) else ""


def _expected_language(row: Any, constraints: Sequence[Constraint], default: str | None) -> str | None:
    for c in constraints:
        if c.type_id == "language:response_language":
            return str(c.kwargs["language"])
    if isinstance(row, Mapping) and row.get("language"):
        return str(row["language"])
    return getattr(row, "language", None) or default


def _is_wrong_language(response: str, expected: str, min_words: int) -> bool:
    """langdetect's language != expected; responses under `min_words` words are too short to judge."""
    if len(re.findall(r"[^\W\d_]+", response)) < min_words:
        return False
    try:
        return langdetect.detect(response) != expected
    except langdetect.LangDetectException:
        return False


@dataclasses.dataclass(frozen=True)
class InstructionReward:
    """rewards(rows, responses) -> InstructionRewardBatch. Rows: curriculum rows or IFEval/pf_jax dicts.

    `expected_language` of a row: its response_language constraint, else its `language` field, else
    `default_language` (None: no language check).
    """

    scale: float = 1.0
    soft_scorer: SoftScorer | None = None
    default_language: str | None = None
    min_words_for_language: int = 4

    def _triage(self, row: Any, response: str) -> tuple[str, tuple[Constraint, ...]]:
        try:
            constraints = constraints_from_row(row)
            for c in constraints:
                if constraint_type(c.type_id).kind == "soft":
                    if not c.text.strip():
                        raise MalformedKwargsError("soft constraint with empty text")
                else:
                    validate_kwargs(c.type_id, c.kwargs)
        except UnknownConstraintError:
            return "unknown_instruction_id", ()
        except MalformedKwargsError:
            return "malformed_kwargs", ()
        if not constraints:
            return "no_constraints", ()
        if not response.strip():
            return "empty_response", ()
        language = _expected_language(row, constraints, self.default_language)
        if language and _is_wrong_language(response, language, self.min_words_for_language):
            return "wrong_language", ()
        return "scored", constraints

    def _soft_scores(self, rows: Sequence[Any], jobs: list[tuple[int, int, str, str]]) -> np.ndarray:
        """jobs: (row, constraint slot, response, constraint text); one batched call, per-row on failure."""
        if self.soft_scorer is None:
            raise RewardFunctionError(jobs[0][0], rows[jobs[0][0]],
                                      "row has a soft constraint but InstructionReward has no soft_scorer")
        try:
            probs = np.asarray(self.soft_scorer([j[2] for j in jobs], [j[3] for j in jobs]), np.float64)
        except Exception:  # find the row that fails, then report it with its index
            for i in dict.fromkeys(j[0] for j in jobs):
                mine = [j for j in jobs if j[0] == i]
                try:
                    self.soft_scorer([j[2] for j in mine], [j[3] for j in mine])
                except Exception as err:
                    raise RewardFunctionError(i, rows[i], f"soft scorer raised {err!r}") from err
            raise
        bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
        if probs.shape != (len(jobs),) or bad.any():
            i = jobs[int(np.argmax(bad))][0] if probs.shape == (len(jobs),) else jobs[0][0]
            raise RewardFunctionError(i, rows[i], f"soft scorer returned {probs!r}; expected {len(jobs)} "
                                                  "probabilities in [0, 1]")
        return probs

    def __call__(self, rows: Sequence[Any], responses: Sequence[str]) -> InstructionRewardBatch:
        if len(rows) != len(responses):
            raise ValueError(f"InstructionReward: {len(rows)} rows but {len(responses)} responses")
        reasons, scores, soft_jobs = [], [], []
        for i, (row, response) in enumerate(zip(rows, responses)):
            reason, constraints = self._triage(row, response)
            reasons.append(reason)
            s = np.zeros((len(constraints),), np.float64)
            for slot, c in enumerate(constraints):
                if constraint_type(c.type_id).kind == "soft":
                    soft_jobs.append((i, slot, response, c.text))
                    continue
                try:
                    s[slot] = float(check_hard_constraint(c, response, _row_prompt(row)))
                except Exception as err:
                    raise RewardFunctionError(i, row, f"checker {c.type_id!r} raised {err!r}") from err
            scores.append(s)
        if soft_jobs:
            for (i, slot, _, _), p in zip(soft_jobs, self._soft_scores(rows, soft_jobs)):
                scores[i][slot] = p
        rewards = np.array([self.scale * s.mean() if s.size else 0.0 for s in scores], np.float32)
        counts = Counter(reasons)
        levels = [row.get("level") if isinstance(row, Mapping) else getattr(row, "level", None) for row in rows]
        return InstructionRewardBatch(rewards, scores, reasons, {r: counts.get(r, 0) for r in REASONS}, levels)
