"""Evaluation hooks of a run: what scores the policy before training (base), every eval.every_steps, and
after training, chosen once for the recipe's task.

    HeldOutAccuracy       eval.samples answers per held-out problem (eval.split of data.source) at
                          eval.temperature, checked by the task's answer checker: avg@k, maj@k, pass@k,
                          diversity (pf_jax.evaluation.scoring)
    InstructionEvaluator  the instruction reward on held-out instructions (pf_jax.tasks.instructions)
    DistributionProbe     a GFlowNet recipe's distance to its target p_base^alpha on candidate sets of
                          held-out prompts (eval.distribution; pf_jax.evaluation.distribution_match)

An evaluator is called with a model and a key and takes no trainer: what it reads is given when it is made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.config import DataConfig
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.codec import TextCodec
from pf_jax.data.holdout import split_held_out
from pf_jax.evaluation.answer_checkers import AnswerChecker
from pf_jax.evaluation.candidate_sets import CandidateSet, draw_candidates
from pf_jax.evaluation.distribution_match import distribution_match
from pf_jax.evaluation.scoring import MethodResult, Problem, score_responses
from pf_jax.methods.compose import Composition
from pf_jax.methods.scoring import Scorer
from pf_jax.models.decoder import Decoder
from pf_jax.rewards.text_rewards import RewardFn
from pf_jax.sampling.texts import generation_config, sample_texts
from pf_jax.tasks.instructions.evaluation import evaluate_instruction_reward
from pf_jax.tasks.instructions.rows import instruction_source_kind
from pf_jax.tasks.rewards import heldout_checker
from pf_jax.tasks.sources import load_prompt_rows, resolve_format

_PHASE = logging.getLogger("pf_jax.phase")  # what a CLI shows while it starts (pf_jax.phases)


class Evaluator(Protocol):
    def __call__(self, name: str, model: Decoder, *, key: jax.Array) -> MethodResult | None: ...


@dataclass
class HeldOutAccuracy:
    cfg: TrainConfig
    codec: TextCodec
    checker: AnswerChecker
    trained_settings: dict[str, Any]  # settings that describe the trained policy (e.g. PowerFlow's alpha)

    def problems(self) -> list[Problem]:
        """The first eval.problems held-out rows (held_out_source), with their reference answers."""
        return held_out_problems(self.cfg, self.cfg.eval.problems)

    def __call__(self, name: str, model: Decoder, *, key: jax.Array) -> MethodResult:
        e, problems = self.cfg.eval, self.problems()
        _PHASE.info("evaluating %s: %d held-out problems x %d samples", name, len(problems), e.samples)
        gen = generation_config(self.cfg.rollout, self.codec, temperature=e.temperature)
        texts, index = sample_texts(model, self.codec, [p.prompt for p in problems], e.samples, key, gen, chunk=64)
        per_problem = [[t for t, i in zip(texts, index) if i == j] for j in range(len(problems))]
        settings = {"method": name, "temperature": e.temperature, "samples": e.samples}
        if name != "base":
            settings.update(self.trained_settings)
        return score_responses(name, problems, per_problem, self.checker, settings)


@dataclass
class InstructionEvaluator:
    cfg: TrainConfig
    codec: TextCodec
    reward: RewardFn
    run_dir: Path

    def __call__(self, name: str, model: Decoder, *, key: jax.Array) -> None:
        """Writes <run_dir>/instruction_eval_<name>.json; no accuracy table to report."""
        evaluate_instruction_reward(name, model, self.codec, self.reward, self.cfg, self.run_dir, key=key)


@dataclass
class DistributionProbe:
    """How far the policy is from the GFlowNet target p_base^alpha (and, for length-aware TB, its
    length-tilted fixed point) on the candidate sets of eval.distribution.prompts held-out prompts. The
    candidates (eval.distribution.samples base samples per prompt at T = 1) and their base log-probs are
    drawn once, at the first call; every call then scores them under the policy (teacher forcing).
    Returns (metrics, 95% intervals over prompts); metrics["seconds"] is the call's wall time."""

    cfg: TrainConfig
    codec: TextCodec
    checker: AnswerChecker
    alpha: float
    length_tilt: bool
    candidates: CandidateSet | None = None
    base_logp: np.ndarray | None = None

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.cfg.eval.distribution.every_steps == 0

    def __call__(self, policy: Decoder, base: Decoder) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
        began = time.perf_counter()
        chunk = self.cfg.model.logprob_chunk
        if self.candidates is None:
            d = self.cfg.eval.distribution
            _PHASE.info("distribution probe: %d held-out prompts x %d base samples", d.prompts, d.samples)
            problems = held_out_problems(self.cfg, d.prompts)
            gen = generation_config(self.cfg.rollout, self.codec, temperature=1.0)
            key = jax.random.fold_in(jax.random.key(self.cfg.seed), 2 * 10**9)
            self.candidates = draw_candidates(base, self.codec, problems, d.samples, key, gen, self.checker)
            self.base_logp = sequence_logprobs(base, self.candidates, chunk)
        policy_logp = sequence_logprobs(policy, self.candidates, chunk)
        sets = self.candidates.per_prompt(self.base_logp, policy_logp)
        metrics, intervals = distribution_match(sets, self.alpha, self.length_tilt)
        metrics["seconds"] = time.perf_counter() - began
        return metrics, intervals


def sequence_logprobs(model: Decoder, candidates: CandidateSet, chunk_size: int = 128) -> np.ndarray:
    """float64[C]: log p(y | q) of every candidate under ``model`` by teacher forcing (the trainer's
    jitted scorer, methods.scoring.Scorer), summed over its response tokens."""
    graphdef, params = nnx.split(model)
    scorer = Scorer(graphdef, chunk_size)
    out = []
    for seq, size in zip(candidates.chunks, candidates.sizes):
        logp = scorer.logprobs(params, seq)
        out.append(np.asarray(jnp.sum(jnp.where(seq.response_mask, logp, 0.0), axis=1), np.float64)[:size])
    return np.concatenate(out)


def distribution_probe_for(cfg: TrainConfig, composition: Composition, codec: TextCodec) -> DistributionProbe | None:
    """The recipe's DistributionProbe when eval.distribution.enabled, the objective has a target exponent
    (the GFlowNet family) and the task has reference answers on held-out rows; else None (with a note)."""
    if not (cfg.eval.enabled and cfg.eval.distribution.enabled):
        return None
    alpha = getattr(composition.objective, "alpha", None)
    checker = heldout_checker(cfg.reward.name, cfg.data.source)
    why = ("the method has no target p_base^alpha" if alpha is None else
           "the task has no reference answers to check" if checker is None else scores_training_rows(cfg))
    if why is not None:
        print(f"[pf_jax] no distribution probe (eval.distribution): {why}")
        return None
    return DistributionProbe(cfg, codec, checker, float(alpha), bool(getattr(composition.objective, "per_token", False)))


def held_out_problems(cfg: TrainConfig, limit: int) -> list[Problem]:
    """The first `limit` held-out rows (held_out_source), with their reference answers."""
    data, fraction = held_out_source(cfg)
    rows = list(load_prompt_rows(data).rows)
    if fraction is not None:
        rows = split_held_out(rows, fraction)[1]
    return [Problem(r["prompt"], r["answer"], str(i)) for i, r in enumerate(rows[:limit])]


def held_out_source(cfg: TrainConfig) -> tuple[DataConfig, float | None]:
    """Where the held-out rows are: (the data source and split to read, the eval.fraction share of it to
    keep, or None for all of it): eval.fraction of data.source's training split (left out of training,
    pf_jax.methods.prompts.without_held_out), else eval.source (or data.source) at eval.split."""
    e, d = cfg.eval, cfg.data
    answer = "answer"  # the checkers compare with the task's reference answer, whatever SFT trains on
    if e.fraction is not None:
        return d.model_copy(update={"answer_field": answer}), e.fraction
    return d.model_copy(update={"source": e.source or d.source, "split": e.split, "answer_field": answer,
                                "format": "auto" if e.source else d.format}), None


def scores_training_rows(cfg: TrainConfig) -> str | None:
    """Why evaluating would score rows the run trains on (None: it would not): the held-out rows are
    data.source's own, in a split that is the training split, or in a local file, which has no splits."""
    e, d = cfg.eval, cfg.data
    if e.fraction is not None or (e.source is not None and e.source != d.source):
        return None
    if resolve_format(d) in ("jsonl", "parquet"):
        return f"data.source {d.source} is a local file, which has no splits"
    if e.split == d.split:
        return f"eval.split={e.split!r} is data.split"
    return None


def evaluator_for(cfg: TrainConfig, composition: Composition, codec: TextCodec, reward: RewardFn | None,
                  run_dir: Path) -> Evaluator | None:
    """The recipe's evaluator: the instruction reward for instruction tasks, held-out accuracy where the
    task has reference answers to check; None when evaluation is off or there is nothing to check."""
    if not cfg.eval.enabled:
        return None
    if cfg.reward.name == "instructions" and instruction_source_kind(cfg.data) and reward is not None:
        return InstructionEvaluator(cfg, codec, reward, run_dir)
    checker = heldout_checker(cfg.reward.name, cfg.data.source)
    if checker is None or composition.kind == "env":
        return None
    if (why := scores_training_rows(cfg)) is not None:
        print(f"[pf_jax] no held-out evaluation: {why}, so its rows are training rows; set eval.fraction=0.1 (a "
              "hash-chosen share left out of training) or eval.source=<held-out file>")
        return None
    alpha = getattr(composition.objective, "alpha", None)
    return HeldOutAccuracy(cfg, codec, checker, {} if alpha is None else {"alpha": alpha})
