"""Instruction prompt rows (synthetic sources, curriculum / IFEval jsonl), the curriculum iterator, the
word-level codec, and the reward model's binary cross-entropy."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pf_jax.config import DataConfig
from pf_jax.data.rows import BadRowError
from pf_jax.data.saved_codec import load_codec
from pf_jax.data.word_codec import WordCodec, WordTokenizer, split_words
from pf_jax.losses import binary_cross_entropy_loss
from pf_jax.tasks.instructions.constraints import constraints_from_row
from pf_jax.tasks.instructions.curriculum import CurriculumPromptSource, linear_level_ramp
from pf_jax.tasks.instructions.reward import InstructionReward
from pf_jax.tasks.instructions.rows import (
    CurriculumBatches,
    instruction_source_kind,
    instruction_vocabulary_texts,
    load_instruction_rows,
    synthetic_instructions,
    write_jsonl,
)

TOKENIZER = WordTokenizer.from_texts(instruction_vocabulary_texts())


def test_synthetic_sources_give_every_level_and_hard_only_drops_soft():
    rows = load_instruction_rows(DataConfig(source="instructions_synthetic"), num_synthetic=8)
    ins = synthetic_instructions("instructions_synthetic", "train", 8)
    assert len(rows) == sum(len(i.constraints) for i in ins)
    for r in rows:
        assert len(r["constraints"]) == r["level"] and r["prompt"].startswith("Write a short note about")
        assert len(constraints_from_row(r)) == r["level"]
    hard = load_instruction_rows(DataConfig(source="instructions_synthetic_hard"), num_synthetic=8)
    assert hard and all("text" not in c for r in hard for c in r["constraints"])
    assert len(hard) < len(rows)


def test_curriculum_jsonl_bad_rows_are_counted_or_stop(tmp_path):
    good = {"id": "g", "task": "Write about a cat.", "constraints": [
        {"id": "punctuation:no_comma"}, {"text": "Be cheerful."}]}
    unknown = {"id": "u", "task": "Write.", "constraints": [{"id": "punctuation:no_commas"}]}
    malformed = {"id": "m", "task": "Write.", "constraints": [
        {"id": "length_constraints:number_words", "kwargs": {"num_words": "ten", "relation": "less than"}}]}
    path = write_jsonl([good, unknown, malformed], tmp_path / "c.jsonl")
    cfg = DataConfig(source=str(path))
    assert instruction_source_kind(cfg) == "curriculum_jsonl"
    rows = load_instruction_rows(cfg)
    assert [r["level"] for r in rows] == [1, 2] and {r["instruction_id"] for r in rows} == {"g"}
    with pytest.raises(BadRowError, match=r"bad row 1 .*unknown constraint id 'punctuation:no_commas'"):
        load_instruction_rows(DataConfig(source=str(path), on_bad_row="stop"))
    assert instruction_source_kind(DataConfig(source="arithmetic")) is None


def test_curriculum_batches_follow_the_schedule_shard_and_resume():
    ins = synthetic_instructions("instructions_synthetic", "train", 16)
    source = CurriculumPromptSource(ins, linear_level_ramp(1, 4, 3), seed=5)
    whole = CurriculumBatches(source, 8)
    parts = [CurriculumBatches(source, 8, process_index=p, process_count=2) for p in range(2)]
    for step in range(5):
        batch = whole.next_batch()
        assert max(r["level"] for r in batch) <= min(1 + step, 4)
        assert parts[0].next_batch() + parts[1].next_batch() == batch
    state = whole.state
    after = [whole.next_batch() for _ in range(2)]
    fresh = CurriculumBatches(source, 8)
    fresh.restore(state)
    assert [fresh.next_batch() for _ in range(2)] == after
    other = CurriculumBatches(CurriculumPromptSource(ins[:4], seed=5), 8)
    with pytest.raises(ValueError, match="saved for 16 instructions"):
        other.restore(state)


@settings(max_examples=25)
@given(st.lists(st.sampled_from(TOKENIZER.words), min_size=1, max_size=20))
def test_word_codec_round_trips_vocabulary_tokens(tokens):
    ids = TOKENIZER.encode(" ".join(tokens))
    assert ids == [TOKENIZER.encode(t)[0] for t in tokens]
    assert split_words(TOKENIZER.decode(ids)) == tokens


def test_word_codec_unknown_words_specials_and_save(tmp_path):
    codec = WordCodec(TOKENIZER)
    ids = codec.encode_response("The zebra was lovely.")
    assert ids[-1] == codec.eos_ids[0] and TOKENIZER.unk_id in ids
    assert codec.decode_response(ids) == "The <unk> was lovely."
    assert codec.encode_prompt("dog")[0] == TOKENIZER.bos_id
    codec.save(tmp_path)
    again = load_codec(tmp_path)
    assert isinstance(again, WordCodec) and again.tokenizer.words == TOKENIZER.words
    with pytest.raises(ValueError, match="single words"):
        WordTokenizer(["two words"])
    with pytest.raises(ValueError, match="outside the word vocabulary"):
        codec.decode_response([TOKENIZER.vocab_size])
    (tmp_path / "pf_jax_word_tokenizer.json").write_text('{"type": "letters", "words": []}')
    with pytest.raises(ValueError, match=r"expected \{'type': one of \['maze-word', 'words'\]"):
        load_codec(tmp_path)


def test_every_synthetic_prompt_is_in_the_word_vocabulary():
    for split in ("train", "test"):
        for r in load_instruction_rows(DataConfig(source="instructions_synthetic", split=split)):
            assert TOKENIZER.unk_id not in TOKENIZER.encode(r["prompt"]), r["prompt"]


@settings(max_examples=25)
# float32 values without subnormals: XLA on CPU flushes those to zero, so the sign the loss sees differs
@given(st.lists(st.tuples(st.floats(-20, 20, width=32, allow_subnormal=False), st.integers(0, 1), st.integers(0, 1)),
                min_size=1, max_size=8))
def test_binary_cross_entropy_matches_the_log_likelihood(items):
    z = np.array([i[0] for i in items], np.float32).astype(np.float64)  # the values the loss sees
    y = np.array([i[1] for i in items], np.float64)
    w = np.array([i[2] for i in items], np.float64)
    p = 1 / (1 + np.exp(-z))
    nll = -(y * np.log(p + 1e-300) + (1 - y) * np.log(1 - p + 1e-300))
    nll = np.where(np.isfinite(nll), nll, np.abs(z))  # saturated sigmoid: -log s(-|z|) ~ |z|
    loss, m = binary_cross_entropy_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(w))
    want = (w * nll).sum() / max(w.sum(), 1e-8)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-4)
    acc = (w * ((z > 0) == y)).sum() / max(w.sum(), 1e-8)
    np.testing.assert_allclose(float(m["accuracy"]), acc, atol=1e-6)


def test_level_metrics_come_from_dict_rows():
    rows = load_instruction_rows(DataConfig(source="instructions_synthetic_hard"), num_synthetic=4)
    out = InstructionReward()(rows, ["a note about the garden"] * len(rows))
    metrics = out.metrics()
    assert {f"reward/level_{r['level']}" for r in rows} == {k for k in metrics if k.startswith("reward/level_")}
