"""The typed batch each objective trains on: one registered dataclass pytree per family.

Every field an objective reads is named here, with its shape; a field without a default must be given
when the batch is built (a TypeError names it), so nothing falls back to a loss's default silently. The
optional fields are None when the recipe does not ask for them (no KL term: no reference log-probs).
Slicing a batch into minibatches, placing it on a mesh and jitting over it treat it as any pytree.

    SupervisedBatch       SFT, RFT: sequences and per-sequence weights (1(y = y*) for RFT)
    PolicyGradientBatch   PPO, GRPO and variants, RLOO, REINFORCE++, CISPO, the agentic methods
    GFlowNetBatch         PowerFlow and the trajectory-balance family
    PreferenceBatch       DPO family, ORPO, SimPO, online DPO: chosen and rejected in one layout
    KTOBatch              KTO: one completion per row with its desirable / undesirable label
    ClassifierBatch       the constraint classifier (reward model): token ids, mask, 0/1 labels
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from pf_jax.data.sequences import SequenceBatch


@struct.dataclass
class SupervisedBatch:
    seq: SequenceBatch
    weights: Float[Array, " B"] | None = None


@struct.dataclass
class PolicyGradientBatch:
    seq: SequenceBatch
    old_logp: Float[Array, "B R"]  # the sampler's (async: the policy before the update), detached
    advantages: Float[Array, " B"] | Float[Array, "B R"]
    ref_logp: Float[Array, "B R"] | None = None  # the KL term's reference
    old_values: Float[Array, "B R"] | None = None  # PPO's value head at sampling time
    returns: Float[Array, "B R"] | None = None  # PPO's value targets


@struct.dataclass
class GFlowNetBatch:
    seq: SequenceBatch
    old_logp: Float[Array, "B R"]
    base_logp: Float[Array, "B R"]  # the frozen base model p_base
    log_reward: Float[Array, " B"]  # alpha [log p_base(y) + |y| psi(y)]
    format_penalty: Float[Array, " B"]  # psi(y)
    log_z_prime: Float[Array, " B"] | None = None  # method.log_z=group: the prompt's own estimate
    behaviour_weight: Float[Array, " B"] | None = None  # async rollouts: TIS weight to the sampler


@struct.dataclass
class PreferenceBatch:
    chosen: SequenceBatch
    rejected: SequenceBatch
    ref_chosen_logp: Float[Array, "B R"] | None = None
    ref_rejected_logp: Float[Array, "B R"] | None = None


@struct.dataclass
class KTOBatch:
    seq: SequenceBatch
    ref_logp: Float[Array, "B R"]
    desirable: Bool[Array, " B"]


@struct.dataclass
class ClassifierBatch:
    tokens: Int[Array, "B T"]
    mask: Bool[Array, "B T"]
    labels: Float[Array, " B"]


def sequences(batch: Any) -> list[SequenceBatch]:
    """The SequenceBatches a batch holds (chosen and rejected count as two)."""
    leaves = jax.tree_util.tree_leaves(batch, is_leaf=lambda x: isinstance(x, SequenceBatch))
    return [x for x in leaves if isinstance(x, SequenceBatch)]


def response_token_count(batch: Any) -> int:
    """Response tokens the batch trains on (for tokens/s)."""
    return sum(int(s.response_mask.sum()) for s in sequences(batch))


@dataclass(frozen=True)
class BatchShape:
    """The padded shapes of one update's batch, for the dry run: its rows, the prompt and response lengths,
    and the step's rollout (rows, prompts) over which an estimator runs before the update's rows are cut."""

    rows: int
    prompt_len: int
    response_len: int
    rollout_rows: int = 0
    prompts: int = 0


def f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def abstract_sequences(rows: int, prompt_len: int, response_len: int) -> SequenceBatch:
    """A SequenceBatch of ShapeDtypeStructs: left-padded prompts [rows, P] beside responses [rows, R]."""
    tokens = lambda n: jax.ShapeDtypeStruct((rows, n), jnp.int32)
    mask = lambda n: jax.ShapeDtypeStruct((rows, n), jnp.bool_)
    return SequenceBatch(tokens(prompt_len), mask(prompt_len), tokens(response_len), mask(response_len))
