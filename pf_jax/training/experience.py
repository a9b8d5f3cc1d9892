"""Response sources and estimators: from a batch of prompt rows to the arrays a loss trains on.

    rows ──► responses (dataset | policy samples | reference samples) ──► rewards ──► estimator
         ──► batch dict (SequenceBatch + old / ref / base log-probs, advantages, returns, weights)

Nothing here is differentiated: the trainer's jitted update only sees the finished batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pf_jax.config.recipe import TrainConfig
from pf_jax.data.codec import TextCodec
from pf_jax.data.sequences import SequenceBatch, bucket_length, pack_sequences
from pf_jax.losses import advantages as adv_lib
from pf_jax.losses import kl_shaped_token_rewards, make_advantage_fn, overlong_penalty
from pf_jax.models.decoder import Decoder
from pf_jax.rewards.text_rewards import RewardFn
from pf_jax.sampling.filters import SamplingParams
from pf_jax.sampling.sampler import GenerationConfig, generate
from pf_jax.training.methods import MethodSpec
from pf_jax.training.objective import call_with_available, response_logprobs


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "entropy", "mesh"))
def _score(graphdef: nnx.GraphDef, params: nnx.State, seq: SequenceBatch, chunk_size: int, entropy: bool,
           mesh: Mesh | None = None):
    """mesh: the multi-device mesh of `params` (weights_mesh), for kernels that run per device (splash)."""
    model = nnx.merge(graphdef, params)
    model.ops = model.ops.on_mesh(mesh)
    logp, ent, hidden = response_logprobs(model, seq, chunk_size=chunk_size, entropy=entropy)
    return logp, ent, hidden


def weights_mesh(params: Any) -> Mesh | None:
    """The mesh of the first array of `params` placed on several devices (the sampler layout's), else None."""
    for leaf in jax.tree_util.tree_leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


@dataclass
class Scorer:
    """Teacher-forced log-probs of a (frozen or current) model, compiled once per batch shape."""

    graphdef: nnx.GraphDef
    chunk_size: int

    def logprobs(self, params: nnx.State, seq: SequenceBatch) -> jax.Array:
        return _score(self.graphdef, params, seq, self.chunk_size, False, weights_mesh(params))[0]

    def logprobs_entropy_hidden(self, params: nnx.State, seq: SequenceBatch):
        return _score(self.graphdef, params, seq, self.chunk_size, True, weights_mesh(params))


@functools.partial(jax.jit, static_argnames=("graphdef", "P", "R"))
def _values(graphdef, params, hidden, P: int, R: int):
    head = nnx.merge(graphdef, params)
    return head(hidden[:, P - 1 : P - 1 + R])


def generation_config(cfg: TrainConfig, codec: TextCodec, *, temperature: float | None = None) -> GenerationConfig:
    r = cfg.rollout
    t = r.temperature if temperature is None else temperature
    return GenerationConfig(
        max_new_tokens=r.max_new_tokens,
        sampling=SamplingParams(temperature=t, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p),
        eos_token_ids=tuple(codec.eos_ids), pad_token_id=codec.pad_id, min_prompt_bucket=8,
    )


def sample_responses(
    model: Decoder, codec: TextCodec, prompts: Sequence[str], n: int, key: jax.Array, gen: GenerationConfig
) -> tuple[SequenceBatch, jax.Array, list[str], np.ndarray]:
    """n samples per prompt: (sequences, exact policy log-probs [N, R], decoded texts, group ids [N])."""
    ids = [codec.encode_prompt(p) for p in prompts]
    res = generate(model, ids, key, gen, n=n)
    seq = SequenceBatch(res.prompt_tokens, res.prompt_mask, res.tokens, res.response_mask)
    texts = [codec.decode_response(t) for t in res.response_token_lists()]
    return seq, res.policy_logprobs, texts, np.asarray(res.prompt_index)


def compute_advantages(
    spec: MethodSpec, overrides: Mapping[str, Any], *, rewards: np.ndarray, group_ids: np.ndarray,
    num_groups: int, mask: jax.Array, token_rewards: jax.Array | None = None, values: jax.Array | None = None,
    step_rewards: Any = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The method's advantage estimator on this batch: (advantages [N] or [N, R], returns or None)."""
    fn = make_advantage_fn(spec.loss, **dict(overrides))
    pool = {
        "rewards": jnp.asarray(rewards, jnp.float32), "group_ids": jnp.asarray(group_ids, jnp.int32),
        "num_groups": num_groups, "mask": mask, "token_mask": mask, "token_rewards": token_rewards, "values": values,
    }
    if step_rewards is not None:
        pool.update(step_rewards)
    out = call_with_available(fn, pool)
    if isinstance(out, tuple):
        first, second = out
        return first, (second if isinstance(second, jax.Array) else None)
    return out, None


def last_token_rewards(rewards: np.ndarray, mask: jax.Array) -> jax.Array:
    """Outcome reward placed on each sequence's last response token, [N, R]."""
    lengths = mask.sum(axis=1)
    pos = jnp.arange(mask.shape[1])[None, :]
    return jnp.where(pos == (lengths - 1)[:, None], jnp.asarray(rewards, jnp.float32)[:, None], 0.0)


def digit_step_rewards(texts: Sequence[str], refs: Sequence[str], R: int) -> dict[str, jax.Array]:
    """Process supervision for answers written digit by digit: step j = the j-th answer character, step
    reward 1 if it matches the reference's j-th character (a missing or extra character scores 0)."""
    S = R
    rewards = np.zeros((len(texts), S), np.float32)
    step_mask = np.zeros((len(texts), S), bool)
    step_end = np.zeros((len(texts), S), np.int32)
    for i, (t, ref) in enumerate(zip(texts, refs, strict=True)):
        for j, ch in enumerate(t[:S]):
            rewards[i, j] = float(j < len(ref) and ch == ref[j])
            step_mask[i, j] = True
            step_end[i, j] = j
    return {"step_rewards": jnp.asarray(rewards), "step_mask": jnp.asarray(step_mask), "step_end": jnp.asarray(step_end)}


def group_log_partition(
    log_reward: jax.Array, old_logp: jax.Array, mask: jax.Array, group_ids: np.ndarray, num_groups: int,
    *, per_token: bool,
) -> jax.Array:
    """Per-sample log Z estimate from the prompt's own samples (detached), [N]:

        per_token (length-aware TB):  log Z'_g = mean_{i in g} (log R_i - log pi_old(y_i)) / |y_i|
        otherwise (TB):               log Z_g  = mean_{i in g} (log R_i - log pi_old(y_i))

    the value minimising the group's squared residuals at pi = pi_old (VarGrad, Richter et al. 2020).
    """
    n = jnp.maximum(mask.sum(axis=1), 1)
    gap = log_reward - jnp.sum(jnp.where(mask, old_logp, 0.0), axis=1)
    gap = gap / n if per_token else gap
    g = jnp.asarray(group_ids, jnp.int32)
    total = jax.ops.segment_sum(gap, g, num_segments=num_groups)
    count = jax.ops.segment_sum(jnp.ones_like(gap), g, num_segments=num_groups)
    return jax.lax.stop_gradient((total / jnp.maximum(count, 1))[g])


class ExperienceMaker:
    """Turns prompt rows into a training batch for one method (the response source + estimator)."""

    def __init__(
        self, cfg: TrainConfig, spec: MethodSpec, codec: TextCodec, graphdefs: Mapping[str, nnx.GraphDef],
        reward_fn: RewardFn | None, answer_format: Callable[[str], str | None] | None,
    ) -> None:
        self.cfg, self.spec, self.codec = cfg, spec, codec
        self.graphdefs = graphdefs
        self.reward_fn = reward_fn
        self.answer_format = answer_format
        self.scorer = Scorer(graphdefs["policy"], cfg.model.logprob_chunk)
        self.gen = generation_config(cfg, codec)

    # -- dataset responses ---------------------------------------------------------------------------
    def _pack(self, prompts: Sequence[str], responses: Sequence[str]) -> SequenceBatch:
        p = [self.codec.encode_prompt(x) for x in prompts]
        r = [self.codec.encode_response(x) for x in responses]
        return pack_sequences(p, r, pad_id=self.codec.pad_id, prompt_len=bucket_length(max(map(len, p))),
                              response_len=bucket_length(max(map(len, r))))

    def from_dataset(self, rows: Sequence[Mapping[str, Any]], params, ref_params) -> tuple[dict, dict]:
        fam = self.spec.family
        if fam == "reward_model":
            from pf_jax.tasks.instructions.reward_model import classifier_batch

            return classifier_batch(self.codec, rows, self.cfg.reward_model.max_length), {}
        if fam == "supervised":
            return {"seq": self._pack([r["prompt"] for r in rows], [r["answer"] for r in rows])}, {}
        if fam == "kto":
            seq = self._pack([r["prompt"] for r in rows], [r["completion"] for r in rows])
            desirable = jnp.asarray([bool(r["label"]) for r in rows])
            return {"seq": seq, "ref_logp": self.scorer.logprobs(ref_params, seq), "desirable": desirable}, {}
        # preference pairs: chosen and rejected share one layout so they run as one forward pass
        prompts = [self.codec.encode_prompt(r["prompt"]) for r in rows]
        chosen = [self.codec.encode_response(r["chosen"]) for r in rows]
        rejected = [self.codec.encode_response(r["rejected"]) for r in rows]
        P = bucket_length(max(map(len, prompts)))
        R = bucket_length(max(map(len, chosen + rejected)))
        c = pack_sequences(prompts, chosen, pad_id=self.codec.pad_id, prompt_len=P, response_len=R)
        j = pack_sequences(prompts, rejected, pad_id=self.codec.pad_id, prompt_len=P, response_len=R)
        batch = {"chosen": c, "rejected": j}
        if ref_params is not None:
            batch["ref_chosen_logp"] = self.scorer.logprobs(ref_params, c)
            batch["ref_rejected_logp"] = self.scorer.logprobs(ref_params, j)
        return batch, {}

    # -- sampled responses ---------------------------------------------------------------------------
    def from_samples(
        self, rows: Sequence[Mapping[str, Any]], params: Mapping[str, nnx.State], ref_params, key: jax.Array
    ) -> tuple[dict, dict]:
        cfg, spec = self.cfg, self.spec
        sampler_params = ref_params if spec.responses == "reference" or cfg.method.responses == "reference" else params["policy"]
        model = nnx.merge(self.graphdefs["policy"], sampler_params)
        G = cfg.rollout.samples_per_prompt
        seq, old_logp, texts, group_ids = sample_responses(model, self.codec, [r["prompt"] for r in rows], G, key, self.gen)
        mask = seq.response_mask
        lengths = np.asarray(mask.sum(axis=1))
        metrics: dict[str, float] = {"response_length": float(lengths.mean())}

        rewards = None
        if self.reward_fn is not None:
            out = self.reward_fn(rows, texts, group_ids)
            rewards = np.asarray(out.rewards, np.float32)
            metrics.update({f"reward/{k}": v for k, v in out.metrics.items()}, reward=float(rewards.mean()))
        if spec.needs_reward and rewards is None:
            rewards = self._internal_rewards(params["policy"], seq)
            metrics["reward"] = float(rewards.mean())
        if self.answer_format is not None:
            has_answer = np.array([self.answer_format(t) is not None for t in texts])
            metrics["answer_rate"] = float(has_answer.mean())

        if spec.family == "supervised":  # RFT: keep the correct samples
            weights = (rewards >= 1.0).astype(np.float32)
            metrics["kept_fraction"] = float(weights.mean())
            return {"seq": seq, "weights": jnp.asarray(weights)}, metrics

        if spec.family == "gflownet":
            base_logp = self.scorer.logprobs(ref_params, seq)
            psi = np.zeros(len(texts), np.float32)
            if cfg.reward.format_penalty and self.answer_format is not None:
                psi = np.where(has_answer, 0.0, cfg.reward.format_penalty).astype(np.float32)
            alpha = cfg.method.alpha
            base_sum = jnp.sum(jnp.where(mask, base_logp, 0.0), axis=1)
            log_reward = alpha * (base_sum + jnp.asarray(psi) * jnp.maximum(mask.sum(axis=1), 1))
            metrics["base_logp_per_token"] = float(jnp.sum(base_sum) / jnp.maximum(mask.sum(), 1))
            batch = {"seq": seq, "old_logp": old_logp, "base_logp": base_logp, "format_penalty": jnp.asarray(psi),
                     "log_reward": log_reward}
            if cfg.method.log_z == "group":
                batch["log_z_prime"] = group_log_partition(
                    log_reward, old_logp, mask, group_ids, len(rows), per_token=spec.loss in ("powerflow", "length_aware_tb"))
            return batch, metrics

        if spec.pairs_from_samples:  # online DPO: best vs worst sample of each prompt
            return self._online_pairs(seq, rewards, group_ids, ref_params, metrics)

        # policy gradient
        num_groups = len(rows)
        if cfg.method.overlong_max_tokens is not None:
            cache = cfg.method.overlong_cache_tokens or max(1, cfg.method.overlong_max_tokens // 4)
            rewards = rewards + np.asarray(overlong_penalty(jnp.asarray(lengths), cfg.method.overlong_max_tokens, cache))
        batch = {"seq": seq, "old_logp": old_logp}
        if ref_params is not None:
            batch["ref_logp"] = self.scorer.logprobs(ref_params, seq)
        token_rewards = None
        if spec.loss in ("ppo", "reinforce_pp"):
            if cfg.method.reward_kl_coef:
                token_rewards = kl_shaped_token_rewards(
                    jnp.asarray(rewards), old_logp, batch["ref_logp"], mask, cfg.method.reward_kl_coef)
            else:
                token_rewards = last_token_rewards(rewards, mask)
        values = None
        if spec.value_head:
            _, _, hidden = self.scorer.logprobs_entropy_hidden(params["policy"], seq)
            P, R = seq.prompt_tokens.shape[1], seq.response_tokens.shape[1]
            values = _values(self.graphdefs["value"], params["value"], hidden, P, R)
            batch["old_values"] = values
        step = None
        if spec.loss == "grpo_process":
            refs = [str(rows[g]["answer"]) for g in group_ids]
            step = digit_step_rewards(texts, refs, seq.response_tokens.shape[1])
        advantages, returns = compute_advantages(
            spec, cfg.method.advantage, rewards=rewards, group_ids=group_ids, num_groups=num_groups,
            mask=mask, token_rewards=token_rewards, values=values, step_rewards=step,
        )
        if returns is not None:
            batch["returns"] = returns
        if cfg.method.dynamic_sampling:
            keep = np.asarray(adv_lib.dynamic_sampling_keep(jnp.asarray(rewards), jnp.asarray(group_ids), num_groups))
            metrics["kept_fraction"] = float(keep.mean())
            seq = seq.replace(response_mask=mask & jnp.asarray(keep)[:, None])
            batch["seq"] = seq
        batch["advantages"] = advantages
        metrics["advantage_abs_mean"] = float(jnp.mean(jnp.abs(advantages)))
        return batch, metrics

    def _internal_rewards(self, policy_params, seq: SequenceBatch) -> np.ndarray:
        """RLIF rewards from the policy's own distributions: negative mean token entropy (EM) or
        self-certainty (Intuitor); both are sequence means over the response tokens."""
        name = self.cfg.reward.name
        m = seq.response_mask
        if name == "entropy":
            _, per_token, _ = self.scorer.logprobs_entropy_hidden(policy_params, seq)
            per_token = -per_token
        elif name == "self_certainty":
            # KL(U || p) = -log V - (1/V) sum_v log p_v needs the whole distribution, formed a few rows at a time
            from pf_jax.training.self_certainty import self_certainty

            per_token = self_certainty(self.graphdefs["policy"], policy_params, seq)
        else:
            raise ValueError(f"reward {name!r} is not an internal reward")
        n = jnp.maximum(m.sum(axis=1), 1)
        return np.asarray(jnp.sum(jnp.where(m, per_token, 0.0), axis=1) / n) * self.cfg.reward.scale

    def _online_pairs(self, seq, rewards, group_ids, ref_params, metrics):
        chosen_idx, rejected_idx, valid = [], [], []
        for g in np.unique(group_ids):
            idx = np.flatnonzero(group_ids == g)
            order = idx[np.argsort(rewards[idx], kind="stable")]
            chosen_idx.append(order[-1])
            rejected_idx.append(order[0])
            valid.append(rewards[order[-1]] > rewards[order[0]])
        valid = np.asarray(valid)
        metrics["kept_fraction"] = float(valid.mean())
        take = lambda i: jax.tree_util.tree_map(lambda x: x[np.asarray(i)], seq)
        c, j = take(chosen_idx), take(rejected_idx)
        # Ties carry no preference: their pairs are masked out (a zero-length pair has no gradient).
        v = jnp.asarray(valid)[:, None]
        c = c.replace(response_mask=c.response_mask & v)
        j = j.replace(response_mask=j.response_mask & v)
        return {"chosen": c, "rejected": j, "ref_chosen_logp": self.scorer.logprobs(ref_params, c),
                "ref_rejected_logp": self.scorer.logprobs(ref_params, j)}, metrics
