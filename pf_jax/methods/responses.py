"""Response sources: from a step's prompt rows to responses, scored as the objective declares (`Needs`).

    DatasetCompletions  the rows' own responses (SFT: prompt + answer; KTO: prompt + completion)
    DatasetPairs        the rows' chosen and rejected responses (offline DPO family)
    LabelledTextsSource the rows' texts with their 0/1 labels (the constraint classifier)
    PolicySamples       G samples per prompt from the policy (GRPO, PPO, PowerFlow, ...) or from the
                        frozen reference (RFT), with rewards, reference log-probs and values
    PairsFromSamples    the best and the worst of a prompt's samples as a pair (online DPO)
    EnvRollouts         multi-turn episodes (pf_jax.methods.env_rollouts)

Nothing here is differentiated: the trainer's jitted update only sees the objective's finished batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pf_jax.data.codec import TextCodec
from pf_jax.data.examples import encode_example, layout, sft_example
from pf_jax.data.packing import pack_examples
from pf_jax.data.sequences import SequenceBatch, bucket_length
from pf_jax.methods.protocols import Completions, LabelledTexts, Models, Needs, Pairs, Row
from pf_jax.methods.scoring import Scorer
from pf_jax.rewards.text_rewards import RewardFn
from pf_jax.sampling.sampler import GenerationConfig
from pf_jax.sampling.texts import sample_responses
from pf_jax.tasks.instructions.reward_model import classifier_batch


@dataclass
class DatasetCompletions:
    """One sequence per row: its prompt and its `field` ("answer" for SFT, "completion" for KTO), or the
    turns of its conversation (pf_jax.data.examples); assistant_only: a conversation trains on its
    assistant turns only (data.assistant_only_loss); packed_length: several rows per sequence of that
    many tokens (data.packing, pf_jax.data.packing), None: one row per sequence."""

    codec: TextCodec
    scorer: Scorer
    needs: Needs
    field: str = "answer"
    assistant_only: bool = True
    packed_length: int | None = None

    def __call__(self, rows: Sequence[Row], models: Models, key: jax.Array) -> Completions:
        examples = [sft_example(self.codec, r, self.field, assistant_only=self.assistant_only) for r in rows]
        if self.packed_length is not None:
            seq = pack_examples(examples, self.packed_length, self.codec.pad_id)
            return Completions(rows, seq, np.arange(len(rows)))
        seq = layout(examples, self.codec.pad_id)
        ref = self.scorer.logprobs(models.reference, seq, models.reference_graphdef) if self.needs.reference_logp else None
        return Completions(rows, seq, np.arange(len(rows)), ref_logp=ref)


@dataclass
class DatasetPairs:
    """Each row's chosen and rejected responses, in one layout so that they run as one forward pass."""

    codec: TextCodec
    scorer: Scorer
    needs: Needs

    def __call__(self, rows: Sequence[Row], models: Models, key: jax.Array) -> Pairs:
        chosen = [encode_example(self.codec, r["prompt"], r["chosen"]) for r in rows]
        rejected = [encode_example(self.codec, r["prompt"], r["rejected"]) for r in rows]
        P = bucket_length(max(len(e.prompt) for e in chosen))
        R = bucket_length(max(len(e.response) for e in chosen + rejected))
        c = layout(chosen, self.codec.pad_id, prompt_len=P, response_len=R)
        j = layout(rejected, self.codec.pad_id, prompt_len=P, response_len=R)
        return scored_pairs(rows, c, j, self.scorer, models if self.needs.reference_logp else None)


def scored_pairs(rows: Sequence[Row], chosen: SequenceBatch, rejected: SequenceBatch, scorer: Scorer,
                 models: Models | None, metrics: dict[str, float] | None = None) -> Pairs:
    """Pairs with the reference's log-probs of both sides (models None: not scored)."""
    if models is None:
        return Pairs(rows, chosen, rejected, metrics=metrics or {})
    score = lambda seq: scorer.logprobs(models.reference, seq, models.reference_graphdef)
    return Pairs(rows, chosen, rejected, score(chosen), score(rejected), metrics or {})


@dataclass
class LabelledTextsSource:
    """Each row's classifier text "Response: {response}. Constraint: {constraint}" and its label."""

    codec: TextCodec
    max_length: int

    def __call__(self, rows: Sequence[Row], models: Models, key: jax.Array) -> LabelledTexts:
        return LabelledTexts(**classifier_batch(self.codec, rows, self.max_length))


@dataclass
class PolicySamples:
    """G samples per prompt from the policy (or, sample_from="reference", from the frozen reference),
    with what the objective needs: rewards (the recipe's text reward, or an internal one computed from the
    policy), the reference's log-probs, the value head's values."""

    codec: TextCodec
    gen: GenerationConfig
    scorer: Scorer
    needs: Needs
    samples_per_prompt: int
    reward: RewardFn | None = None
    internal_reward: str | None = None  # "entropy" / "self_certainty" when reward.name is one
    reward_scale: float = 1.0
    answer_format: Callable[[str], str | None] | None = None
    sample_from: str = "policy"

    def __call__(self, rows: Sequence[Row], models: Models, key: jax.Array) -> Completions:
        model = models.reference_model() if self.sample_from == "reference" else models.sampler_model()
        seq, logp, texts, group_ids = sample_responses(model, self.codec, [r["prompt"] for r in rows],
                                                       self.samples_per_prompt, key, self.gen)
        out = Completions(rows, seq, group_ids, texts, behaviour_logp=logp,
                          metrics={"response_length": float(np.asarray(seq.response_mask.sum(axis=1)).mean())})
        self._score_rewards(out, models)
        if self.answer_format is not None:
            out.has_answer = np.array([self.answer_format(t) is not None for t in texts])
            out.metrics["answer_rate"] = float(out.has_answer.mean())
        if self.needs.reference_logp:
            out.ref_logp = self.scorer.logprobs(models.reference, seq, models.reference_graphdef)
        if self.needs.values:
            out.values = self.scorer.values(models.params["policy"], models.graphdefs["value"],
                                            models.params["value"], seq)
        return out

    def _score_rewards(self, out: Completions, models: Models) -> None:
        if self.reward is not None:
            scored = self.reward(out.rows, out.texts, out.group_ids)
            out.rewards = np.asarray(scored.rewards, np.float32)
            out.metrics.update({f"reward/{k}": v for k, v in scored.metrics.items()}, reward=float(out.rewards.mean()))
        if self.needs.reward and out.rewards is None:
            name = self.internal_reward or "none"
            out.rewards = self.scorer.internal_reward(name, models.params["policy"], out.seq) * self.reward_scale
            out.metrics["reward"] = float(out.rewards.mean())


@dataclass
class PairsFromSamples:
    """Online DPO: the best and the worst of each prompt's samples by reward form its pair; ties carry no
    preference, so their pairs are masked out (a zero-length pair has no gradient)."""

    samples: PolicySamples
    scorer: Scorer

    def __call__(self, rows: Sequence[Row], models: Models, key: jax.Array) -> Pairs:
        s = self.samples(rows, models, key)
        chosen_idx, rejected_idx, valid = [], [], []
        for g in np.unique(s.group_ids):
            idx = np.flatnonzero(s.group_ids == g)
            order = idx[np.argsort(s.rewards[idx], kind="stable")]
            chosen_idx.append(order[-1])
            rejected_idx.append(order[0])
            valid.append(s.rewards[order[-1]] > s.rewards[order[0]])
        valid = np.asarray(valid)
        take = lambda i: _masked(jax.tree_util.tree_map(lambda x: x[np.asarray(i)], s.seq), valid)
        metrics = {**s.metrics, "kept_fraction": float(valid.mean())}
        return scored_pairs(rows, take(chosen_idx), take(rejected_idx), self.scorer, models, metrics)


def _masked(seq: SequenceBatch, valid: np.ndarray) -> SequenceBatch:
    return seq.replace(response_mask=seq.response_mask & jnp.asarray(valid)[:, None])
