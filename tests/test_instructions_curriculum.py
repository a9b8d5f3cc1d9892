"""Curriculum levels, the level schedule, and pseudo-labels built from responses across levels."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pf_jax.tasks.instructions.constraints import Constraint
from pf_jax.tasks.instructions.curriculum import (
    CurriculumPromptSource,
    MultiConstraintInstruction,
    build_levels,
    linear_level_ramp,
    load_instructions_jsonl,
    uniform_levels,
)
from pf_jax.tasks.instructions.pseudo_labels import build_pseudo_labels, classifier_training_pairs

C1 = Constraint("keywords:existence", {"keywords": ["river"]})
C2 = Constraint.soft("respond in a cheerful tone")
C3 = Constraint("punctuation:no_comma")
C4 = Constraint.soft("mention an animal")
INS = MultiConstraintInstruction("walk", "Describe a walk.", (C1, C2, C3, C4))


def _instructions(n, k):
    pool = [C1, C2, C3, C4, Constraint("detectable_format:title"), Constraint.soft("be brief")]
    return [MultiConstraintInstruction(f"i{i}", f"Task {i}.", tuple(pool[:k])) for i in range(n)]


def test_levels_are_incremental_prefixes():
    levels = build_levels(INS)
    assert [r.level for r in levels] == [1, 2, 3, 4]
    for j, row in enumerate(levels, start=1):
        assert row.constraints == INS.constraints[:j]
        assert row.prompt.startswith("Describe a walk.")
        assert row.prompt.count("\n- ") == j
    assert "river" in levels[0].prompt and "cheerful" not in levels[0].prompt
    assert "cheerful" in levels[1].prompt
    base = build_levels(INS, include_base=True)[0]
    assert base.level == 0 and base.constraints == () and base.prompt == "Describe a walk."


def test_instruction_without_constraints_is_refused():
    with pytest.raises(ValueError, match="no constraints"):
        MultiConstraintInstruction("x", "t", ())


def test_load_jsonl(tmp_path):
    path = tmp_path / "ins.jsonl"
    rows = [{"id": "a", "task": "Write.", "constraints": [{"id": "punctuation:no_comma"}, {"text": "be kind"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (ins,) = load_instructions_jsonl(path)
    assert ins.constraints == (Constraint("punctuation:no_comma"), Constraint.soft("be kind"))
    path.write_text(json.dumps({"task": "no constraints key"}) + "\n")
    with pytest.raises(ValueError, match="row 0: expected keys"):
        load_instructions_jsonl(path)


@given(seed=st.integers(0, 2**31), step=st.integers(0, 1000))
def test_prompt_source_is_deterministic_and_respects_levels(seed, step):
    source = CurriculumPromptSource(_instructions(5, 4), uniform_levels(), seed=seed)
    a, b = source.batch(step, 16), source.batch(step, 16)
    assert a == b
    assert all(1 <= r.level <= 4 and len(r.constraints) == r.level for r in a)


def test_uniform_sampling_covers_levels_evenly():
    source = CurriculumPromptSource(_instructions(3, 4), seed=0)
    levels = [r.level for step in range(500) for r in source.batch(step, 40)]
    freq = [levels.count(j) / len(levels) for j in (1, 2, 3, 4)]
    assert all(abs(f - 0.25) < 0.015 for f in freq), freq  # 5 sigma for 20000 draws


def test_linear_ramp_caps_the_level():
    ramp = linear_level_ramp(1, 4, ramp_steps=30)
    assert [ramp(s) for s in (0, 9, 10, 20, 30, 10_000)] == [1, 1, 2, 3, 4, 4]
    source = CurriculumPromptSource(_instructions(4, 4), ramp, seed=1)
    assert {r.level for r in source.batch(0, 64)} == {1}
    assert {r.level for r in source.batch(15, 64)} == {1, 2}
    assert {r.level for r in source.batch(40, 200)} == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="linear_level_ramp"):
        linear_level_ramp(3, 2, 10)


def test_duplicate_instruction_ids_are_refused():
    with pytest.raises(ValueError, match="repeated"):
        CurriculumPromptSource(_instructions(2, 2) * 2)


def test_pseudo_labels_follow_consecutive_levels():
    rows = build_levels(INS, include_base=True)  # levels 0..4
    responses = [f"response to level {r.level}" for r in rows]
    labels = build_pseudo_labels(rows, responses)
    # soft constraints: c_2 (level 2 positive, level 1 negative), c_4 (level 4 positive, level 3 negative)
    got = {(pl.constraint_text, pl.label, pl.response) for pl in labels}
    assert got == {
        ("respond in a cheerful tone", 1, "response to level 2"),
        ("respond in a cheerful tone", 0, "response to level 1"),
        ("mention an animal", 1, "response to level 4"),
        ("mention an animal", 0, "response to level 3"),
    }
    texts, y = classifier_training_pairs(labels)
    assert texts[0] == f"Response: {labels[0].response}. Constraint: {labels[0].constraint_text}"
    assert y.dtype == np.int32 and y.tolist() == [pl.label for pl in labels]
    hard_too = build_pseudo_labels(rows, responses, soft_only=False)
    assert len(hard_too) == 8
    c1 = {(pl.label, pl.response) for pl in hard_too if pl.constraint == C1}
    assert c1 == {(1, "response to level 1"), (0, "response to level 0")}


def test_pseudo_labels_with_groups_and_missing_levels():
    rows = build_levels(INS)  # no level 0
    picked = [rows[1]] * 3 + [rows[2]] * 2  # levels 2 (x3) and 3 (x2) only
    responses = ["a", "b", "  ", "c", "d"]
    labels = build_pseudo_labels(picked, responses)
    pos = sorted(pl.response for pl in labels if pl.label == 1)
    neg = sorted(pl.response for pl in labels if pl.label == 0)
    # c_2 positives from level 2 (the blank response skipped); no level-1 responses -> no c_2 negatives;
    # c_4 is unknown until a level-4 row is seen -> no c_4 labels.
    assert pos == ["a", "b"] and neg == []
    labels = build_pseudo_labels([*picked, rows[3]], [*responses, "e"])
    assert {(pl.label, pl.response) for pl in labels if pl.constraint == C4} == {(1, "e"), (0, "c"), (0, "d")}


def test_pseudo_labels_refuse_inconsistent_levels():
    other = MultiConstraintInstruction("walk", "Describe a walk.", (C3, C2))
    with pytest.raises(ValueError, match="prefix-consistent"):
        build_pseudo_labels([build_levels(INS)[1], build_levels(other)[1]], ["x", "y"])
    with pytest.raises(ValueError, match="2 rows but 1 responses"):
        build_pseudo_labels(build_levels(INS)[:2], ["x"])
