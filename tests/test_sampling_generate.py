"""The compiled sampler against independent computations on tiny random models of every family:
greedy = argmax of repeated full forward passes without a cache; returned log-probs = teacher-forced
log-probs of one full forward pass over the sampled sequences (left-padded, different prompt lengths);
reproducibility; EOS / stop / min_new_tokens; compilation count per prompt bucket."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.models.logprobs import sequence_logprobs
from pf_jax.sampling import GenerationConfig, PowerSamplingConfig, SamplingParams, generate, power_generate
from pf_jax.sampling.filters import filtered_logits

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
PROMPTS = [[5, 9, 2, 33, 7, 1, 18], [4, 40], [12, 3, 60, 21]]  # different lengths -> left padding
LOGP_TOLERANCE = 2e-5  # absolute, float32: cached incremental decode vs one full forward pass


def tiny_model(arch: str, seed: int = 0) -> Decoder:
    extra = {"num_layers": 3, "layer_types": ("sliding", "full", "sliding"), "sliding_window": 6} if arch == "gemma3" else {}
    model = Decoder(ModelConfig.tiny(arch, **extra), rngs=nnx.Rngs(seed))
    # Larger-than-init weights so that the distributions are far from uniform and every parameter matters.
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and var[...].ndim >= 2:
            var[...] = var[...] * 4.0
    return model


def greedy_by_full_forward(model: Decoder, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Independent reference: no cache, the whole sequence through the model at every step (right-padded
    to one fixed length so that the forward pass compiles once; causal attention ignores the padding)."""
    graphdef, state = nnx.split(model)
    total = max(map(len, prompts)) + steps

    @jax.jit
    def next_token(tokens, length):
        model = nnx.merge(graphdef, state)
        hidden, _ = model(tokens, jnp.arange(total)[None], jnp.arange(total)[None] < length)
        return jnp.argmax(model.logits(hidden)[0, length - 1])

    out = []
    for prompt in prompts:
        seq = np.zeros((1, total), np.int32)
        seq[0, : len(prompt)] = prompt
        for t in range(len(prompt), len(prompt) + steps):
            seq[0, t] = int(next_token(jnp.asarray(seq), t))
        out.append(seq[0, len(prompt): len(prompt) + steps].tolist())
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_greedy_equals_argmax_of_full_forward_passes(arch):
    model = tiny_model(arch)
    steps = 10
    config = GenerationConfig(max_new_tokens=steps, sampling=SamplingParams(temperature=0.0), eos_token_ids=(),
                              min_prompt_bucket=8)
    result = generate(model, PROMPTS, jax.random.key(0), config)
    assert result.response_token_lists() == greedy_by_full_forward(model, PROMPTS, steps)
    assert result.finish_reasons == ["length"] * len(PROMPTS)
    np.testing.assert_array_equal(result.lengths, steps)


@pytest.mark.parametrize("arch", FAMILIES)
def test_returned_logprobs_equal_teacher_forced_logprobs(arch):
    model = tiny_model(arch, seed=1)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.95)
    config = GenerationConfig(max_new_tokens=12, sampling=params, eos_token_ids=(3,), min_prompt_bucket=8)
    result = generate(model, PROMPTS, jax.random.key(7), config, n=2)
    tokens, mask = result.sequences()
    n, prompt_len = result.prompt_tokens.shape
    chex.assert_shape(result.tokens, (n, 12))
    assert n == 2 * len(PROMPTS) and prompt_len == 8
    np.testing.assert_array_equal(result.prompt_index, [0, 0, 1, 1, 2, 2])

    teacher = np.asarray(sequence_logprobs(model, tokens, mask))[:, prompt_len - 1:]  # [N, M]
    response = np.asarray(result.response_mask)
    np.testing.assert_allclose(np.asarray(result.policy_logprobs)[response], teacher[response],
                               atol=LOGP_TOLERANCE, rtol=0)
    assert np.all(np.asarray(result.policy_logprobs)[~response] == 0)

    # Sampling log-probs: the same filters applied to teacher-forced logits of the full forward pass.
    hidden, _ = model(tokens, jnp.maximum(jnp.cumsum(mask, -1) - 1, 0), mask)
    logits = model.logits(hidden)[:, prompt_len - 1:-1]  # [N, M, V]
    q = jax.nn.log_softmax(filtered_logits(logits.reshape(-1, logits.shape[-1]), params), -1)
    q = np.asarray(q).reshape(logits.shape)
    q_taken = np.take_along_axis(q, np.asarray(result.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(result.sampling_logprobs)[response], q_taken[response],
                               atol=LOGP_TOLERANCE, rtol=0)
    # Truncation and temperature make the two distributions differ on most tokens.
    assert not np.allclose(np.asarray(result.sampling_logprobs)[response], teacher[response], atol=1e-3)


def test_sampling_is_reproducible_from_the_key_and_samples_differ():
    model = tiny_model("qwen3")
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=())
    a = generate(model, PROMPTS, jax.random.key(3), config, n=3)
    b = generate(model, PROMPTS, jax.random.key(3), config, n=3)
    c = generate(model, PROMPTS, jax.random.key(4), config, n=3)
    for field in ("tokens", "policy_logprobs", "sampling_logprobs", "lengths"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.tokens, c.tokens)
    # The n samples of one prompt share the prefill but not the draws.
    assert not np.array_equal(a.tokens[0], a.tokens[1])


def test_eos_stop_and_min_new_tokens():
    model = tiny_model("llama")
    greedy = SamplingParams(temperature=0.0)
    free = generate(model, PROMPTS[:1], jax.random.key(0), GenerationConfig(10, greedy, eos_token_ids=()))
    free_tokens = free.response_token_lists()[0]
    end = free_tokens[3]
    first = free_tokens.index(end)  # the first occurrence of that token ends the sequence

    eos = generate(model, PROMPTS[:1], jax.random.key(0), GenerationConfig(10, greedy, eos_token_ids=(end,)))
    assert eos.finish_reasons == ["eos"]
    assert eos.response_token_lists()[0] == free_tokens[: first + 1]  # EOS included
    assert int(eos.lengths[0]) == first + 1 == int(eos.response_mask[0].sum())
    assert np.all(np.asarray(eos.tokens[0, first + 1:]) == 0)  # pad id 0 after the end
    assert np.all(np.asarray(eos.policy_logprobs[0, first + 1:]) == 0)
    np.testing.assert_allclose(eos.policy_logprobs[0, : first + 1], free.policy_logprobs[0, : first + 1], atol=1e-6)

    stop = generate(model, PROMPTS[:1], jax.random.key(0),
                    GenerationConfig(10, greedy, eos_token_ids=(), stop_token_ids=(end,), pad_token_id=63))
    assert stop.finish_reasons == ["stop"]
    assert np.all(np.asarray(stop.tokens[0, first + 1:]) == 63)

    late = generate(model, PROMPTS[:1], jax.random.key(0),
                    GenerationConfig(10, greedy, eos_token_ids=(end,), min_new_tokens=first + 2))
    assert end not in late.response_token_lists()[0][: first + 2]
    # The policy log-prob is of the unmodified model; the excluded EOS only changes the sampling side.
    np.testing.assert_allclose(late.policy_logprobs[0, :first], free.policy_logprobs[0, :first], atol=1e-6)


@contextlib.contextmanager
def count_compilations():
    """Counts the executables built inside the block (every jit, including small eager ops): XLA backend
    compilations and loads from the persistent compilation cache (tests/conftest.py turns it on)."""
    events: list[object] = []

    def compiled(event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    def loaded(event: str, **_: object) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(compiled)
    jax.monitoring.register_event_listener(loaded)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
        jax.monitoring.unregister_event_listener(loaded)


def test_compilation_count_is_constant_for_prompts_in_the_same_bucket():
    model = tiny_model("gemma3")
    config = GenerationConfig(max_new_tokens=6, min_prompt_bucket=8)
    with count_compilations() as first:
        generate(model, [[1, 2, 3]], jax.random.key(0), config, n=2)
    assert len(first) >= 2  # at least the prefill and the decode loop
    with count_compilations() as same_bucket:
        for i, prompt in enumerate([[4, 5, 6, 7, 8], [9] * 8, [10, 11]]):  # lengths 5, 8, 2 -> bucket 8
            generate(model, [prompt], jax.random.key(i), config, n=2)
    assert len(same_bucket) == 0
    with count_compilations() as new_bucket:
        generate(model, [[1] * 9], jax.random.key(0), config, n=2)  # length 9 -> bucket 16
    assert len(new_bucket) >= 2


def test_bad_arguments_are_named():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"n \(samples per prompt\)"):
        generate(model, PROMPTS, jax.random.key(0), GenerationConfig(4), n=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], jax.random.key(0), GenerationConfig(4))
    # an out-of-vocabulary id used to be read as another embedding row, silently
    with pytest.raises(ValueError, match=r"prompt 1 has token ids outside the model's vocabulary \[0, 64\): \[-1, 64\]"):
        generate(model, [[1], [3, 64, -1]], jax.random.key(0), GenerationConfig(4))
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside"):
        power_generate(model, [[99]], jax.random.key(0), GenerationConfig(4), PowerSamplingConfig(block_size=2))
    with pytest.raises(ValueError, match="stop_token_ids"):
        generate(model, PROMPTS, jax.random.key(0), GenerationConfig(4, stop_token_ids=(64,)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, PROMPTS, jax.random.key(0), GenerationConfig(600))
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationConfig(4, min_new_tokens=5)
