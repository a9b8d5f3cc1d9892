"""IFEval strict/loose metrics on a hand-made fixture with hand-computed accuracies."""

import json

import pytest
from if_verifiable.common import evaluate_instructions
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

from pf_jax.tasks.instructions.ifeval import evaluate_ifeval, load_ifeval_jsonl, load_responses, main

END = "Is there anything else I can help with?"
# (row, response, strict per instruction, loose per instruction)
FIXTURE = [
    ({"key": 1, "prompt": "Describe a river without commas.",
      "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
      "kwargs": [{}, {"keywords": ["river"]}]},
     "Sure, here you go:\nThe river runs deep.", [False, True], [True, True]),  # loose drops line 1
    ({"key": 2, "prompt": "Answer and end with the phrase.", "instruction_id_list": ["startend:end_checker"],
      "kwargs": [{"end_phrase": END, "keywords": None}]},  # None-valued kwargs as on the hub
     f"The answer is four. {END}\n-- generated", [False], [True]),  # loose drops the last line
    ({"key": 3, "prompt": "A titled poem under three words.",
      "instruction_id_list": ["detectable_format:title", "length_constraints:number_words"],
      "kwargs": [{}, {"num_words": 3, "relation": "less than"}]},
     "<<Poem>> roses are red and violets blue", [True, False], [True, False]),  # one line: no loose rescue
    ({"key": 4, "prompt": "Lowercase only.", "instruction_id_list": ["change_case:english_lowercase"],
      "kwargs": [{}]},
     "all of these words are written in lowercase english today.", [True], [True]),
    ({"key": 5, "prompt": "Bold title, no 'bad'.", "instruction_id_list": ["keywords:forbidden_words"],
      "kwargs": [{"forbidden_words": ["bad"]}]},
     "This is bad.", [False], [False]),
    ({"key": 6, "prompt": "Wrap in quotes.", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
     '**"A quoted answer."**', [False], [True]),  # loose removes markdown asterisks
]
# Hand-computed: 8 instructions; strict passes 1+0+1+1+0+0 = 3, loose 2+1+1+1+0+1 = 6;
# prompts all-pass strict: #4 -> 1/6; loose: #1, #2, #4, #6 -> 4/6.
EXPECTED = {"instruction_strict": 3 / 8, "instruction_loose": 6 / 8, "prompt_strict": 1 / 6,
            "prompt_loose": 4 / 6}


@pytest.fixture
def fixture_files(tmp_path):
    data, resp = tmp_path / "ifeval.jsonl", tmp_path / "responses.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r, *_ in FIXTURE))
    # responses in a different order than the data: matched by prompt like IFEval's own script
    resp.write_text("".join(json.dumps({"prompt": r["prompt"], "response": y}) + "\n"
                            for r, y, *_ in reversed(FIXTURE)))
    return data, resp


def test_hand_computed_accuracies(fixture_files):
    data, resp = fixture_files
    rows = load_ifeval_jsonl(data)
    result = evaluate_ifeval(rows, load_responses(resp, rows))
    assert result.summary() == pytest.approx(EXPECTED)
    assert result.per_prompt_strict == [s for *_, s, _ in FIXTURE]
    assert result.per_prompt_loose == [lo for *_, lo in FIXTURE]
    assert result.per_instruction_type["punctuation:no_comma"] == {"strict": 0.0, "loose": 1.0, "count": 1.0}


def test_matches_if_verifiable_reference(fixture_files):
    data, _ = fixture_files
    rows = load_ifeval_jsonl(data)
    responses = [y for _, y, *_ in FIXTURE]
    ours = evaluate_ifeval(rows, responses)
    for row, y, strict, loose in zip(rows, responses, ours.per_prompt_strict, ours.per_prompt_loose):
        ref, _ = evaluate_instructions(y, list(row.instruction_id_list), list(row.kwargs), row.prompt,
                                       INSTRUCTION_DICT)
        assert [r.strict_pass for r in ref] == strict and [r.loose_pass for r in ref] == loose


def test_cli_prints_the_summary(fixture_files, capsys):
    data, resp = fixture_files
    assert main(["--data", str(data), "--responses", str(resp)]) == pytest.approx(EXPECTED)
    assert json.loads(capsys.readouterr().out) == pytest.approx(EXPECTED)


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "instruction_id_list": ["nope:x"], "kwargs": [{}]}) + "\n")
    with pytest.raises(ValueError, match=r"row 0.*unknown constraint id 'nope:x'"):
        load_ifeval_jsonl(bad)
    bad.write_text(json.dumps({"prompt": "p", "instruction_id_list": ["punctuation:no_comma"]}) + "\n")
    with pytest.raises(ValueError, match="missing keys \\['kwargs'\\]"):
        load_ifeval_jsonl(bad)
    bad.write_text(json.dumps({"prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                               "kwargs": [{}]}) + "\n")
    rows = load_ifeval_jsonl(bad)
    with pytest.raises(ValueError, match="2 responses for 1 IFEval rows"):
        load_responses(["a", "b"], rows)
    resp = tmp_path / "r.jsonl"
    resp.write_text(json.dumps({"prompt": "other", "response": "x"}) + "\n")
    with pytest.raises(ValueError, match="no response for rows with keys"):
        load_responses(resp, rows)
