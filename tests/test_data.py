"""Data: malformed rows reported by index under skip/stop, jsonl/parquet/synthetic sources, the
resumable sharded iterator, and the synthetic arithmetic task with its noisy corpus."""

import json
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pf_jax.config import ConfigError, DataConfig
from pf_jax.data import BadRowError, BatchIterator, IteratorState
from pf_jax.data.codec import CharTokenizer
from pf_jax.tasks.arithmetic import (
    TASK_SIZES,
    ArithmeticProblem,
    generate_problems,
    is_correct,
    noisy_answer_distribution,
    noisy_corpus,
    parse_answer,
    problem_split,
)
from pf_jax.tasks.sources import load_preference_rows, load_prompt_rows

TOKENIZER = CharTokenizer()


def count_tokens(text: str) -> int:
    return len(TOKENIZER.encode(text))


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


BAD_LINES = [
    {"prompt": "1+2=", "answer": "3"},  # 0 ok
    {"answer": "4"},  # 1 missing prompt
    {"prompt": 12, "answer": "5"},  # 2 wrong type
    {"prompt": "   ", "answer": "6"},  # 3 empty
    {"prompt": "1" * 40 + "=", "answer": "7"},  # 4 too long (41 tokens > 16)
    "{not json",  # 5 not JSON
    "[1, 2]",  # 6 not an object
    {"prompt": "3+4=", "answer": 7},  # 7 ok, numeric answer
    {"prompt": "3+5="},  # 8 missing answer
    {"prompt": "9+9=", "answer": ["18"]},  # 9 wrong answer type
]


def test_skip_policy_counts_and_reports_every_bad_row(tmp_path, caplog):
    path = write_jsonl(tmp_path / "rows.jsonl", BAD_LINES)
    cfg = DataConfig(source=path, max_prompt_tokens=16, on_bad_row="skip")
    with caplog.at_level(logging.WARNING):
        out = load_prompt_rows(cfg, count_tokens=count_tokens)
    assert out.rows == [{"prompt": "1+2=", "answer": "3"}, {"prompt": "3+4=", "answer": "7"}]
    report = out.report
    assert (report.total, report.kept, report.skipped) == (10, 2, 8)
    assert report.skipped_by_kind == Counter(
        {"missing field": 2, "wrong type": 2, "empty field": 1, "prompt too long": 1, "not JSON": 1, "not an object": 1}
    )
    reasons = dict(report.examples)
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 8, 9]
    assert reasons[1] == "missing field 'prompt' (or a conversation in 'messages')"
    assert reasons[2].startswith("field 'prompt' must be a string, got int")
    assert reasons[4] == "prompt has 41 tokens, more than max_prompt_tokens=16"
    assert reasons[8] == "missing field 'answer'"
    assert "skipped 8" in caplog.text and "row 1: missing field 'prompt'" in caplog.text


@pytest.mark.parametrize(("first_bad", "reason"), [(1, "missing field 'prompt'"), (2, "must be a string")])
def test_stop_policy_raises_naming_the_row(tmp_path, first_bad, reason):
    path = write_jsonl(tmp_path / "rows.jsonl", [BAD_LINES[0], *BAD_LINES[first_bad:]])
    cfg = DataConfig(source=path, on_bad_row="stop")
    with pytest.raises(BadRowError, match=f"bad row 1 in .*rows.jsonl.*: .*{reason}") as info:
        load_prompt_rows(cfg)
    assert info.value.index == 1


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": 1}, 3, {"prompt": "b", "answer": "2"}]))
    out = load_prompt_rows(DataConfig(source=str(path)))
    assert out.rows == [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    assert out.report.examples == [(1, "expected a JSON object, got int")]


def test_all_rows_bad_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"q": "x"}])
    with pytest.raises(ValueError, match="no valid rows"):
        load_prompt_rows(DataConfig(source=path))
    with pytest.raises(ConfigError, match="cannot read data file"):
        load_prompt_rows(DataConfig(source=str(tmp_path / "none.jsonl")))


def test_parquet_through_datasets_with_custom_fields(tmp_path):
    table = pa.table({"question": ["1+1=", None, "2+2=", ""], "solution": ["2", "3", "4", "0"]})
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path)
    cfg = DataConfig(source=str(path), prompt_field="question", answer_field="solution")
    out = load_prompt_rows(cfg, cache_dir=str(tmp_path / "cache"))
    assert out.rows == [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    assert dict(out.report.examples) == {1: "missing field 'question' (or a conversation in 'messages')", 3: "field 'question' is empty"}


def test_preference_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "p", "chosen": "good", "rejected": "bad"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "good"},
        ],
    )
    out = load_preference_rows(DataConfig(source=path))
    assert out.rows == [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    assert dict(out.report.examples) == {
        1: "fields 'chosen' and 'rejected' are identical",
        2: "missing field 'rejected'",
    }


def test_synthetic_source_and_unknown_hub_name():
    out = load_prompt_rows(DataConfig(source="arithmetic", split="test"))
    assert out.report.total == out.report.kept == TASK_SIZES["test"]
    assert all(is_correct(_parse(r["prompt"]), r["answer"]) for r in out.rows)
    with pytest.raises(ConfigError, match="cannot load hub dataset 'no-such/dataset-xyz'"):
        load_prompt_rows(DataConfig(source="no-such/dataset-xyz"))


def _parse(prompt: str) -> ArithmeticProblem:
    for op in "+-*":
        if op in prompt[1:]:
            a, b = prompt[:-1].split(op)
            return ArithmeticProblem(int(a), op, int(b))
    raise AssertionError(prompt)


# --- iterator ------------------------------------------------------------------------------------------


def test_iterator_resume_gives_the_same_stream():
    rows = list(range(23))
    reference = BatchIterator(rows, global_batch_size=4, seed=7)
    expected = [reference.next_batch() for _ in range(14)]  # crosses two epoch boundaries (5 per epoch)
    it = BatchIterator(rows, global_batch_size=4, seed=7)
    got = [it.next_batch() for _ in range(6)]
    saved = json.loads(json.dumps(it.state.to_json()))
    resumed = BatchIterator(rows, global_batch_size=4, seed=7)
    resumed.restore(IteratorState.from_json(saved))
    got += [resumed.next_batch() for _ in range(8)]
    assert got == expected
    for epoch in range(2):  # each epoch is a permutation minus the dropped tail
        flat = [x for batch in expected[5 * epoch : 5 * epoch + 5] for x in batch]
        assert len(set(flat)) == 20
    assert expected[:5] != expected[5:10]


@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 10))
def test_shards_are_disjoint_and_cover_the_global_batch(process_count, local, steps):
    rows = list(range(40))
    global_batch = process_count * local
    reference = BatchIterator(rows, global_batch, seed=3)
    shards = [BatchIterator(rows, global_batch, seed=3, process_index=p, process_count=process_count)
              for p in range(process_count)]
    for _ in range(steps + 1):
        whole = reference.next_batch()
        parts = [s.next_batch() for s in shards]
        assert [x for part in parts for x in part] == whole
        assert all(len(p) == local for p in parts)


def test_iterator_rejects_bad_arguments_and_state():
    with pytest.raises(ValueError, match="divisible by process_count"):
        BatchIterator(list(range(10)), 5, process_count=2)
    with pytest.raises(ValueError, match="process_index 2"):
        BatchIterator(list(range(10)), 4, process_index=2, process_count=2)
    it = BatchIterator(list(range(10)), 2)
    with pytest.raises(ValueError, match="saved for 11 rows"):
        it.restore(IteratorState(0, 0, 0, 11))
    with pytest.raises(ValueError, match="must have keys"):
        IteratorState.from_json({"epoch": 0})


def test_unshuffled_iterator_is_in_order():
    it = BatchIterator(list("abcdefg"), 3, shuffle=False)
    assert [it.next_batch() for _ in range(3)] == [list("abc"), list("def"), list("abc")]


# --- arithmetic ----------------------------------------------------------------------------------------


@given(st.text(alphabet=CharTokenizer.ALPHABET, max_size=30))
def test_tokenizer_round_trip(text):
    ids = TOKENIZER.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == TOKENIZER.bos_id and ids[-1] == TOKENIZER.eos_id
    assert all(0 <= i < TOKENIZER.vocab_size for i in ids)
    assert TOKENIZER.decode(ids) == text
    assert TOKENIZER.decode([*ids, 5, 6]) == text  # stops at eos


def test_tokenizer_errors_and_padding():
    assert 20 <= TOKENIZER.vocab_size <= 32
    with pytest.raises(ValueError, match="character 'x' at position 2"):
        TOKENIZER.encode("12x")
    ids, mask = TOKENIZER.pad_batch([[5, 6], [7]], 4, side="left")
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 0, 0, 7]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
    ids, mask = TOKENIZER.pad_batch([[5, 6]], 3)
    np.testing.assert_array_equal(ids, [[5, 6, 0]])
    with pytest.raises(ValueError, match="more than the padded length"):
        TOKENIZER.pad_batch([[1, 2, 3]], 2)


def test_problems_are_distinct_split_disjoint_and_checked():
    ops = ("+", "-", "*")
    train = generate_problems(300, seed=1, operations=ops)
    test = generate_problems(100, seed=1, split="test", operations=ops)
    assert len(set(train)) == 300 and not set(train) & set(test)
    assert all(problem_split(p) == "train" for p in train)
    for p in train + test:
        assert eval(p.prompt[:-1]) == p.result  # independent arithmetic
        assert is_correct(p, p.answer) and is_correct(p, f" {p.answer}\nmore")
        assert not is_correct(p, str(p.result + 1))
    assert parse_answer("12a") is None and parse_answer("-5") == -5 and parse_answer("") is None
    with pytest.raises(ValueError, match="found only"):
        generate_problems(200, seed=0, digits={"+": 1})


def test_noisy_distribution_has_the_correct_answer_as_a_clear_but_uncertain_mode():
    for p in generate_problems(200, seed=2, operations=("+", "*")):
        dist = noisy_answer_distribution(p, p_correct=0.45, num_wrong=5)
        answers, probs = zip(*dist)
        assert answers[0] == p.result and len(set(answers)) == 6
        assert sum(probs) == pytest.approx(1.0)
        assert max(probs[1:]) < probs[0] == 0.45
    with pytest.raises(ValueError, match="as likely"):
        noisy_answer_distribution(train_problem(), p_correct=0.3, num_wrong=1)


def train_problem():
    return ArithmeticProblem(12, "+", 39)


def test_noisy_corpus_frequencies():
    problems = generate_problems(400, seed=4)
    rows = noisy_corpus(problems, completions_per_problem=8, seed=0, p_correct=0.45)
    assert len(rows) == 3200
    correct = np.mean([r["correct"] for r in rows])
    assert abs(correct - 0.45) < 0.03  # 3200 draws: std ~0.009
    assert all(r["correct"] == is_correct(_parse(r["prompt"]), r["completion"]) for r in rows)
    # Mistakes are plausible: mostly within one digit-place of the right answer.
    wrong = [r for r in rows if not r["correct"]]
    assert all(parse_answer(r["completion"]) is not None for r in wrong)
