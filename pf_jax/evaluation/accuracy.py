"""Accuracy over n sampled responses per problem: avg@k, majority@k, pass@k (unbiased) and curves over k.

All functions take per-problem arrays: ``correct: bool[P, n]`` (response j of problem i is right) and,
for majority voting, ``answer_keys: list[list[str | None]]`` (the extracted final answers, already
normalised by the checker; ``None`` = no answer found). They run on host numpy: the inputs come from
string checkers, not from a jitted graph.

Each metric is a mean over problems of a per-problem value (``*_per_problem``), so its uncertainty is
given by ``bootstrap_interval``: a 95% percentile-bootstrap interval resampling problems.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats


def _check_k(k: int, n: int, what: str) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1 or k > n:
        raise ValueError(f"{what}: k must be an integer in [1, n={n}], got {k!r}")


def _as_correct_matrix(correct: Sequence[Sequence[bool]] | np.ndarray, what: str) -> np.ndarray:
    matrix = np.asarray(correct)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"{what}: correct must be a [problems, samples] array with samples >= 1, "
                         f"got shape {matrix.shape}")
    return matrix.astype(bool)


def pass_at_k(num_samples: np.ndarray | int, num_correct: np.ndarray | int, k: int) -> np.ndarray:
    """Unbiased pass@k estimator per problem (Chen et al. 2021, "Evaluating Large Language Models Trained
    on Code", arXiv 2107.03374, Eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k)
               = 1 - prod_{i = n-c+1}^{n} (1 - k / i)      (numerically stable product form)

    and exactly 1 when n - c < k (every k-subset holds a correct sample).

    Args:
      num_samples: int[P] (or scalar) n, samples drawn per problem.
      num_correct: int[P] (or scalar) c, correct samples per problem, 0 <= c <= n.
      k: subset size, 1 <= k <= min(n).
    Returns:
      float64[P] (or a 0-d array) pass@k per problem.
    """
    n_arr = np.atleast_1d(np.asarray(num_samples, dtype=np.int64))
    c_arr = np.broadcast_to(np.atleast_1d(np.asarray(num_correct, dtype=np.int64)), n_arr.shape)
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError(f"pass_at_k: num_correct must lie in [0, num_samples]; got c={c_arr}, n={n_arr}")
    _check_k(k, int(n_arr.min()), "pass_at_k")
    out = np.empty(n_arr.shape, dtype=np.float64)
    for idx, (n, c) in enumerate(zip(n_arr, c_arr)):
        if n - c < k:
            out[idx] = 1.0
        else:
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64))
    return out if np.ndim(num_samples) or np.ndim(num_correct) else out.reshape(())


def pass_at_k_curve(correct: Sequence[Sequence[bool]] | np.ndarray, ks: Sequence[int] | None = None
                    ) -> dict[int, float]:
    """Mean over problems of the unbiased pass@k (see ``pass_at_k``) for each k in ``ks``.

    Args:
      correct: bool[P, n].
      ks: subset sizes; default the powers of two up to n, plus n itself.
    Returns:
      {k: mean pass@k}.
    """
    matrix = _as_correct_matrix(correct, "pass_at_k_curve")
    n = matrix.shape[1]
    if ks is None:
        ks = sorted({*(2**i for i in range(int(np.log2(n)) + 1)), n})
    num_correct = matrix.sum(axis=1)
    num_samples = np.full_like(num_correct, n)
    return {int(k): float(pass_at_k(num_samples, num_correct, int(k)).mean()) for k in ks}


def avg_per_problem(correct: Sequence[Sequence[bool]] | np.ndarray, k: int | None = None) -> np.ndarray:
    """float64[P]: each problem's accuracy over its first k samples (k defaults to n)."""
    matrix = _as_correct_matrix(correct, "avg_at_k")
    k = matrix.shape[1] if k is None else k
    _check_k(k, matrix.shape[1], "avg_at_k")
    return matrix[:, :k].mean(axis=1)


def avg_at_k(correct: Sequence[Sequence[bool]] | np.ndarray, k: int | None = None) -> float:
    """avg@k: mean accuracy over the first k samples of each problem, averaged over problems.

        avg@k = (1/P) sum_i (1/k) sum_{j<k} correct[i, j]

    Args:
      correct: bool[P, n]; k defaults to n.
    """
    return float(avg_per_problem(correct, k).mean())


def pass_per_problem(correct: Sequence[Sequence[bool]] | np.ndarray, k: int) -> np.ndarray:
    """float64[P]: each problem's unbiased pass@k (see ``pass_at_k``) from its n samples."""
    matrix = _as_correct_matrix(correct, "pass_per_problem")
    num_correct = matrix.sum(axis=1)
    return pass_at_k(np.full_like(num_correct, matrix.shape[1]), num_correct, k)


def bootstrap_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of per-problem values (scipy.stats.bootstrap, problems
    resampled with replacement, ``resamples`` times, a fixed seed so a report is reproducible).

    Degenerate cases give the point itself, (m, m): one problem, or every problem with the same value
    (all right, all wrong), where every resample has the same mean.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_interval: no values")
    mean = float(v.mean())
    if v.size < 2 or np.all(v == v[0]):
        return mean, mean
    res = stats.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=resamples,
                          method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def majority_vote(answer_keys: Sequence[str | None],
                  equivalent: Callable[[str, str], bool] | None = None) -> int | None:
    """Index of a response that carries the most common answer, or None when no response has an answer.

    Answers are grouped first by identical key, then distinct keys are merged when ``equivalent(a, b)``
    holds against a group's first key (so ``1/2`` and ``0.5`` vote together under a math checker). Ties
    go to the group whose first member came first, so the vote is deterministic.

    Args:
      answer_keys: the k extracted answers of one problem (None = no answer).
      equivalent: answer equivalence; default exact string equality.
    """
    groups: list[tuple[str, int, int]] = []  # (representative key, first index, size)
    for index, key in enumerate(answer_keys):
        if key is None:
            continue
        for g, (rep, first, size) in enumerate(groups):
            if key == rep or (equivalent is not None and equivalent(rep, key)):
                groups[g] = (rep, first, size + 1)
                break
        else:
            groups.append((key, index, 1))
    if not groups:
        return None
    best = max(groups, key=lambda group: (group[2], -group[1]))
    return best[1]


def majority_at_k(answer_keys: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]] | np.ndarray,
                  k: int | None = None, equivalent: Callable[[str, str], bool] | None = None) -> float:
    """majority@k: fraction of problems whose majority answer over the first k samples is correct.

        maj@k = (1/P) sum_i correct[i, argmax_a #{j < k : answer[i, j] ~ a}]

    A problem where none of the k samples has an answer counts as wrong.

    Args:
      answer_keys: [P][n] extracted answers; correct: bool[P, n]; k defaults to n.
      equivalent: answer equivalence used to merge votes (see ``majority_vote``).
    """
    return float(majority_per_problem(answer_keys, correct, k, equivalent).mean())


def majority_per_problem(answer_keys: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]] | np.ndarray,
                         k: int | None = None, equivalent: Callable[[str, str], bool] | None = None
                         ) -> np.ndarray:
    """float64[P]: 1 where the problem's majority answer over its first k samples is correct (see
    ``majority_at_k``), else 0."""
    matrix = _as_correct_matrix(correct, "majority_at_k")
    if len(answer_keys) != matrix.shape[0] or any(len(row) != matrix.shape[1] for row in answer_keys):
        raise ValueError(f"majority_at_k: answer_keys must be [{matrix.shape[0]}][{matrix.shape[1]}] "
                         f"like correct; got {len(answer_keys)} rows of lengths "
                         f"{sorted({len(row) for row in answer_keys})}")
    k = matrix.shape[1] if k is None else k
    _check_k(k, matrix.shape[1], "majority_at_k")
    wins = []
    for keys, row in zip(answer_keys, matrix):
        winner = majority_vote(list(keys)[:k], equivalent)
        wins.append(float(winner is not None and bool(row[winner])))
    return np.asarray(wins)
