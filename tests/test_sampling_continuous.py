"""Continuous batching (pf_jax.sampling.continuous) against the static sampler on tiny random models:
the same tokens, log-probs, lengths and finish reasons as a static run with the same per-sample keys,
whatever the slot count, on ragged prompts whose samples end at very different lengths (stop ids, EOS,
max_new_tokens); log-probs equal teacher forcing; the decode program compiles once per sample-count
bucket; slot counts that are not positive or whose KV cache does not fit are one clear error."""

import dataclasses
from collections import Counter

import jax
import numpy as np
import pytest

from pf_jax.config.errors import ConfigError
from pf_jax.models.logprobs import sequence_logprobs
from pf_jax.sampling import GenerationConfig, SamplingParams, generate
from pf_jax.sampling.continuous import _decode_continuous, check_kv_memory, continuous_call
from pf_jax.sampling.slot_caches import DenseSlots, PagedSlots, kv_bytes
from tests.test_sampling_generate import LOGP_TOLERANCE, count_compilations, tiny_model
from tests.test_user_errors import train_fails

PROMPTS = [[5, 9, 2, 33, 7, 1, 18], [4, 40], [12, 3, 60, 21], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
FIELDS = ("tokens", "response_mask", "lengths", "finish_reason", "policy_logprobs", "sampling_logprobs",
          "prompt_tokens", "prompt_mask", "prompt_index")


def static_config(**kw) -> GenerationConfig:
    """Two stop ids and an EOS on a 64-token vocabulary: samples end anywhere from 1 to 12 tokens."""
    return GenerationConfig(max_new_tokens=12, sampling=SamplingParams(**kw), eos_token_ids=(3,),
                            stop_token_ids=(11, 13), min_prompt_bucket=8, sample_keys=True)


def assert_same(a, b) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)


@pytest.mark.parametrize(("arch", "params", "slot_counts"),
                         [("llama", {"temperature": 1.0}, (2, 6)),
                          ("gemma3", {"temperature": 0.8, "top_k": 20, "top_p": 0.95}, (4,))])
def test_continuous_returns_the_static_samples_whatever_the_slot_count(arch, params, slot_counts):
    model = tiny_model(arch, seed=1)
    config = static_config(**params)
    static = generate(model, PROMPTS, jax.random.key(7), config, n=3)
    lengths = np.asarray(static.lengths)
    assert lengths.min() <= 3 and lengths.max() == 12 and len(set(static.finish_reasons)) >= 2, lengths  # ragged
    for slots in slot_counts:
        continuous = generate(model, PROMPTS, jax.random.key(7),
                              dataclasses.replace(config, batching="continuous", slots=slots), n=3)
        assert_same(continuous, static)
    if arch == "llama":  # a chunk of the prompts from its first sample id on: the same samples again (the
        # prefill's batch of 3 prompts instead of 5 rounds differently: log-probs equal to float32 rounding)
        chunk = generate(model, PROMPTS[2:], jax.random.key(7), dataclasses.replace(config, batching="continuous"),
                         n=3, first_sample=6)
        np.testing.assert_array_equal(np.asarray(chunk.tokens), np.asarray(static.tokens)[6:])
        np.testing.assert_allclose(np.asarray(chunk.policy_logprobs), np.asarray(static.policy_logprobs)[6:],
                                   atol=LOGP_TOLERANCE, rtol=0)
    # The log-probs are the policy's: teacher forcing of the sampled sequences (ragged, left-padded).
    tokens, mask = continuous.sequences()
    teacher = np.asarray(sequence_logprobs(model, tokens, mask))[:, continuous.prompt_tokens.shape[1] - 1:]
    response = np.asarray(continuous.response_mask)
    np.testing.assert_allclose(np.asarray(continuous.policy_logprobs)[response], teacher[response],
                               atol=LOGP_TOLERANCE, rtol=0)
    assert np.all(np.asarray(continuous.policy_logprobs)[~response] == 0)


@pytest.mark.parametrize(("arch", "page_size", "pools"), [("llama", 4, (None, 4)), ("gemma3", 3, (5,))])
def test_paged_cache_returns_the_dense_samples(arch, page_size, pools):
    """Shared prompt pages, a pool that holds every slot's worst case (None) or one sample's (4 pages of 4
    tokens for 12 new ones; gemma3: 5 of 3, its sliding window binding), so that growing samples preempt
    the youngest, which start again: the dense cache's tokens, lengths and finish reasons, log-probs to
    float32 rounding (the attention sums over other padding)."""
    model = tiny_model(arch, seed=1)
    config = dataclasses.replace(static_config(temperature=1.0), batching="continuous", slots=4)
    dense = generate(model, PROMPTS, jax.random.key(7), config, n=3)
    for pages in pools:
        paged_config = dataclasses.replace(config, kv_cache="paged", page_size=page_size, kv_pages=pages)
        paged = generate(model, PROMPTS, jax.random.key(7), paged_config, n=3)
        args, kwargs, _ = continuous_call(model, PROMPTS, jax.random.key(7), paged_config.resolved(model), n=3)
        assert (int(_decode_continuous(*args, **kwargs)["preempted"]) > 0) == (pages is not None)
        for name in ("tokens", "response_mask", "lengths", "finish_reason"):
            np.testing.assert_array_equal(np.asarray(getattr(paged, name)), np.asarray(getattr(dense, name)), name)
        np.testing.assert_allclose(np.asarray(paged.policy_logprobs), np.asarray(dense.policy_logprobs),
                                   atol=LOGP_TOLERANCE, rtol=0)


def test_paged_cache_bad_settings_are_one_clear_error():
    config = dataclasses.replace(static_config(temperature=1.0), batching="continuous", kv_cache="paged",
                                 page_size=4, kv_pages=3)
    with pytest.raises(ConfigError, match=r"kv_pages=3 cannot hold one sample: a sample takes up to 4 pages"):
        generate(tiny_model("llama"), PROMPTS, jax.random.key(0), config, n=2)
    with pytest.raises(ConfigError, match="kv_cache=paged is continuous batching's cache"):
        GenerationConfig(kv_cache="paged")


def test_min_new_tokens_and_greedy_match_static():
    model = tiny_model("qwen3", seed=2)
    config = dataclasses.replace(static_config(temperature=0.0), min_new_tokens=4)
    static = generate(model, PROMPTS, jax.random.key(0), config, n=2)
    assert np.asarray(static.lengths).min() >= 4
    assert_same(generate(model, PROMPTS, jax.random.key(0), dataclasses.replace(config, batching="continuous", slots=3),
                         n=2), static)


def test_decode_compiles_once_per_sample_count_bucket():
    model = tiny_model("llama")
    config = GenerationConfig(max_new_tokens=5, min_prompt_bucket=8, batching="continuous", slots=4)
    prompts = PROMPTS[:3]
    before = _decode_continuous._cache_size()
    for n in (1, 3, 4, 5):  # 3, 9, 12, 15 samples: buckets 4, 16, 16, 16
        result = generate(model, prompts, jax.random.key(n), config, n=n)
        assert result.tokens.shape == (3 * n, 5)
    assert _decode_continuous._cache_size() - before == 2
    with count_compilations() as again:
        generate(model, prompts, jax.random.key(9), config, n=4)
    assert len(again) == 0


def test_slots_must_be_positive():
    with pytest.raises(ConfigError, match=r"slots .* must be >= 1, got 0"):
        GenerationConfig(batching="continuous", slots=0)


def test_kv_memory_check_names_the_sizes():
    model = tiny_model("llama")
    need = kv_bytes(model, 8 * (16 + 32))
    check_kv_memory(model, DenseSlots(16, 32), 8, 2, free=need)  # fits exactly
    with pytest.raises(ConfigError, match=r"rollout.slots=8 needs a KV cache .*8 slots x \(16 prompt \+ 32 new tokens\)"):
        check_kv_memory(model, DenseSlots(16, 32), 8, 2, free=need - 1)
    paged = PagedSlots(16, 32, page_size=8, pages=20)  # 2 prompts x 2 pages + 20 + 1 scratch, of 8 tokens each
    check_kv_memory(model, paged, 8, 2, free=kv_bytes(model, 25 * 8))
    with pytest.raises(ConfigError, match=r"25 pages of 8 tokens \(2 prompts x 2 \+ 20 for the samples \+ 1 scratch\)"):
        check_kv_memory(model, paged, 8, 2, free=kv_bytes(model, 25 * 8) - 1)


def test_train_refuses_non_positive_slots(capsys, tmp_path):
    train_fails(capsys, tmp_path, ["rollout.batching=continuous", "rollout.slots=0"], "rollout.slots", ">= 1")


def test_train_refuses_a_paged_cache_without_continuous_batching(capsys, tmp_path):
    train_fails(capsys, tmp_path, ["rollout.kv_cache=paged"], "rollout.kv_cache=paged", "rollout.batching=continuous")


def test_train_refuses_slots_beyond_memory(capsys, tmp_path):
    train_fails(capsys, tmp_path, ["rollout.batching=continuous", "rollout.slots=1000000000000"],
                "rollout.slots=1000000000000 needs a KV cache", "GiB free", "prompt + ")


def test_generate_cli_refuses_non_positive_slots(capsys):
    from pf_jax.generate import main
    from tests.test_user_errors import one_line_exit_2

    code = main(["--prompt", "2+2=", "--batching", "continuous", "--slots", "-1"])
    one_line_exit_2(capsys, "pf_jax.generate", code, "slots", "must be >= 1, got -1")


def test_stop_sequences_end_rows_in_the_loop_as_the_cut_would():
    """A two-token stop sequence ends a row in the decode loop, static and continuous alike (the slot goes
    to the next sample): each row keeps exactly the tokens and log-probs of a run without it, up to the
    token that first completes the sequence, and finishes "stop"."""
    model = tiny_model("llama", seed=1)
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=(3,), min_prompt_bucket=8, sample_keys=True)
    free = generate(model, PROMPTS, jax.random.key(7), config, n=3)
    tokens, lengths = np.asarray(free.tokens), np.asarray(free.lengths)
    pairs = Counter((int(r[j]), int(r[j + 1])) for r, n in zip(tokens, lengths) for j in range(n - 1)
                    if 3 not in r[j : j + 2])
    seq = pairs.most_common(1)[0][0]
    ends = [next((j + 1 for j in range(1, n) if tuple(r[j - 1 : j + 1]) == seq), None) for r, n in zip(tokens, lengths)]
    assert sum(e is not None for e in ends) >= 2 and None in ends, ends
    for batching, slots in (("static", None), ("continuous", 2)):
        cut = generate(model, PROMPTS, jax.random.key(7),
                       dataclasses.replace(config, stop_sequences=(seq,), batching=batching, slots=slots), n=3)
        for row, end in enumerate(ends):
            n = int(lengths[row]) if end is None else end
            assert int(cut.lengths[row]) == n, (batching, row)
            assert cut.finish_reasons[row] == ("stop" if end is not None else free.finish_reasons[row])
            for name in ("tokens", "policy_logprobs", "sampling_logprobs"):
                np.testing.assert_array_equal(np.asarray(getattr(cut, name))[row, :n],
                                              np.asarray(getattr(free, name))[row, :n], err_msg=name)
            assert not np.asarray(cut.response_mask)[row, n:].any()
    for bad in ((), (5, 64)):
        with pytest.raises(ValueError, match="stop_sequences"):
            dataclasses.replace(config, stop_sequences=(bad,)).resolved(model)
