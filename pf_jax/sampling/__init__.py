"""jit-compiled generation with a KV cache, exact log-probs, and power sampling."""

from pf_jax.sampling import continuous  # noqa: F401  (registers rollout.batching "continuous" with generate)
from pf_jax.sampling.filters import SamplingParams, filtered_logits, sample_categorical, sample_next_token
from pf_jax.sampling.power import PowerSamplingConfig, power_generate
from pf_jax.sampling.prompts import bucket_length, left_pad
from pf_jax.sampling.result import FINISH_REASONS, SampleResult
from pf_jax.sampling.sampler import GenerationConfig, generate

__all__ = [
    "FINISH_REASONS",
    "GenerationConfig",
    "PowerSamplingConfig",
    "SampleResult",
    "SamplingParams",
    "bucket_length",
    "filtered_logits",
    "generate",
    "left_pad",
    "power_generate",
    "sample_categorical",
    "sample_next_token",
]
