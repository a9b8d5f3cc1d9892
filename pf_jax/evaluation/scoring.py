"""From responses to metrics: one method (a sampler setting) evaluated on one problem set.

Data flow (each arrow a plain data structure):

    problems ──► generate(prompts, n, rng) -> texts [P][n] ──► checker (correct bool[P, n],
    answer keys [P][n]) ──► accuracy (avg@n, maj@n, pass@k curve) + diversity (per prompt, averaged)
    ──► MethodResult ──► report (table, JSON, plots, Markdown)

``generate`` is any function with that signature — plain sampling at a temperature, low-temperature
sampling (T = 1/alpha), power sampling, a PowerFlow-trained policy — so evaluation never depends on
which sampler produced the texts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pf_jax.evaluation.accuracy import (
    avg_per_problem,
    bootstrap_interval,
    majority_per_problem,
    pass_at_k_curve,
    pass_per_problem,
)
from pf_jax.evaluation.answer_checkers import AnswerChecker
from pf_jax.evaluation.diversity import (
    answer_entropy,
    distinct_answers,
    distinct_n,
    mean_pairwise_cosine_distance,
    self_bleu,
    whitespace_tokens,
)

GenerateFn = Callable[[Sequence[str], int, jax.Array], Sequence[Sequence[str]]]
"""generate(prompts [P], n, rng) -> texts [P][n]: n sampled responses per prompt."""

Embedder = Callable[[Sequence[str]], np.ndarray]
"""texts [N] -> embeddings float[N, D] (e.g. evaluation.sentence_encoder.SentenceEmbedder)."""


@dataclass(frozen=True)
class Problem:
    """One evaluation item: the prompt shown to the model and the reference the checker needs."""

    prompt: str
    reference: Any
    problem_id: str = ""


@dataclass
class MethodResult:
    """Everything measured for one method on one problem set (JSON-serialisable via ``to_json``)."""

    name: str
    settings: dict[str, Any]
    responses: list[list[str]]
    correct: np.ndarray  # bool[P, n]
    answer_keys: list[list[str | None]]
    metrics: dict[str, float] = field(default_factory=dict)
    pass_at_k: dict[int, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% bootstrap over problems

    def to_json(self, include_responses: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "settings": self.settings, "metrics": self.metrics,
            "intervals": {k: list(v) for k, v in self.intervals.items()},
            "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()},
            "num_problems": int(self.correct.shape[0]), "samples_per_problem": int(self.correct.shape[1]),
        }
        if include_responses:
            out["responses"] = self.responses
            out["correct"] = self.correct.astype(int).tolist()
            out["answer_keys"] = self.answer_keys
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MethodResult:
        """A result read back from `to_json(include_responses=False)`: metrics and pass@k, no responses."""
        return cls(name=data["name"], settings=data["settings"], responses=[],
                   correct=np.zeros((data["num_problems"], data["samples_per_problem"]), bool), answer_keys=[],
                   metrics=data["metrics"], pass_at_k={int(k): v for k, v in data["pass_at_k"].items()},
                   intervals={k: tuple(v) for k, v in data.get("intervals", {}).items()})


def diversity_metrics(texts_per_prompt: Sequence[Sequence[str]], embedder: Embedder | None = None
                      ) -> dict[str, float]:
    """Per-prompt diversity of the n responses, averaged over prompts: distinct-1/2 (pooled within a
    prompt), self-BLEU-4 and, with an embedder, mean pairwise cosine distance ("semantic_diversity")."""
    rows = [list(texts) for texts in texts_per_prompt]
    out = {
        "distinct_1": float(np.mean([distinct_n(t, 1) for t in rows])),
        "distinct_2": float(np.mean([distinct_n(t, 2) for t in rows])),
        "words_per_response": float(np.mean([len(whitespace_tokens(t)) for r in rows for t in r])),
    }
    if all(len(t) >= 2 for t in rows):
        out["self_bleu"] = float(np.mean([self_bleu(t) for t in rows]))
        if embedder is not None:
            out["semantic_diversity"] = float(np.mean(
                [float(mean_pairwise_cosine_distance(jnp.asarray(embedder(t)))) for t in rows]))
    return out


def score_responses(name: str, problems: Sequence[Problem], responses: Sequence[Sequence[str]],
                    checker: AnswerChecker, settings: dict[str, Any] | None = None,
                    embedder: Embedder | None = None, ks: Sequence[int] | None = None) -> MethodResult:
    """Check every response and compute accuracy and diversity.

    metrics: avg@n, maj@n (votes merged by ``checker.equivalent``), pass@1 and pass@n, answer_rate
    (share of responses with an extractable answer), distinct answers per problem and answer entropy
    (nats), distinct-1/2, self-BLEU, semantic diversity. intervals: a 95% bootstrap interval over problems
    (``accuracy.bootstrap_interval``) of every metric that is a mean of per-problem values.
    """
    if len(responses) != len(problems):
        raise ValueError(f"score_responses({name!r}): {len(responses)} response lists for "
                         f"{len(problems)} problems")
    widths = {len(r) for r in responses}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"score_responses({name!r}): every problem needs the same number n >= 1 of "
                         f"responses; got counts {sorted(widths)}")
    n = widths.pop()
    correct = np.array([[checker.is_correct(text, problem.reference) for text in texts]
                        for problem, texts in zip(problems, responses)], dtype=bool)
    keys = [[checker.extract(text) for text in texts] for texts in responses]
    curve = pass_at_k_curve(correct, ks)
    per_problem = {
        f"avg@{n}": avg_per_problem(correct),
        f"maj@{n}": majority_per_problem(keys, correct, equivalent=checker.equivalent),
        "pass@1": pass_per_problem(correct, 1),
        f"pass@{n}": pass_per_problem(correct, n),
        "distinct_answers": np.array([distinct_answers(row) for row in keys], float),
        "answer_entropy": np.array([answer_entropy(row) for row in keys], float),
    }
    metrics = {name: float(values.mean()) for name, values in per_problem.items()}
    metrics["answer_rate"] = float(np.mean([[k is not None for k in row] for row in keys]))
    metrics.update(diversity_metrics(responses, embedder))
    intervals = {name: bootstrap_interval(values) for name, values in per_problem.items()}
    return MethodResult(name=name, settings=dict(settings or {}), responses=[list(r) for r in responses],
                        correct=correct, answer_keys=keys, metrics=metrics, pass_at_k=curve, intervals=intervals)


def evaluate_method(name: str, problems: Sequence[Problem], generate: GenerateFn, n: int, rng: jax.Array,
                    checker: AnswerChecker, settings: dict[str, Any] | None = None,
                    embedder: Embedder | None = None, ks: Sequence[int] | None = None) -> MethodResult:
    """Sample n responses per problem with ``generate`` and score them (see ``score_responses``)."""
    if n < 1:
        raise ValueError(f"evaluate_method({name!r}): n must be >= 1, got {n}")
    texts = generate([p.prompt for p in problems], n, rng)
    if len(texts) != len(problems) or any(len(row) != n for row in texts):
        raise ValueError(f"evaluate_method({name!r}): generate must return [{len(problems)}][{n}] texts; "
                         f"got {len(texts)} rows of lengths {sorted({len(r) for r in texts})}")
    return score_responses(name, problems, texts, checker, settings, embedder, ks)
