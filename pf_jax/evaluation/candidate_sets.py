"""Candidate sets for the distribution-matching metric (``evaluation.distribution_match``): for each
held-out prompt, every distinct response seen in many base-model samples, scored exactly by teacher
forcing.

    prompts ──► base samples (n per prompt, sampling.texts.sample_responses) ──► distinct response token
    sequences per prompt ──► CandidateSet (rows in the training layout, texts, lengths, correctness)
    ──► log p(y | q) = sum_t log p(y_t | q, y_<t) over each candidate's response tokens, by the trainer's
    teacher-forced scorer (training.evaluators.sequence_logprobs)

A candidate ends where its sample ended (EOS, a stop string or max_new_tokens), exactly the trajectory
the trainer scores, so log p is the same quantity the TB losses read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pf_jax.data.codec import TextCodec
from pf_jax.data.sequences import SequenceBatch
from pf_jax.evaluation.answer_checkers import AnswerChecker
from pf_jax.evaluation.distribution_match import PromptCandidates
from pf_jax.evaluation.scoring import Problem
from pf_jax.models.decoder import Decoder
from pf_jax.sampling.sampler import GenerationConfig
from pf_jax.sampling.texts import sample_responses


@dataclass
class CandidateSet:
    """The distinct candidates of every prompt: ``chunks`` of rows in the training layout (one chunk per
    sampler call; rows padded to a multiple of ``rows_per_call`` by repeating the first, so the scorer
    compiles once per shape), with per-candidate prompt index, text, length and correctness."""

    chunks: list[SequenceBatch]
    sizes: list[int]  # real rows of each chunk
    prompt_index: np.ndarray  # int[C]
    texts: list[str]
    lengths: np.ndarray  # int[C]
    correct: np.ndarray  # bool[C]
    samples: int

    def per_prompt(self, base_logp: np.ndarray, policy_logp: np.ndarray) -> list[PromptCandidates]:
        """The candidates grouped by prompt with their two sets of scores."""
        return [PromptCandidates(base_logp[rows], policy_logp[rows], self.lengths[rows], self.correct[rows])
                for rows in (np.flatnonzero(self.prompt_index == p) for p in np.unique(self.prompt_index))]


def _distinct_rows(seq: SequenceBatch, groups: np.ndarray) -> np.ndarray:
    """Indices of the first row of each distinct (prompt, response tokens) pair, in order."""
    tokens, mask = np.asarray(seq.response_tokens), np.asarray(seq.response_mask)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    keep = []
    for row in range(tokens.shape[0]):
        key = (int(groups[row]), tuple(tokens[row][mask[row]].tolist()))
        if key not in seen:
            seen.add(key)
            keep.append(row)
    return np.asarray(keep, np.int64)


def _take(seq: SequenceBatch, rows: np.ndarray, multiple: int) -> SequenceBatch:
    padded = np.concatenate([rows, np.full(-len(rows) % multiple, rows[0])])
    return jax.tree_util.tree_map(lambda x: x[jnp.asarray(padded)], seq)


def draw_candidates(base: Decoder, codec: TextCodec, problems: Sequence[Problem], samples: int, key: jax.Array,
                    gen: GenerationConfig, checker: AnswerChecker, *, prompts_per_call: int = 16,
                    rows_per_call: int = 128) -> CandidateSet:
    """``samples`` base samples per problem (the call starting at problem s uses fold_in(key, s)); the
    distinct responses of each problem become its candidates."""
    chunks, sizes, index, texts, lengths, correct = [], [], [], [], [], []
    for start in range(0, len(problems), prompts_per_call):
        part = problems[start : start + prompts_per_call]
        seq, _, sampled_texts, groups = sample_responses(base, codec, [p.prompt for p in part], samples,
                                                         jax.random.fold_in(key, start), gen)
        rows = _distinct_rows(seq, groups)
        chunks.append(_take(seq, rows, rows_per_call))
        sizes.append(len(rows))
        index += [start + int(groups[r]) for r in rows]
        texts += [sampled_texts[r] for r in rows]
        lengths += np.asarray(seq.response_mask).sum(axis=1)[rows].tolist()
        correct += [checker.is_correct(sampled_texts[r], part[int(groups[r])].reference) for r in rows]
    return CandidateSet(chunks, sizes, np.asarray(index), texts, np.asarray(lengths), np.asarray(correct, bool),
                        samples)
