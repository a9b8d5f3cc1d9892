"""The gradient coefficient as a loss over the policy's forward pass: one `loss_fn(modules, batch)` per
method family, built from pf_jax.losses. Everything a method needs besides the current policy
(behaviour log-probs, reference / base log-probs, advantages, returns) was computed before the update
and sits in `batch` as plain arrays.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from pf_jax.data.sequences import SequenceBatch
from pf_jax.losses import clipped_value_loss, entropy_bonus_loss, kto_reference_point, make_loss_fn
from pf_jax.models.decoder import Decoder
from pf_jax.models.logprobs import token_logprobs
from pf_jax.training.methods import MethodSpec

Batch = dict[str, Any]
LossFn = Callable[[dict[str, nnx.Module], Batch], tuple[Array, dict[str, Array]]]


def response_logprobs(
    model: Decoder, seq: SequenceBatch, *, chunk_size: int = 128, entropy: bool = False
) -> tuple[Array, Array | None, Array]:
    """Teacher-forced log pi(response_t | prompt, response_<t), [B, R]; optionally the per-token entropy
    of the full distribution; and the final hidden states [B, P+R, D] (for heads). The response token r
    is predicted from joint position P-1+r, the same for every row (prompts are left-padded)."""
    hidden, _ = model(seq.tokens, seq.positions, seq.attention_mask)
    P, R = seq.prompt_tokens.shape[1], seq.response_tokens.shape[1]
    out = token_logprobs(
        hidden[:, P - 1 : P - 1 + R], model.lm_head(), seq.response_tokens, chunk_size=chunk_size,
        softcap=model.cfg.final_logit_softcap, return_entropy=entropy,
    )
    logp, ent = out if entropy else (out, None)
    return logp, ent, hidden


def bind_loss(loss_name: str, overrides: Mapping[str, Any]) -> Callable[..., Any]:
    """The registry loss with its defaults and the recipe's overrides bound (misspelt keys raise)."""
    return make_loss_fn(loss_name, **dict(overrides))


def call_with_available(fn: Callable[..., Any], pool: Mapping[str, Any]) -> Any:
    """Call fn with the entries of pool its signature names (functools.partial-bound ones excluded)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in pool.items() if k in params})


def build_loss_fn(
    spec: MethodSpec, loss: Callable[..., Any], *, chunk_size: int, entropy_coef: float = 0.0,
    value_coef: float = 0.0,
) -> LossFn:
    """`loss_fn(modules, batch) -> (loss, metrics)` for the method's family.

    batch keys by family: supervised {seq, weights?}; policy_gradient {seq, old_logp, advantages,
    ref_logp?, old_values?, returns?}; gflownet {seq, old_logp, base_logp, log_reward?, format_penalty?};
    preference {chosen, rejected, ref_chosen_logp?, ref_rejected_logp?}; kto {seq, ref_logp, desirable}.
    """

    def policy_terms(modules, seq):
        logp, ent, hidden = response_logprobs(modules["policy"], seq, chunk_size=chunk_size, entropy=True)
        metrics = {"entropy": jnp.sum(jnp.where(seq.response_mask, ent, 0.0)) / jnp.maximum(seq.response_mask.sum(), 1)}
        return logp, ent, hidden, metrics

    def supervised(modules, batch):
        seq = batch["seq"]
        logp, _, _, metrics = policy_terms(modules, seq)
        value, m = call_with_available(loss, {"logp": logp, "mask": seq.response_mask, "weights": batch.get("weights")})
        return value, {**metrics, **m}

    def policy_gradient(modules, batch):
        seq = batch["seq"]
        logp, ent, hidden, metrics = policy_terms(modules, seq)
        pool = {"logp": logp, "mask": seq.response_mask, **{k: v for k, v in batch.items() if k != "seq"}}
        value, m = call_with_available(loss, pool)
        metrics.update(m)
        if entropy_coef:
            bonus, _ = entropy_bonus_loss(ent, seq.response_mask, coef=entropy_coef)
            value = value + bonus
        if "value" in modules:
            P, R = seq.prompt_tokens.shape[1], seq.response_tokens.shape[1]
            values = modules["value"](hidden[:, P - 1 : P - 1 + R])
            v_loss, vm = clipped_value_loss(values, batch["old_values"], batch["returns"], seq.response_mask)
            value = value + value_coef * v_loss
            metrics.update({f"value/{k}": x for k, x in vm.items()}, value_loss=v_loss)
        return value, metrics

    def gflownet(modules, batch):
        seq = batch["seq"]
        logp, _, hidden, metrics = policy_terms(modules, seq)
        P = seq.prompt_tokens.shape[1]
        if "log_z" in modules:
            log_z = modules["log_z"](hidden[:, :P], seq.prompt_mask)
        else:  # estimated from the prompt's samples when the batch was made (method.log_z: group)
            log_z = batch["log_z_prime"]
        pool = {
            **{k: v for k, v in batch.items() if k != "seq"},
            "logp": logp, "mask": seq.response_mask, "log_z": log_z, "log_z_prime": log_z,
        }
        value, m = call_with_available(loss, pool)
        return value, {**metrics, **m}

    def preference(modules, batch):
        chosen, rejected = batch["chosen"], batch["rejected"]
        both = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), chosen, rejected)
        logp, _, _, metrics = policy_terms(modules, both)
        n = chosen.prompt_tokens.shape[0]
        pool = {
            "policy_chosen_logp": logp[:n], "policy_rejected_logp": logp[n:],
            "chosen_mask": chosen.response_mask, "rejected_mask": rejected.response_mask,
            "ref_chosen_logp": batch.get("ref_chosen_logp"), "ref_rejected_logp": batch.get("ref_rejected_logp"),
        }
        value, m = call_with_available(loss, pool)
        return value, {**metrics, **m}

    def kto(modules, batch):
        seq = batch["seq"]
        logp, _, _, metrics = policy_terms(modules, seq)
        # z0 from the batch itself (TRL estimates it on mismatched pairs of the batch; this is the
        # matched-pair estimate, detached: a stated simplification).
        z0 = kto_reference_point(logp, batch["ref_logp"], seq.response_mask)
        value, m = call_with_available(loss, {
            "policy_logp": logp, "ref_logp": batch["ref_logp"], "mask": seq.response_mask,
            "desirable": batch["desirable"], "reference_point": z0,
        })
        return value, {**metrics, **m, "kto_z0": z0}

    return {
        "supervised": supervised, "policy_gradient": policy_gradient, "gflownet": gflownet,
        "preference": preference, "kto": kto,
    }[spec.family]
