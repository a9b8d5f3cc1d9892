"""Stop strings (rollout.stop, generate --stop): a response ends at the first token whose text completes
one of them, matched on the decoded text so that a stop spanning several tokens ("\\n\\n" as two "\\n"
tokens, "</answer>" as four) is found, as vLLM and transformers' StopStringCriteria do.

The sampler's compiled loop knows token ids only. It ends a row early on a stop string's own encoding
(stop_token_sequences, GenerationConfig.stop_sequences), which frees the row (continuous batching gives it
to the next sample); a stop completed by another tokenisation of it is found only here. Either way the
sequences are cut here afterwards: the tokens after the completing one become padding (mask False, log-probs 0),
the finish reason becomes "stop", and the text ends with the stop string (kept, as transformers keeps
it; text the completing token adds after the stop is dropped). Tokens before the cut are exactly the
ones an early stop would have produced: each step's draw depends on its own key only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from pf_jax.sampling.result import FINISH_STOP, SampleResult

Decode = Callable[[Sequence[int]], str]


def stop_token_sequences(stops: Sequence[str], encode: Callable[[str], Sequence[int]], decode: Decode
                         ) -> tuple[tuple[int, ...], ...]:
    """Token ids that spell each stop string, for the sampler's loop to end a row on: the string's own
    encoding and its characters' encodings in a row ("\\n\\n" as two "\\n" tokens), each without the tokens
    at either end that add no text (a response encoder's EOS), kept where they decode back to the stop
    exactly (the others are left to the cut). An in-loop end is never before the cut's: its tokens decode
    to text holding the stop."""
    def trimmed(text: str) -> tuple[int, ...]:
        seq = [int(i) for i in encode(text)]
        spelt = decode(seq)  # what trimming keeps
        while len(seq) > 1 and decode(seq[:-1]) == spelt:
            seq = seq[:-1]
        while len(seq) > 1 and decode(seq[1:]) == spelt:
            seq = seq[1:]
        return tuple(seq)

    sequences = {trimmed(s) for s in stops} | {sum((trimmed(c) for c in s), ()) for s in stops}
    return tuple(sorted(seq for seq in sequences if seq and decode(seq) in stops))


def _stop_end(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string to be completed ends in `text` (None: no stop string in it)."""
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return min(ends) if ends else None


def stop_position(tokens: Sequence[int], decode: Decode, stops: Sequence[str]) -> tuple[int, str] | None:
    """(how many tokens to keep: through the one completing a stop string, the text through that stop
    string), or None when the decoded tokens contain none. Binary search over prefixes: log2(n) decodes."""
    if not stops or _stop_end(decode(tokens), stops) is None:
        return None
    low, high = 1, len(tokens)  # decode(tokens[:high]) holds a stop string
    while low < high:
        mid = (low + high) // 2
        if _stop_end(decode(tokens[:mid]), stops) is None:
            low = mid + 1
        else:
            high = mid
    text = decode(tokens[:high])
    return high, text[: _stop_end(text, stops)]


def cut_at_stops(result: SampleResult, decode: Decode, stops: Sequence[str], pad_id: int
                 ) -> tuple[SampleResult, list[str]]:
    """The result with every response cut after the token completing its first stop string (the rest
    `pad_id`), and the responses' texts (cut at the stop string's end where one was found)."""
    lists = result.response_token_lists()
    texts = [decode(t) for t in lists]
    lengths, reason = np.asarray(result.lengths).copy(), np.asarray(result.finish_reason).copy()
    for row, tokens in enumerate(lists):
        found = stop_position(tokens, decode, stops)
        if found is not None:
            lengths[row], texts[row], reason[row] = found[0], found[1], FINISH_STOP
    keep = np.arange(result.tokens.shape[1])[None, :] < lengths[:, None]
    pad = jnp.where(jnp.asarray(keep), result.tokens, pad_id)
    return result.replace(
        tokens=pad, response_mask=result.response_mask & jnp.asarray(keep), lengths=jnp.asarray(lengths, jnp.int32),
        finish_reason=jnp.asarray(reason, jnp.int32),
        policy_logprobs=jnp.where(jnp.asarray(keep), result.policy_logprobs, 0.0),
        sampling_logprobs=jnp.where(jnp.asarray(keep), result.sampling_logprobs, 0.0),
    ), texts


def unescape(text: str) -> str:
    r"""A stop string as typed on a command line: \n, \t and \\ become a newline, a tab and a backslash."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
