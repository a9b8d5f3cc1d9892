"""Preference objectives: the DPO family (DPO, cDPO, robust DPO, IPO, SimPO, ORPO, online DPO) on pairs of
responses, and KTO on single responses labelled desirable or undesirable.

Chosen and rejected share one layout and run as one forward pass; the reference's log-probs were scored
when the pairs were made (SimPO and ORPO use none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pf_jax.losses import kto_reference_point
from pf_jax.methods.batches import BatchShape, KTOBatch, PreferenceBatch, abstract_sequences, f32
from pf_jax.methods.protocols import Completions, Metrics, Needs, ObjectiveDefaults, Pairs
from pf_jax.methods.scoring import policy_terms


@dataclass(frozen=True)
class Preference(ObjectiveDefaults):
    """loss(policy_chosen_logp, policy_rejected_logp, [ref_chosen_logp, ref_rejected_logp,] chosen_mask,
    rejected_mask) of the bound pf_jax.losses function; `reference`: the loss compares with the frozen
    reference (all but SimPO and ORPO)."""

    loss_fn: Callable[..., Any]
    reference: bool
    chunk_size: int

    @property
    def needs(self) -> Needs:
        return Needs(reference_logp=self.reference)

    def batch(self, r: Pairs) -> tuple[PreferenceBatch, Metrics]:
        return PreferenceBatch(r.chosen, r.rejected, r.ref_chosen_logp, r.ref_rejected_logp), {}

    def abstract_batch(self, s: BatchShape) -> PreferenceBatch:
        seq = abstract_sequences(s.rows, s.prompt_len, s.response_len)
        ref = f32(s.rows, s.response_len) if self.reference else None
        return PreferenceBatch(seq, seq, ref, ref)

    def loss(self, modules: Mapping[str, nnx.Module], b: PreferenceBatch):
        both = jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y]), b.chosen, b.rejected)
        logp, _, _, metrics = policy_terms(modules["policy"], both, self.chunk_size)
        n = b.chosen.prompt_tokens.shape[0]
        ref = {} if b.ref_chosen_logp is None else {"ref_chosen_logp": b.ref_chosen_logp,
                                                    "ref_rejected_logp": b.ref_rejected_logp}
        value, m = self.loss_fn(policy_chosen_logp=logp[:n], policy_rejected_logp=logp[n:],
                                chosen_mask=b.chosen.loss_mask, rejected_mask=b.rejected.loss_mask, **ref)
        return value, {**metrics, **m}


@dataclass(frozen=True)
class KTO(ObjectiveDefaults):
    """KTO over rows {prompt, completion, label}: the reference point z0 is the batch's own matched-pair
    estimate, detached (TRL estimates it on mismatched pairs of the batch: a stated simplification)."""

    loss_fn: Callable[..., Any]
    chunk_size: int
    needs: ClassVar[Needs] = Needs(reference_logp=True)

    def batch(self, r: Completions) -> tuple[KTOBatch, Metrics]:
        return KTOBatch(r.seq, r.ref_logp, jnp.asarray([bool(row["label"]) for row in r.rows])), {}

    def abstract_batch(self, s: BatchShape) -> KTOBatch:
        seq = abstract_sequences(s.rows, s.prompt_len, s.response_len)
        return KTOBatch(seq, f32(s.rows, s.response_len), jax.ShapeDtypeStruct((s.rows,), jnp.bool_))

    def loss(self, modules: Mapping[str, nnx.Module], b: KTOBatch):
        logp, _, _, metrics = policy_terms(modules["policy"], b.seq, self.chunk_size)
        z0 = kto_reference_point(logp, b.ref_logp, b.seq.loss_mask)
        value, m = self.loss_fn(policy_logp=logp, ref_logp=b.ref_logp, mask=b.seq.loss_mask,
                                desirable=b.desirable, reference_point=z0)
        return value, {**metrics, **m, "kto_z0": z0}
