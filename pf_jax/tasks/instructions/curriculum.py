"""Constraint-count curriculum for multi-constraint instructions (self-supervised IF, arXiv 2510.14420).

A multi-constraint instruction (task + constraints c_1..c_k) is decomposed into levels: level j asks for
the task with c_1..c_j (incremental), j = 1..k; optionally level 0, the bare task, which only serves as
the negative side of c_1's pseudo-labels. A prompt source samples (instruction, level) rows uniformly or
under a schedule that ramps the largest allowed level over training steps; it is deterministic given
(seed, step).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pf_jax.tasks.instructions.constraints import Constraint, constraint_from_dict, describe_constraint


@dataclasses.dataclass(frozen=True)
class MultiConstraintInstruction:
    """A task and its ordered constraints c_1..c_k."""

    id: str
    task: str
    constraints: tuple[Constraint, ...]

    def __post_init__(self) -> None:
        if not self.constraints:
            raise ValueError(f"instruction {self.id!r} has no constraints; a curriculum needs k >= 1")


@dataclasses.dataclass(frozen=True)
class CurriculumRow:
    """One prompt of the curriculum: instruction `instruction_id` at `level` (its first `level` constraints)."""

    instruction_id: str
    level: int
    prompt: str
    constraints: tuple[Constraint, ...]


def render_prompt(task: str, constraints: Sequence[Constraint]) -> str:
    """Task text followed by one line per constraint (checker phrasing for hard, text for soft)."""
    if not constraints:
        return task
    lines = "\n".join(f"- {describe_constraint(c)}" for c in constraints)
    return f"{task}\n\nYour response must follow these constraints:\n{lines}"


def build_levels(instruction: MultiConstraintInstruction, include_base: bool = False) -> list[CurriculumRow]:
    """Rows for levels 1..k (level j = c_1..c_j); with `include_base`, level 0 (the bare task) first."""
    first = 0 if include_base else 1
    return [
        CurriculumRow(instruction.id, j, render_prompt(instruction.task, instruction.constraints[:j]),
                      instruction.constraints[:j])
        for j in range(first, len(instruction.constraints) + 1)
    ]


def instruction_from_dict(row: Mapping[str, Any], index: int = 0) -> MultiConstraintInstruction:
    """`{"id": str?, "task": str, "constraints": [{"id", "kwargs"} | {"text"}, ...]}` -> instruction."""
    if "task" not in row or "constraints" not in row:
        raise ValueError(f"instruction row {index}: expected keys 'task' and 'constraints', got {sorted(row)}")
    cons = tuple(constraint_from_dict(c) for c in row["constraints"])
    return MultiConstraintInstruction(str(row.get("id", index)), str(row["task"]), cons)


def load_instructions_jsonl(path: str | Path) -> list[MultiConstraintInstruction]:
    """Multi-constraint instructions, one JSON object per line (format of `instruction_from_dict`)."""
    with open(path, encoding="utf-8") as f:
        return [instruction_from_dict(json.loads(line), i) for i, line in enumerate(f) if line.strip()]


LevelSchedule = Callable[[int], int]
"""step -> the largest constraint count a prompt may have at that step."""


def uniform_levels(max_level: int = 1 << 30) -> LevelSchedule:
    """Every level of every instruction is allowed at every step."""
    return lambda step: max_level


def linear_level_ramp(start_level: int, end_level: int, ramp_steps: int) -> LevelSchedule:
    """max_level(step) = start + floor((end - start) * min(step, ramp_steps) / ramp_steps)."""
    if not 1 <= start_level <= end_level or ramp_steps < 1:
        raise ValueError(f"linear_level_ramp needs 1 <= start <= end and ramp_steps >= 1, got "
                         f"({start_level}, {end_level}, {ramp_steps})")
    return lambda step: start_level + (end_level - start_level) * min(max(step, 0), ramp_steps) // ramp_steps


class CurriculumPromptSource:
    """Samples curriculum rows: an instruction uniformly, then a level uniformly in 1..min(k, max_level(step)).

    Deterministic: the rows of `batch(step, n)` depend only on (seed, step, n), so a resumed run
    sees the same prompts.
    """

    def __init__(self, instructions: Sequence[MultiConstraintInstruction], schedule: LevelSchedule | None = None,
                 seed: int = 0):
        if not instructions:
            raise ValueError("CurriculumPromptSource needs at least one instruction")
        self.instructions = list(instructions)
        ids = [ins.id for ins in self.instructions]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"instruction ids must be unique; repeated: {dup}")
        self.schedule = schedule or uniform_levels()
        self.seed = seed
        self._levels = {ins.id: build_levels(ins) for ins in self.instructions}

    def batch(self, step: int, batch_size: int) -> list[CurriculumRow]:
        rng = np.random.default_rng([self.seed, step])
        cap = self.schedule(step)
        if cap < 1:
            raise ValueError(f"level schedule gave max level {cap} at step {step}; expected >= 1")
        picks = rng.integers(0, len(self.instructions), size=batch_size)
        rows = []
        for i in picks:
            levels = self._levels[self.instructions[i].id][:cap]
            rows.append(levels[int(rng.integers(0, len(levels)))])
        return rows
