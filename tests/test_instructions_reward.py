"""Instruction reward: scale * mean of constraint scores, bad-input reasons, loud failures."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from if_verifiable.common import evaluate_instructions
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

from pf_jax.tasks.instructions.constraints import Constraint, NltkDataMissingError
from pf_jax.tasks.instructions.curriculum import MultiConstraintInstruction, build_levels
from pf_jax.tasks.instructions.reward import REASONS, InstructionReward, RewardFunctionError


def animal_scorer(responses, constraints):
    """A soft scorer that needs no model: 0.9 if an animal word appears, else 0.2 (any constraint)."""
    animals = ("cat", "dog", "fox")
    return np.array([0.9 if any(a in r.lower() for a in animals) else 0.2 for r in responses])


ROW = {"prompt": "p", "instruction_id_list": ["keywords:existence", "punctuation:no_comma",
                                              "length_constraints:number_words"],
       "kwargs": [{"keywords": ["river"]}, {}, {"num_words": 5, "relation": "at least"}]}


def test_hard_mean_times_scale():
    reward = InstructionReward(scale=2.0)
    out = reward([ROW, ROW, ROW], ["the river is wide and calm today", "the river, wide", "lake"])
    np.testing.assert_allclose(out.rewards, [2.0, 2.0 * 1 / 3, 2.0 * 1 / 3], rtol=1e-6)
    assert out.reason_counts["scored"] == 3 and out.rewards.dtype == np.float32
    np.testing.assert_array_equal(out.constraint_scores[1], [1.0, 0.0, 0.0])


def test_soft_and_hard_mix_on_curriculum_rows():
    ins = MultiConstraintInstruction("w", "Write.", (Constraint("punctuation:no_comma"),
                                                      Constraint.soft("mention an animal")))
    level1, level2 = build_levels(ins)
    out = InstructionReward(soft_scorer=animal_scorer)([level1, level2, level2], ["a cat", "a cat", "a, b"])
    np.testing.assert_allclose(out.rewards, [1.0, (1 + 0.9) / 2, (0 + 0.2) / 2], rtol=1e-6)
    m = out.metrics()
    assert m["reward/count_scored"] == 3.0 and m["reward/all_constraints_met"] == pytest.approx(1 / 3)
    assert m["reward/level_1"] == pytest.approx(1.0) and m["reward/level_2"] == pytest.approx((0.95 + 0.1) / 2)


def test_bad_input_scores_zero_and_is_counted_per_reason():
    rows = [
        {"prompt": "p", "instruction_id_list": ["keywords:existance"], "kwargs": [{"keywords": ["a"]}]},
        {"prompt": "p", "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": "a"}]},
        {"prompt": "p", "instruction_id_list": ["keywords:existence"], "kwargs": [{}]},
        {"prompt": "p", "constraints": [{"text": "  "}]},
        {"prompt": "p", "constraints": []},
        ROW,
        ROW,
        {**ROW, "language": "en"},
        {"prompt": "p", "instruction_id_list": ["language:response_language"], "kwargs": [{"language": "de"}]},
    ]
    responses = ["a", "a", "a", "a", "a", "   ", "the river is wide and calm today",
                 "der Fluss ist heute sehr breit und ruhig und wir gehen spazieren",
                 "the river is very wide and calm today and we walk along it"]
    out = InstructionReward(scale=1.0)(rows, responses)
    assert out.reasons == ["unknown_instruction_id", "malformed_kwargs", "malformed_kwargs", "malformed_kwargs",
                           "no_constraints", "empty_response", "scored", "wrong_language", "wrong_language"]
    assert set(out.reason_counts) == set(REASONS)
    assert out.reason_counts == {"scored": 1, "unknown_instruction_id": 1, "malformed_kwargs": 3,
                                 "no_constraints": 1, "empty_response": 1, "wrong_language": 2}
    np.testing.assert_array_equal(out.rewards, [0, 0, 0, 0, 0, 0, 1, 0, 0])


def test_default_language_applies_to_rows_without_one():
    german = "der Fluss ist heute sehr breit und ruhig und wir gehen spazieren"
    assert InstructionReward()([ROW], [german]).reasons == ["scored"]
    assert InstructionReward(default_language="en")([ROW], [german]).reasons == ["wrong_language"]
    assert InstructionReward(default_language="en")([ROW], ["zwei Worte"]).reasons == ["scored"]  # too short


def test_soft_scorer_failure_names_the_row():
    def picky(responses, constraints):
        if any("boom" in r for r in responses):
            raise RuntimeError("tokenizer exploded")
        return animal_scorer(responses, constraints)

    rows = [{"prompt": "p", "constraints": [{"text": "mention an animal"}]}] * 3
    with pytest.raises(RewardFunctionError, match="row 2") as info:
        InstructionReward(soft_scorer=picky)(rows, ["cat", "dog", "boom"])
    assert info.value.row_index == 2 and isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RewardFunctionError, match=r"row 1.*in \[0, 1\]"):
        InstructionReward(soft_scorer=lambda r, c: np.array([0.5, 1.5, 0.5]))(rows, ["a", "b", "c"])
    with pytest.raises(RewardFunctionError, match=r"row 0.*no soft_scorer"):
        InstructionReward()(rows, ["a", "b", "c"])


def test_checker_without_nltk_data_is_reported_with_the_row():
    rows = [ROW, {"prompt": "p", "instruction_id_list": ["words:start_verb"], "kwargs": [{}]}]
    from pf_jax.tasks.instructions.nltk_data import ensure_nltk_offline_data

    if "averaged_perceptron_tagger_eng" not in ensure_nltk_offline_data().missing:
        pytest.skip("POS tagger installed here")
    with pytest.raises(RewardFunctionError, match="row 1") as info:
        InstructionReward()(rows, ["river", "Run home."])
    assert isinstance(info.value.__cause__, NltkDataMissingError)


WORDS = ["river", "the", "cat", "RIVER", "end", "ok", "wide", "calm", "Any", "questions?", ",", "\n", "*"]
IDS = {
    "keywords:existence": {"keywords": ["river"]},
    "punctuation:no_comma": {},
    "length_constraints:number_words": {"num_words": 4, "relation": "less than"},
    "change_case:english_lowercase": {},
    "startend:end_checker": {"end_phrase": "Any questions?"},
    "detectable_format:number_highlighted_sections": {"num_highlights": 1},
}


@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=12),
       ids=st.lists(st.sampled_from(sorted(IDS)), min_size=1, max_size=4, unique=True),
       scale=st.floats(0.1, 10))
def test_reward_matches_if_verifiable_partial_strict(words, ids, scale):
    response = " ".join(words)
    row = {"prompt": "p", "instruction_id_list": ids, "kwargs": [IDS[i] for i in ids]}
    out = InstructionReward(scale=scale)([row], [response])
    if not response.strip():
        assert out.reasons == ["empty_response"]
        return
    _, golden = evaluate_instructions(response, ids, [IDS[i] for i in ids], "p", INSTRUCTION_DICT)
    assert out.rewards[0] == pytest.approx(scale * golden.partial_strict, rel=1e-6)
    assert 0.0 <= out.rewards[0] <= scale * (1 + 1e-6)
