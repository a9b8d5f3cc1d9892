"""The three objects a method is made of (DESIGN.md) and the records that pass between them.

    PromptSource    yields this process's prompt rows of each step; its position is checkpointed
    ResponseSource  turns those rows into responses, scored as the objective declares (`Needs`):
                    dataset responses, policy or reference samples, pairs from samples, env rollouts
    Objective       declares its typed batch (pf_jax.methods.batches) and what it needs scored; its
                    estimator turns the responses into that batch (group advantages, GAE, the TB
                    target, propagated step rewards); its loss is a pure pf_jax.losses function over the
                    policy's forward pass, run inside the jitted update

None of the three knows the others: the trainer hands the rows of a PromptSource to a ResponseSource,
and what that returns to the Objective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx

from pf_jax.data.codec import TextCodec
from pf_jax.data.iterator import IteratorState
from pf_jax.data.sequences import SequenceBatch
from pf_jax.envs.episodes import Episode
from pf_jax.models.hf_io import export_hf_directory

Row = Mapping[str, Any]
Metrics = dict[str, float]


@dataclass(frozen=True)
class Needs:
    """What an objective needs scored besides the responses: a reward per response, the frozen
    reference's (or base model's) log-probs, the value head's values."""

    reward: bool = False
    reference_logp: bool = False
    values: bool = False


@dataclass(frozen=True)
class Models:
    """The modules a response source may run, as the sampler uses them: graph definitions and parameters
    of the trained modules (the policy whole: with LoRA, its adapters and base together; its heads), the
    frozen reference (None: the recipe keeps none) with its graph (None: the policy's; with LoRA, the
    policy without adapters over the base), and the sampler's own (graph, parameters) when rollouts
    decode another form of the policy (LoRA merged into the weights); None: the policy itself."""

    graphdefs: Mapping[str, nnx.GraphDef]
    params: Mapping[str, nnx.State]
    reference: nnx.State | None = None
    reference_graphdef: nnx.GraphDef | None = None
    sampler: tuple[nnx.GraphDef, nnx.State] | None = None

    def policy(self) -> nnx.Module:
        return nnx.merge(self.graphdefs["policy"], self.params["policy"])

    def reference_model(self) -> nnx.Module:
        return nnx.merge(self.reference_graphdef or self.graphdefs["policy"], self.reference)

    def sampler_model(self) -> nnx.Module:
        return self.policy() if self.sampler is None else nnx.merge(*self.sampler)


@dataclass
class Completions:
    """One response per dataset row, or G samples per prompt (group_ids[i] = the row of response i)."""

    rows: Sequence[Row]
    seq: SequenceBatch
    group_ids: np.ndarray
    texts: list[str] | None = None
    behaviour_logp: jax.Array | None = None  # exact log-probs under the policy that sampled them
    proximal_logp: jax.Array | None = None  # async rollouts: the log-probs of the policy before the update
    importance_weight: jax.Array | None = None  # async: TIS weights to the sampler, [N, R] or [N]
    rewards: np.ndarray | None = None  # float32 [N]
    ref_logp: jax.Array | None = None
    values: jax.Array | None = None
    has_answer: np.ndarray | None = None  # bool [N]: the task's answer format was found
    metrics: Metrics = field(default_factory=dict)


@dataclass
class Pairs:
    """A chosen and a rejected response per prompt row, in one layout (one forward pass for both)."""

    rows: Sequence[Row]
    chosen: SequenceBatch
    rejected: SequenceBatch
    ref_chosen_logp: jax.Array | None = None
    ref_rejected_logp: jax.Array | None = None
    metrics: Metrics = field(default_factory=dict)


@dataclass
class EpisodeRollout:
    """Multi-turn episodes and their policy turns packed one row per turn (padding rows have no response)."""

    episodes: list[Episode]
    seq: SequenceBatch
    behaviour_logp: jax.Array
    real: np.ndarray  # bool [N]: a real turn, not padding
    ref_logp: jax.Array | None = None
    metrics: Metrics = field(default_factory=dict)


@dataclass
class LabelledTexts:
    """Tokenised texts with a 0/1 label each (the constraint classifier's examples)."""

    tokens: jax.Array
    mask: jax.Array
    labels: jax.Array
    metrics: Metrics = field(default_factory=dict)


Responses = Completions | Pairs | EpisodeRollout | LabelledTexts


class PromptSource(Protocol):
    def next_batch(self) -> list[Any]: ...

    @property
    def state(self) -> IteratorState: ...

    def restore(self, state: IteratorState) -> None: ...


class ResponseSource(Protocol):
    def __call__(self, rows: Sequence[Row], models: Models, key: jax.Array) -> Responses: ...


class Objective(Protocol):
    """needs: what the response source must score; heads: modules trained beside the policy; batch: the
    estimator (responses -> typed batch, host metrics); loss: inside the jitted update; abstract_batch:
    the typed batch as ShapeDtypeStructs (the dry run); initialize: adjust the heads from the first batch;
    deliver: write what a finished run delivers; final_metrics: evaluate it (into the run's summary);
    trains_policy: False when only a head trains."""

    needs: Needs
    trains_policy: bool

    def heads(self, hidden_size: int, seed: int) -> dict[str, nnx.Module]: ...

    def batch(self, responses: Any) -> tuple[Any, Metrics]: ...

    def loss(self, modules: Mapping[str, nnx.Module], batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def abstract_batch(self, shape: Any) -> Any: ...

    def initialize(self, params: Mapping[str, nnx.State], graphdefs: Mapping[str, nnx.GraphDef], batch: Any,
                   num_prompts: int, mean: Callable[[float], float]) -> tuple[dict[str, nnx.State], Metrics]: ...

    def deliver(self, modules: Mapping[str, nnx.Module], codec: TextCodec, directory: Path) -> Path: ...

    def final_metrics(self, modules: Mapping[str, nnx.Module], codec: TextCodec, cfg: Any,
                      run_dir: Path) -> dict[str, Any]: ...


class ObjectiveDefaults:
    """What most objectives share: no heads, nothing to adjust at the first batch, the policy trains, and
    a finished run delivers the policy as an HF safetensors directory with its tokenizer."""

    trains_policy = True

    def heads(self, hidden_size: int, seed: int) -> dict[str, nnx.Module]:
        return {}

    def initialize(self, params: Mapping[str, nnx.State], graphdefs: Mapping[str, nnx.GraphDef], batch: Any,
                   num_prompts: int, mean: Callable[[float], float]) -> tuple[dict[str, nnx.State], Metrics]:
        return dict(params), {}

    def deliver(self, modules: Mapping[str, nnx.Module], codec: TextCodec, directory: Path) -> Path:
        export_hf_directory(modules["policy"], directory)
        codec.save(directory)
        return directory

    def final_metrics(self, modules: Mapping[str, nnx.Module], codec: TextCodec, cfg: Any,
                      run_dir: Path) -> dict[str, Any]:
        return {}
