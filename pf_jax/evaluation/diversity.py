"""Diversity of a set of responses to one prompt: distinct-n, self-BLEU, semantic (embedding) diversity,
and for short-answer tasks (where n-gram measures are empty) the spread of the extracted final answers:
distinct answers and answer entropy.

Lexical metrics work on whitespace tokens (lower-cased), so they do not depend on any model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats


def whitespace_tokens(text: str) -> list[str]:
    """Lower-cased whitespace tokens, the unit of distinct-n and self-BLEU."""
    return text.lower().split()


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
    Models", arXiv 1510.03055): unique n-grams over total n-grams, pooled across all texts.

        distinct-n = |set of n-grams in all texts| / (number of n-grams in all texts)

    Returns 0.0 when the texts hold no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams = [g for text in texts for g in _ngrams(whitespace_tokens(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str], max_order: int = 4) -> float:
    """Self-BLEU (Zhu et al. 2018, "Texygen", arXiv 1802.01886): each text is scored by sentence BLEU
    against all the other texts as references, and the scores are averaged. Higher = less diverse.

        self-BLEU = (1/N) sum_i BLEU(hyp = text_i, refs = {text_j : j != i})
        BLEU = BP * exp(sum_{m=1}^{M} (1/M) log p_m),  BP = min(1, exp(1 - r/c))

    p_m is the clipped m-gram precision; smoothing is Chen & Cherry (2014) method 1 (epsilon 0.1 added
    to zero counts), via nltk.translate.bleu_score; a hypothesis sharing no unigram with its references
    scores 0. Needs at least 2 texts.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if len(texts) < 2:
        raise ValueError(f"self_bleu needs at least 2 texts, got {len(texts)}")
    tokenized = [whitespace_tokens(t) for t in texts]
    weights = tuple([1.0 / max_order] * max_order)
    smoothing = SmoothingFunction().method1
    scores = []
    for i, hypothesis in enumerate(tokenized):
        references = [ref for j, ref in enumerate(tokenized) if j != i]
        scores.append(sentence_bleu(references, hypothesis, weights=weights, smoothing_function=smoothing))
    return float(np.mean(scores))


def mean_pairwise_cosine_distance(embeddings: jax.Array) -> jax.Array:  # [N, D] -> []
    """Semantic diversity: mean over unordered pairs i < j of the cosine distance of the embeddings.

        div = (2 / (N (N-1))) sum_{i<j} (1 - <e_i, e_j> / (|e_i| |e_j|))

    Used by the PowerFlow paper (arXiv 2603.18363) for creative writing with sentence embeddings.
    Needs N >= 2.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"mean_pairwise_cosine_distance needs [N>=2, D] embeddings, got {embeddings.shape}")
    unit = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
    cosine = unit @ unit.T
    n = embeddings.shape[0]
    off_diagonal_sum = jnp.sum(cosine) - jnp.trace(cosine)
    return 1.0 - off_diagonal_sum / (n * (n - 1))


def distinct_answers(answer_keys: Sequence[str | None]) -> int:
    """Number of distinct extracted answers among one problem's responses (None = no answer, not counted)."""
    return len({key for key in answer_keys if key is not None})


def answer_entropy(answer_keys: Sequence[str | None]) -> float:
    """Entropy in nats of the empirical distribution of one problem's extracted answers (responses with
    no answer left out; 0.0 when at most one distinct answer was given):

        H = -sum_a f_a log f_a,   f_a = #{j : answer_j = a} / #{j : answer_j is not None}
    """
    counts = np.unique([key for key in answer_keys if key is not None], return_counts=True)[1]
    return float(stats.entropy(counts)) if counts.size > 1 else 0.0
