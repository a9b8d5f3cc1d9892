"""The sampler on the embedded Gemma 3 270M (float32): greedy equals argmax of repeated full forward
passes without a cache (16 tokens, a left-padded batch), and sampled sequences' log-probs equal the
teacher-forced log-probs of one full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.models.logprobs import sequence_logprobs
from pf_jax.models.registry import load_model
from pf_jax.sampling import GenerationConfig, SamplingParams, generate

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]
STEPS = 16
LOGP_TOLERANCE = 1e-4  # absolute, float32, 18 layers and a 262k vocabulary: cached decode vs full forward


@pytest.fixture(scope="module")
def gemma():
    model, tokenizer = load_model("gemma3-270m", scan_layers=False)
    return model, [tokenizer(p).input_ids for p in PROMPTS]


def test_greedy_equals_argmax_of_full_forward_passes(gemma):
    model, prompt_ids = gemma
    config = GenerationConfig(max_new_tokens=STEPS, sampling=SamplingParams(temperature=0.0), eos_token_ids=())
    ours = generate(model, prompt_ids, jax.random.key(0), config).response_token_lists()

    graphdef, state = nnx.split(model)
    total = max(map(len, prompt_ids)) + STEPS

    @jax.jit
    def next_token(state, tokens, length):  # full forward, no cache; right padding is invisible to causal attention
        m = nnx.merge(graphdef, state)  # the weights an argument, not 1 GB of constants in the program
        hidden, _ = m(tokens, jnp.arange(total)[None], jnp.arange(total)[None] < length)
        return jnp.argmax(m.logits(jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1))[0, 0])

    for row, prompt in enumerate(prompt_ids):
        seq = np.zeros((1, total), np.int32)
        seq[0, : len(prompt)] = prompt
        for t in range(len(prompt), len(prompt) + STEPS):
            seq[0, t] = int(next_token(state, jnp.asarray(seq), t))
        assert ours[row] == seq[0, len(prompt): len(prompt) + STEPS].tolist(), row


def test_sampled_logprobs_equal_teacher_forced(gemma):
    model, prompt_ids = gemma
    config = GenerationConfig(max_new_tokens=STEPS, sampling=SamplingParams(temperature=1.0))
    result = generate(model, prompt_ids, jax.random.key(1), config, n=2)
    tokens, mask = result.sequences()
    prompt_len = result.prompt_tokens.shape[1]
    teacher = np.asarray(sequence_logprobs(model, tokens, mask))[:, prompt_len - 1:]
    response = np.asarray(result.response_mask)
    np.testing.assert_allclose(np.asarray(result.policy_logprobs)[response], teacher[response],
                               atol=LOGP_TOLERANCE, rtol=0)
    np.testing.assert_array_equal(result.sampling_logprobs, result.policy_logprobs)  # T = 1, no truncation
