"""Pseudo-labels for the constraint classifier, from the policy's own responses across curriculum levels.

Self-supervised IF (arXiv 2510.14420, Sec. 3): for constraint c_j of an instruction, a response to level j
(whose prompt includes c_j) is a positive for c_j, and a response to level j-1 (c_j absent) is a negative
for c_j. No human labels. Level 0 is the bare task; without responses to it, c_1 gets positives only.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from pf_jax.tasks.instructions.classifier import format_classifier_input
from pf_jax.tasks.instructions.constraints import Constraint, constraint_type, describe_constraint
from pf_jax.tasks.instructions.curriculum import CurriculumRow


@dataclasses.dataclass(frozen=True)
class PseudoLabel:
    """(response, constraint, label): label 1 = the prompt asked for the constraint, 0 = it did not."""

    response: str
    constraint: Constraint
    constraint_text: str
    label: int
    instruction_id: str
    level: int

    @property
    def classifier_input(self) -> str:
        return format_classifier_input(self.response, self.constraint_text)


def build_pseudo_labels(rows: Sequence[CurriculumRow], responses: Sequence[str],
                        soft_only: bool = True) -> list[PseudoLabel]:
    """(response, c_j, 1) for each response to level j; (response, c_j, 0) for each response to level j-1.

    rows[i] is the curriculum row responses[i] answered. Rows of one instruction must agree on its
    constraints (level j's constraints are a prefix of level j+1's); c_j is known once a row of level
    >= j is given. With `soft_only`, only soft
    constraints get labels (hard ones are verified by code). Empty responses are skipped.
    """
    if len(rows) != len(responses):
        raise ValueError(f"build_pseudo_labels: {len(rows)} rows but {len(responses)} responses")
    by_level: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    constraints: dict[str, tuple[Constraint, ...]] = {}
    for row, response in zip(rows, responses):
        known = constraints.get(row.instruction_id, ())
        longer, shorter = (row.constraints, known) if len(row.constraints) >= len(known) else (known, row.constraints)
        if longer[: len(shorter)] != shorter:
            raise ValueError(f"instruction {row.instruction_id!r}: level {row.level} constraints are not a "
                             "prefix-consistent decomposition of the other levels")
        constraints[row.instruction_id] = longer
        if response.strip():
            by_level[row.instruction_id][row.level].append(response)
    labels = []
    for iid, levels in by_level.items():
        cons = constraints[iid]
        for j in range(1, len(cons) + 1):
            c = cons[j - 1]
            if soft_only and constraint_type(c.type_id).kind != "soft":
                continue
            text = describe_constraint(c)
            labels += [PseudoLabel(r, c, text, 1, iid, j) for r in levels.get(j, [])]
            labels += [PseudoLabel(r, c, text, 0, iid, j - 1) for r in levels.get(j - 1, [])]
    return labels


def classifier_training_pairs(labels: Sequence[PseudoLabel]) -> tuple[list[str], np.ndarray]:
    """Classifier inputs "Response: {r}. Constraint: {c}" [N] and labels [N] (int32) for the reward model."""
    return [pl.classifier_input for pl in labels], np.array([pl.label for pl in labels], np.int32)
