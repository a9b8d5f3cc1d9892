"""How far a policy's distribution is from PowerFlow's target, measured exactly on a finite candidate set.

For one prompt the candidate set Y is every distinct response seen in many base-model samples
(``evaluation.candidate_sets``), each scored by teacher forcing: log p_base(y), log pi(y), its length |y|
in tokens and whether its answer is right. On Y every distribution is renormalised,

    pi_Y(y) = pi(y) / sum_{y' in Y} pi(y'),

and compared with two targets (pf_jax.losses, /work/shared/methods/powerflow.md):

    power target        t(y)  ∝ p_base(y)^alpha
    length-tilted       t_l(y) ∝ p_base(y)^alpha exp(-lambda |y|)   the fixed point of length-aware TB, the
                        minimum-KL correction of t under an expected-length constraint; lambda is set so
                        that t_l's mean length on Y is the policy's (``length_tilted_log_target``); with
                        every candidate of one length it is t itself

by total variation, KL(target || policy) and the pairwise inversion rate (the share of candidate pairs
the policy orders differently from the target). Set accuracy is the probability mass a distribution puts
on right answers within Y. Everything here is host numpy on per-prompt arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax

from pf_jax.evaluation.accuracy import bootstrap_interval


def renormalise(log_weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Probabilities on the set from unnormalised log-weights (a log-softmax, so any shared offset, e.g.
    log Z, cancels)."""
    return np.exp(log_softmax(np.asarray(log_weights, dtype=np.float64)))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """TV(p, q) = (1/2) sum_y |p(y) - q(y)|, in [0, 1]."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def kl_divergence(log_p: np.ndarray, log_q: np.ndarray) -> float:
    """KL(p || q) = sum_y p(y) (log p(y) - log q(y)) in nats, from normalised log-probabilities (so a
    candidate whose probability underflows float64 still counts exactly)."""
    log_p, log_q = np.asarray(log_p, np.float64), np.asarray(log_q, np.float64)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def inversion_rate(policy_scores: np.ndarray, target_scores: np.ndarray) -> float:
    """Share of candidate pairs whose order under the policy disagrees with their order under the target:

        inv = (1/|S|) sum_{(i,j) in S} [sign(pi_i - pi_j) != sign(t_i - t_j)],  S = {i < j : t_i != t_j}

    a policy tie counts 1/2. Scores may be log-probs or probabilities (only the order matters). NaN when
    no pair is ordered by the target (fewer than two candidates, or all tied)."""
    a, b = np.asarray(policy_scores, np.float64), np.asarray(target_scores, np.float64)
    i, j = np.triu_indices(a.size, k=1)
    target = np.sign(b[i] - b[j])
    ordered = target != 0
    if not ordered.any():
        return float("nan")
    policy = np.sign(a[i] - a[j])[ordered]
    disagree = np.where(policy == 0, 0.5, (policy != target[ordered]).astype(np.float64))
    return float(disagree.mean())


def length_tilted_log_target(log_target: np.ndarray, lengths: np.ndarray, mean_length: float,
                             bound: float = 50.0) -> np.ndarray:
    """log t_l(y) = log t(y) - lambda |y| (unnormalised), lambda chosen by bisection so that the mean
    length under t_l on the set equals ``mean_length`` (decreasing in lambda, so one root); lambda is
    clipped to [-bound, bound] nats per token when the mean length sits at the set's shortest or longest."""
    log_target, lengths = np.asarray(log_target, np.float64), np.asarray(lengths, np.float64)
    if np.ptp(lengths) == 0:
        return log_target

    def mean_under(lam: float) -> float:
        return float(renormalise(log_target - lam * lengths) @ lengths)

    low, high = -bound, bound
    for _ in range(80):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if mean_under(mid) > mean_length else (low, mid)
    return log_target - 0.5 * (low + high) * lengths


@dataclass
class PromptCandidates:
    """One prompt's candidate set: sequence log-probs (sum over response tokens) under the base and the
    policy, lengths in tokens, and which candidates are right."""

    base_logp: np.ndarray  # float[C]
    policy_logp: np.ndarray  # float[C]
    lengths: np.ndarray  # int[C]
    correct: np.ndarray  # bool[C]


def prompt_match(c: PromptCandidates, alpha: float, length_tilt: bool) -> dict[str, float]:
    """The per-prompt distances and set accuracies (see the module doc)."""
    log_policy = log_softmax(np.asarray(c.policy_logp, np.float64))
    policy = np.exp(log_policy)
    log_target = alpha * np.asarray(c.base_logp, np.float64)
    target = renormalise(log_target)
    out = {"tv": total_variation(target, policy), "kl": kl_divergence(log_softmax(log_target), log_policy),
           "inversion_rate": inversion_rate(c.policy_logp, log_target),
           "target_accuracy": float(target @ c.correct), "policy_accuracy": float(policy @ c.correct),
           "base_accuracy": float(renormalise(c.base_logp) @ c.correct), "candidates": float(len(c.lengths))}
    if length_tilt:
        tilted_log = length_tilted_log_target(log_target, c.lengths, float(policy @ c.lengths))
        tilted = renormalise(tilted_log)
        out.update(tv_tilted=total_variation(tilted, policy),
                   kl_tilted=kl_divergence(log_softmax(tilted_log), log_policy),
                   inversion_rate_tilted=inversion_rate(c.policy_logp, tilted_log),
                   tilted_accuracy=float(tilted @ c.correct))
    return out


def distribution_match(sets: Sequence[PromptCandidates], alpha: float, length_tilt: bool = False
                       ) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Per-prompt metrics averaged over prompts (inversion rates over the prompts with an ordered pair),
    and their 95% bootstrap intervals over prompts."""
    if not sets:
        raise ValueError("distribution_match: no candidate sets")
    rows = [prompt_match(c, alpha, length_tilt) for c in sets]
    metrics, intervals = {}, {}
    for name in rows[0]:
        values = np.array([r[name] for r in rows])
        values = values[np.isfinite(values)]
        metrics[name] = float(values.mean()) if values.size else float("nan")
        if values.size:
            intervals[name] = bootstrap_interval(values)
    return metrics, intervals
