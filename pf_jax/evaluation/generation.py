"""Sampling methods for evaluation: plain sampling, low-temperature sampling (T = 1/alpha) and power
sampling (MH toward p^alpha), each turned into a ``GenerateFn`` over a model and its codec.

A method is written as ``kind:key=value,...``:

    base:T=1            plain sampling at temperature T (T=0: greedy); also top_p=, top_k=, min_p=
    lowtemp:alpha=4     sampling at T = 1/alpha, the per-token approximation of p^alpha
    power:alpha=4,block=8,steps=4
                        power sampling (Karan & Du 2025): blocks of `block` tokens, `steps` MH moves each
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from pf_jax.config.errors import ConfigError
from pf_jax.data.codec import TextCodec
from pf_jax.models.decoder import Decoder
from pf_jax.sampling.filters import SamplingParams
from pf_jax.sampling.power import PowerSamplingConfig, power_generate
from pf_jax.sampling.result import SampleResult
from pf_jax.sampling.sampler import GenerationConfig, generate

METHOD_KINDS = {
    "base": ("T", "top_p", "top_k", "min_p"),
    "lowtemp": ("alpha", "top_p", "top_k", "min_p"),
    "power": ("alpha", "block", "steps", "top_p", "top_k", "min_p"),
}


@dataclasses.dataclass(frozen=True)
class SamplingMethod:
    """One way to sample responses (see the module doc for the text form)."""

    kind: str
    temperature: float = 1.0
    alpha: float | None = None
    block_size: int | None = None  # power: None = max_new_tokens / 2 when even, else max_new_tokens
    mcmc_steps: int = 4
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def name(self) -> str:
        return self.kind

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)

    def settings(self) -> dict[str, Any]:
        """What the report shows and groups by (alpha drives the alpha-sweep plot)."""
        out: dict[str, Any] = {"temperature": round(self.temperature, 6)}
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.kind == "power":
            out.update(block=self.block_size, steps=self.mcmc_steps)
        for key, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
            if getattr(self, key) != off:
                out[key] = getattr(self, key)
        return out

    def power_config(self, max_new_tokens: int) -> PowerSamplingConfig:
        block = self.block_size or (max_new_tokens // 2 if max_new_tokens % 2 == 0 else max_new_tokens)
        if max_new_tokens % block:
            raise ConfigError(f"method power: block={block} does not divide max_new_tokens={max_new_tokens}")
        assert self.alpha is not None
        return PowerSamplingConfig(alpha=self.alpha, block_size=block, mcmc_steps=self.mcmc_steps)


def parse_sampling_method(text: str) -> SamplingMethod:
    """``kind:key=value,...`` -> SamplingMethod; unknown kinds / keys and bad values are named errors."""
    kind, _, rest = text.strip().partition(":")
    if kind not in METHOD_KINDS:
        raise ConfigError(f"unknown sampling method {kind!r} in {text!r}; expected one of {sorted(METHOD_KINDS)}")
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in METHOD_KINDS[kind]:
            raise ConfigError(f"method {text!r}: {item!r} is not key=value with key in {list(METHOD_KINDS[kind])}")
        values[key] = value

    def number(key: str, cast: Callable[[str], Any], default: Any) -> Any:
        if key not in values:
            return default
        try:
            return cast(values[key])
        except ValueError:
            raise ConfigError(f"method {text!r}: {key}={values[key]!r} is not a valid {cast.__name__}") from None

    filters = dict(top_k=number("top_k", int, 0), top_p=number("top_p", float, 1.0), min_p=number("min_p", float, 0.0))
    if kind == "base":
        method = SamplingMethod("base", temperature=number("T", float, 1.0), **filters)
    else:
        alpha = number("alpha", float, 4.0)
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ConfigError(f"method {text!r}: alpha must be a finite number > 0, got {alpha}")
        method = SamplingMethod(kind, temperature=1.0 / alpha, alpha=alpha, block_size=number("block", int, None),
                                mcmc_steps=number("steps", int, 4), **filters)
    method.sampling_params()  # validates the filters with SamplingParams' own messages
    if method.kind == "power":
        PowerSamplingConfig(alpha=method.alpha or 1.0, block_size=method.block_size or 1, mcmc_steps=method.mcmc_steps)
    return method


@dataclasses.dataclass
class GenerationStats:
    """Filled while a GenerateFn runs: wall seconds, generated tokens and (power) mean acceptance."""

    seconds: float = 0.0
    tokens: int = 0
    acceptance: list[float] = dataclasses.field(default_factory=list)


def model_generate_fn(model: Decoder, codec: TextCodec, method: SamplingMethod, *, max_new_tokens: int,
                      stop_token_ids: Sequence[int] = (), prompts_per_call: int = 16,
                      on_progress: Callable[[int], None] | None = None,
                      stats: GenerationStats | None = None) -> Callable[[Sequence[str], int, jax.Array], list[list[str]]]:
    """A ``scoring.GenerateFn`` sampling ``method`` from ``model``: prompts are encoded with
    ``codec.encode_prompt``, sampled ``prompts_per_call`` prompts at a time (``on_progress(k)`` after
    each group of k prompts), and responses decoded with ``codec.decode_response``."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, sampling=method.sampling_params(),
                              eos_token_ids=tuple(codec.eos_ids), stop_token_ids=tuple(stop_token_ids),
                              pad_token_id=codec.pad_id, min_prompt_bucket=8)
    power = method.power_config(max_new_tokens) if method.kind == "power" else None
    stats = stats if stats is not None else GenerationStats()

    def run(ids: list[list[int]], n: int, key: jax.Array) -> SampleResult:
        if power is None:
            return generate(model, ids, key, config, n=n)
        result, acceptance = power_generate(model, ids, key, config, power, n=n)
        stats.acceptance.append(float(np.mean(np.asarray(acceptance))))
        return result

    def generate_texts(prompts: Sequence[str], n: int, rng: jax.Array) -> list[list[str]]:
        texts: list[list[str]] = []
        for start in range(0, len(prompts), prompts_per_call):
            part = prompts[start : start + prompts_per_call]
            began = time.perf_counter()
            result = run([codec.encode_prompt(p) for p in part], n, jax.random.fold_in(rng, start))
            tokens = result.response_token_lists()
            stats.seconds += time.perf_counter() - began
            stats.tokens += sum(len(t) for t in tokens)
            decoded = [codec.decode_response(t) for t in tokens]
            texts += [decoded[i * n : (i + 1) * n] for i in range(len(part))]
            if on_progress is not None:
                on_progress(len(part))
        return texts

    return generate_texts


def stop_token_ids_for(codec: TextCodec, stops: Sequence[str]) -> tuple[int, ...]:
    """Token ids of stop strings; each must encode to exactly one token (e.g. "\\n")."""
    ids = []
    for text in stops:
        text = text.encode().decode("unicode_escape")  # "\\n" on a command line means a newline
        encoded = [t for t in codec.encode_response(text) if t not in codec.eos_ids]
        if len(encoded) != 1:
            raise ConfigError(f"stop string {text!r} encodes to {len(encoded)} tokens {encoded}; a stop string "
                             "must be exactly one token of this tokenizer")
        ids.append(encoded[0])
    return tuple(ids)
