"""Instruction-following prompt rows for the trainer: the constraint-count curriculum as a prompt source.

Sources (`data.source`):
- `instructions_synthetic` / `instructions_synthetic_hard`: the synthetic multi-constraint instructions of
  `pf_jax.tasks.instructions.soft_constraints` (hard + soft constraints / hard ones only);
- a `.jsonl` of multi-constraint instructions in the curriculum's format
  (`{"id"?, "task", "constraints": [{"id", "kwargs"} | {"text"}]}`), decomposed into levels 1..k;
- a `.jsonl` in IFEval's format (`prompt`, `instruction_id_list`, `kwargs`): rows as they are, no levels.

A curriculum row is a dict {"prompt", "instruction_id", "level", "constraints": [...]}, which
`InstructionReward` reads. `CurriculumBatches` is the trainer's iterator over a `CurriculumPromptSource`
(levels sampled uniformly or under a schedule), deterministic in (seed, step), so resumption is exact.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pf_jax.config import ConfigError, DataConfig
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.iterator import IteratorState
from pf_jax.data.loading import read_jsonl
from pf_jax.data.rows import RowProblem, check_text_field, validate_rows
from pf_jax.tasks.instructions.classifier import format_classifier_input
from pf_jax.tasks.instructions.constraints import SOFT_CONSTRAINT_ID, Constraint, constraint_type
from pf_jax.tasks.instructions.curriculum import (
    CurriculumPromptSource,
    CurriculumRow,
    LevelSchedule,
    MultiConstraintInstruction,
    build_levels,
    instruction_from_dict,
    linear_level_ramp,
    uniform_levels,
)
from pf_jax.tasks.instructions.soft_constraints import (
    SOFT_CONSTRAINTS,
    synthetic_multi_constraint_instructions,
)

SYNTHETIC_INSTRUCTION_SOURCES = ("instructions_synthetic", "instructions_synthetic_hard")


def constraint_to_dict(c: Constraint) -> dict[str, Any]:
    """Inverse of `constraint_from_dict`: {"text"} for soft, {"id", "kwargs"} for hard."""
    if c.type_id == SOFT_CONSTRAINT_ID:
        return {"text": c.text}
    return {"id": c.type_id, "kwargs": dict(c.kwargs)}


def curriculum_row_dict(row: CurriculumRow) -> dict[str, Any]:
    """The trainer's row for a curriculum row."""
    return {"prompt": row.prompt, "instruction_id": row.instruction_id, "level": row.level,
            "constraints": [constraint_to_dict(c) for c in row.constraints]}


def synthetic_instructions(source: str, split: str, n: int, seed: int = 0) -> list[MultiConstraintInstruction]:
    """The synthetic instructions of `source`; `_hard` drops soft constraints (instructions left with none
    are dropped)."""
    if split not in ("train", "test"):
        raise ConfigError(f"data.split for {source} must be 'train' or 'test', got '{split}'")
    out = synthetic_multi_constraint_instructions(n, seed, split)  # type: ignore[arg-type]
    if source.endswith("_hard"):
        out = [dataclasses.replace(i, constraints=hard) for i in out
               if (hard := tuple(c for c in i.constraints if constraint_type(c.type_id).kind == "hard"))]
    return out


def _first_row(path: str) -> Mapping[str, Any] | None:
    for row in read_jsonl(path):
        return row if isinstance(row, Mapping) else None
    return None


def instruction_source_kind(cfg: DataConfig) -> str | None:
    """'synthetic', 'curriculum_jsonl', 'ifeval_jsonl', or None when `cfg` is not an instruction source."""
    if cfg.source in SYNTHETIC_INSTRUCTION_SOURCES:
        return "synthetic"
    if Path(cfg.source).suffix.lower() in (".jsonl", ".json") and Path(cfg.source).is_file():
        first = _first_row(cfg.source)
        if first is not None and "task" in first and "constraints" in first:
            return "curriculum_jsonl"
        if first is not None and "instruction_id_list" in first:
            return "ifeval_jsonl"
    return None


def load_curriculum_instructions(cfg: DataConfig, num_synthetic: int = 64) -> list[MultiConstraintInstruction]:
    """The multi-constraint instructions of a synthetic source or a curriculum jsonl.

    A jsonl row that does not parse, names an unknown constraint id or has malformed kwargs is a bad row
    (skipped and counted, or raised under `on_bad_row: stop`)."""
    if cfg.source in SYNTHETIC_INSTRUCTION_SOURCES:
        return synthetic_instructions(cfg.source, cfg.split, num_synthetic)

    def check(row: Mapping[str, Any]) -> dict[str, Any] | RowProblem:
        try:
            ins = instruction_from_dict(row, index=int(check.count))
            build_levels(ins)  # renders every constraint: unknown ids / bad kwargs fail here
        except (KeyError, ValueError, TypeError) as error:
            return RowProblem("bad instruction", f"{type(error).__name__}: {error}")
        finally:
            check.count += 1
        return {"instruction": ins}

    check.count = 0  # type: ignore[attr-defined]
    kept = validate_rows(read_jsonl(cfg.source), check, cfg.on_bad_row, source=f"{cfg.source} [curriculum]")
    if kept.report.skipped:
        print(f"[pf_jax] data: {kept.report.summary()}")
    return [r["instruction"] for r in kept.rows]


def _ifeval_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    def check(row: Mapping[str, Any]) -> dict[str, Any] | RowProblem:
        prompt = check_text_field(row, cfg.prompt_field)
        if isinstance(prompt, RowProblem):
            return prompt
        if not isinstance(row.get("instruction_id_list"), list):
            return RowProblem("missing field", "field 'instruction_id_list' must be a list of constraint ids")
        # unknown ids and malformed kwargs are kept: the reward scores them 0 and counts them per reason
        return {"prompt": prompt, "instruction_id_list": row["instruction_id_list"],
                "kwargs": row.get("kwargs") or [{} for _ in row["instruction_id_list"]]}

    kept = validate_rows(read_jsonl(cfg.source), check, cfg.on_bad_row, source=f"{cfg.source} [ifeval]")
    if kept.report.skipped:
        print(f"[pf_jax] data: {kept.report.summary()}")
    return kept.rows


def load_instruction_rows(cfg: DataConfig, num_synthetic: int = 64) -> list[dict[str, Any]]:
    """Every prompt row of an instruction source: all levels of every instruction, or IFEval rows."""
    kind = instruction_source_kind(cfg)
    if kind is None:
        raise ConfigError(f"data.source '{cfg.source}' is not an instruction source (one of "
                          f"{SYNTHETIC_INSTRUCTION_SOURCES}, or a jsonl in the curriculum or IFEval format)")
    if kind == "ifeval_jsonl":
        return _ifeval_rows(cfg)
    return [curriculum_row_dict(r) for ins in load_curriculum_instructions(cfg, num_synthetic)
            for r in build_levels(ins)]


def level_schedule(kind: str, start_level: int, end_level: int, ramp_steps: int) -> LevelSchedule:
    """`uniform` (every level at every step) or `linear` (max level ramps start -> end over ramp_steps)."""
    if kind == "uniform":
        return uniform_levels()
    if kind == "linear":
        try:
            return linear_level_ramp(start_level, end_level, ramp_steps)
        except ValueError as error:
            raise ConfigError(f"curriculum: {error}") from error
    raise ConfigError(f"curriculum.schedule must be 'uniform' or 'linear', got '{kind}'")


class CurriculumBatches:
    """The trainer's iterator over a curriculum: batch s = `source.batch(s, global_batch)`, this process's
    slice. Its state is an IteratorState with position = steps taken (epoch 0), restored exactly."""

    def __init__(self, source: CurriculumPromptSource, global_batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> None:
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be divisible by process_count "
                             f"{process_count}")
        self.source = source
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self._state = IteratorState(0, 0, source.seed, len(source.instructions))

    @property
    def state(self) -> IteratorState:
        return self._state

    def restore(self, state: IteratorState) -> None:
        if state.num_rows != len(self.source.instructions) or state.seed != self.source.seed:
            raise ValueError(f"curriculum state was saved for {state.num_rows} instructions with seed "
                             f"{state.seed}; this run has {len(self.source.instructions)} with seed {self.source.seed}")
        self._state = state

    def next_batch(self) -> list[dict[str, Any]]:
        step = self._state.position
        rows = self.source.batch(step, self.global_batch_size)
        start = self.process_index * self.local_batch_size
        self._state = dataclasses.replace(self._state, position=step + 1)
        return [curriculum_row_dict(r) for r in rows[start:start + self.local_batch_size]]


def instruction_vocabulary_texts(num_synthetic: int = 64) -> list[str]:
    """Every text a tiny word-level model meets on the synthetic instruction tasks: the prompts of all
    levels (both splits, hard + soft), the soft constraints' words and templates over all topics, and the
    classifier's input frame."""
    texts: list[str] = []
    for split in ("train", "test"):
        for ins in synthetic_instructions("instructions_synthetic", split, num_synthetic):
            texts += [r.prompt for r in build_levels(ins, include_base=True)]
    for c in SOFT_CONSTRAINTS.values():
        texts += [c.text, " ".join(c.trait_words), " ".join(c.neutral_words), *c.templates]
    texts.append(format_classifier_input("", ""))
    return texts


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Rows as one JSON object per line."""
    path = Path(path)
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows))
    return path


def curriculum_batches(cfg: TrainConfig, global_batch_size: int, *, process_index: int = 0,
                       process_count: int = 1) -> CurriculumBatches | None:
    """The level-sampling iterator for a synthetic or curriculum-jsonl source; None for other sources
    (an IFEval jsonl has no levels: its rows go through the ordinary BatchIterator)."""
    if instruction_source_kind(cfg.data) not in ("synthetic", "curriculum_jsonl"):
        return None
    c = cfg.curriculum
    instructions = load_curriculum_instructions(cfg.data, c.synthetic_instructions)
    source = CurriculumPromptSource(instructions, level_schedule(c.schedule, c.start_level, c.end_level, c.ramp_steps),
                                    seed=cfg.data.shuffle_seed if c.seed is None else c.seed)
    return CurriculumBatches(source, global_batch_size, process_index=process_index, process_count=process_count)
