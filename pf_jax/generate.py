"""`python -m pf_jax.generate`: sample continuations of prompts from a model and print them.

    python -m pf_jax.generate --model gemma3-270m --prompt "The capital of France" -n 4 --temperature 0.8
    python -m pf_jax.generate --model path/to/hf_dir --prompt "..." --prompt "..." --json

--model takes what pf_jax.models.registry.load_model takes (embedded alias, HF directory, .gguf file,
hub name), and a pf_jax export with its own word or char tokenizer (a trained tiny model's `export/`).
Progress goes to stderr; --json prints one JSON document on stdout and nothing else. A mistake in the
arguments or the model files is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from pf_jax.config.errors import ConfigError, exit_code_of
from pf_jax.phases import show_phases

Encode = Callable[[str], list[int]]
Decode = Callable[[Sequence[int]], str]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pf_jax.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="embedded alias, HF directory, .gguf file or hub name")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-new-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    parser.add_argument("--stop-token-id", type=int, action="append", default=[], help="extra stop token ids")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string, matched on the decoded text across tokens (repeat for several; \\n = newline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batching", choices=["static", "continuous"], default="static",
                        help="continuous: --slots rows at a time, an ended row taking the next waiting sample")
    parser.add_argument("--slots", type=int, default=None, help="continuous batching: rows decoded at once "
                        "(default: one per sample)")
    parser.add_argument("--kv-cache", choices=["dense", "paged"], default="dense",
                        help="continuous batching's KV cache: paged shares each prompt's pages among its samples")
    chat = parser.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap each prompt in the tokenizer's chat template (default: when it has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="plain tokenization")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument("--adapter", default=None,
                        help="a PEFT LoRA adapter directory (e.g. a run's export/adapter) to sample with, merged "
                             "into the --model base")
    return parser.parse_args(argv)


class Loaded(NamedTuple):
    """A --model spec loaded for generation: the Decoder (unrolled layers), prompt -> ids, response text ->
    ids (what the sampler's loop matches stop strings with) and response ids -> text."""

    model: Any
    encode: Encode
    encode_response: Encode
    decode: Decode


def load_for_generation(spec: str, chat: bool | None) -> Loaded:
    """The model and its tokenizer's encoders and decoder for a --model spec."""
    from pf_jax.data.saved_codec import load_codec, own_tokenizer_file

    if Path(spec).is_dir() and own_tokenizer_file(spec) is not None:  # a pf_jax export of a tiny model
        import jax

        from pf_jax.models.hf_io import load_hf_directory
        from pf_jax.models.ops import select_ops

        if chat:
            raise ConfigError(f"--chat: the tokenizer of {spec} ({own_tokenizer_file(spec).name}) has no chat template")
        model = load_hf_directory(spec, scan_layers=False)
        model.ops = select_ops(jax.default_backend())
        codec = load_codec(spec, eos_ids=model.cfg.eos_token_ids)
        return Loaded(model, codec.encode_prompt, codec.encode_response, codec.decode_response)
    from pf_jax.models.registry import load_model
    from pf_jax.sampling.chat import encode_prompt, has_chat_template

    model, tokenizer = load_model(spec, scan_layers=False)  # unrolled layers: the fast CPU decode
    if chat and not has_chat_template(tokenizer):
        raise ConfigError(f"--chat: the tokenizer of {spec} has no chat template; leave out --chat (or pass "
                          "--no-chat) for plain prompts")
    return Loaded(model, lambda text: encode_prompt(tokenizer, text, chat_template=chat),
                  lambda text: tokenizer.encode(text, add_special_tokens=False),
                  lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True))


def with_adapter(model: Any, directory: str) -> Any:
    """The base `model` with a PEFT adapter's weights merged in (W + (alpha / r) A B: the base model's fast
    decode, the adapter's distribution)."""
    from pf_jax.models.lora import merged_model
    from pf_jax.models.peft_io import load_peft_adapter

    return merged_model(load_peft_adapter(model, directory))


def main(argv: list[str] | None = None) -> int:
    """The CLI: exit code 0, or 2 with one line on stderr for a user's mistake (pf_jax.config.errors)."""
    return exit_code_of("pf_jax.generate", lambda: run(parse_args(argv)))


def _generation_config(args: argparse.Namespace):
    """The sampling settings from the flags; a bad one fails before the (slow) model load, naming it."""
    from pf_jax.sampling import GenerationConfig, SamplingParams

    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                  sampling=sampling, stop_token_ids=tuple(args.stop_token_id),
                                  batching=args.batching, slots=args.slots, kv_cache=args.kv_cache)
        if args.num_samples < 1:
            raise ValueError(f"-n (samples per prompt) must be >= 1, got {args.num_samples}")
        if any(not s for s in args.stop):
            raise ValueError("--stop needs a non-empty text")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return config


def run(args: argparse.Namespace) -> int:
    import jax

    from pf_jax.sampling import generate
    from pf_jax.sampling.stops import cut_at_stops, stop_token_sequences, unescape

    config, stops = _generation_config(args), [unescape(s) for s in args.stop]
    show_phases()  # loading weights, dequantising, building kernels: one line each on stderr
    console = Console(stderr=True)
    timings: dict[str, float] = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(f"loading {args.model}", total=None)
        start = time.perf_counter()
        model, encode, encode_response, decode = load_for_generation(args.model, args.chat)
        if stops:  # the loop ends a row on a stop's own tokens (its slot goes to the next sample)
            config = dataclasses.replace(config, stop_sequences=stop_token_sequences(stops, encode_response, decode))
        if args.adapter is not None:
            model = with_adapter(model, args.adapter)
        prompt_ids = [encode(p) for p in args.prompt]
        timings["load_s"] = time.perf_counter() - start
        total = len(prompt_ids) * args.num_samples
        progress.update(task, description=f"sampling {total} sequences of up to {args.max_new_tokens} tokens "
                                          "(first call compiles)")
        start = time.perf_counter()
        result = generate(model, prompt_ids, jax.random.key(args.seed), config, n=args.num_samples)
        jax.block_until_ready(result.tokens)
        texts = [decode(t) for t in result.response_token_lists()]
        if stops:  # and every response is cut after the token completing its first stop string, however spelt
            result, texts = cut_at_stops(result, decode, stops, config.resolved(model).pad_token_id)
        timings["generate_s"] = time.perf_counter() - start
        progress.update(task, description="done")
    samples = _samples(args, result, prompt_ids, texts)
    timings["tokens_per_s"] = sum(s["num_tokens"] for s in samples) / timings["generate_s"]
    if args.json:
        print(json.dumps({"model": args.model, "seed": args.seed, "config": dataclasses.asdict(config),
                          "samples": samples, "timing": timings}))
    else:
        _print_samples(samples, timings, console)
    return 0


def _samples(args: argparse.Namespace, result, prompt_ids: list[list[int]], texts: list[str]) -> list[dict[str, Any]]:
    """One record per sampled sequence: its prompt, text, tokens, finish reason and both log-probs."""
    import numpy as np

    policy, sampled = np.asarray(result.policy_logprobs), np.asarray(result.sampling_logprobs)
    samples: list[dict[str, Any]] = []
    for row, tokens in enumerate(result.response_token_lists()):
        prompt = int(result.prompt_index[row])
        samples.append({
            "prompt_index": prompt,
            "prompt": args.prompt[prompt],
            "prompt_tokens": prompt_ids[prompt],
            "sample": row % args.num_samples,
            "text": texts[row],
            "tokens": tokens,
            "finish_reason": result.finish_reasons[row],
            "num_tokens": len(tokens),
            "policy_logprobs": policy[row, : len(tokens)].tolist(),
            "sampling_logprobs": sampled[row, : len(tokens)].tolist(),
        })
    return samples


def _print_samples(samples: list[dict[str, Any]], timings: dict[str, float], console: Console) -> None:
    out = Console()
    for s in samples:
        out.rule(f"prompt {s['prompt_index']} · sample {s['sample']} · {s['num_tokens']} tokens · "
                 f"{s['finish_reason']} · log p = {sum(s['policy_logprobs']):.2f}")
        out.print(s["prompt"] + s["text"], highlight=False, markup=False)
    generated = sum(s["num_tokens"] for s in samples)
    console.print(f"{generated} tokens in {timings['generate_s']:.2f}s ({timings['tokens_per_s']:.1f} tok/s, "
                  f"first call includes compilation); model load {timings['load_s']:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
