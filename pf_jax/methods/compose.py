"""A recipe's method, composed: its objective, the kind of its response source and the response source
itself, and the check that the recipe gives the method what it needs (before any weights load)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pf_jax.config import ConfigError, load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.codec import TextCodec
from pf_jax.methods.env_rollouts import EnvRollouts
from pf_jax.methods.prompts import SAMPLED
from pf_jax.methods.protocols import Needs, Objective, ResponseSource
from pf_jax.methods.recipe_checks import check_keys_apply
from pf_jax.methods.registry import METHODS, Method, get_method, keeps_reference, single_sample_problem
from pf_jax.methods.responses import (
    DatasetCompletions,
    DatasetPairs,
    LabelledTextsSource,
    PairsFromSamples,
    PolicySamples,
)
from pf_jax.methods.scoring import Scorer
from pf_jax.models.errors import ModelInputError
from pf_jax.models.lora import LoraSpec
from pf_jax.rewards.text_rewards import RewardFn
from pf_jax.sampling.texts import generation_config
from pf_jax.tasks.rewards import INTERNAL_REWARDS, answer_format, build_reward

COMPLETION_KINDS = ("dataset", "policy", "reference")  # what `method.responses` may switch between


@dataclass(frozen=True)
class Composition:
    """method: the registry record; objective: built for the recipe; kind: the response source kind;
    reference: a frozen copy of the initial policy is kept."""

    method: Method
    objective: Objective
    kind: str
    reference: bool

    @property
    def samples(self) -> bool:
        """Responses come from the sampler (policy, reference or environment), not from the data."""
        return self.kind in SAMPLED

    @property
    def trains_policy(self) -> bool:
        """False when only a head trains (the classifier with reward_model.freeze_backbone)."""
        return getattr(self.objective, "trains_policy", True)


def check_recipe(cfg: TrainConfig) -> Method:
    """The recipe's method, after checking that the recipe fits it: a known name (the nearest named
    otherwise), a reward where the method needs one, a `method.responses` switch it can take."""
    m = get_method(cfg.method.name)
    if m.reward and cfg.reward.name is None:
        raise ConfigError(f"method {m.name!r} needs a reward: set reward.name (one of the rewards in "
                          "pf_jax.tasks.rewards.REWARDS)")
    if cfg.method.responses is not None and m.responses not in COMPLETION_KINDS:
        raise ConfigError(f"method.responses={cfg.method.responses!r}: method {m.name!r} trains on "
                          f"{m.responses!r} responses, which cannot be switched (method.responses applies to "
                          f"{', '.join(n for n, x in METHODS.items() if x.responses in COMPLETION_KINDS)})")
    _check_groups(cfg, m)
    _check_async(cfg, m)
    _check_lora(cfg)
    check_keys_apply(cfg, m)  # keys of another method, before any weights load (methods/recipe_checks.py)
    return m


def _check_async(cfg: TrainConfig, m: Method) -> None:
    """rollout.mode=async corrects stale samples with the method's importance ratio (Method.importance):
    a method without one (supervised, preference, RFT, the multi-turn methods) cannot take them."""
    if cfg.rollout.mode != "async":
        return
    if m.importance is None or (cfg.method.responses or m.responses) != "policy":
        supported = ", ".join(n for n, x in METHODS.items() if x.importance is not None and x.responses == "policy")
        raise ConfigError(f"rollout.mode=async: method {m.name!r} has no importance ratio to correct samples of an "
                          f"older policy with; asynchronous rollouts support {supported} (or set "
                          "rollout.mode=sync)")


def _check_lora(cfg: TrainConfig) -> None:
    """model.lora against what it can serve: known targets, no adapters on a backbone the recipe freezes,
    QLoRA's quantised base on one device (its sharding on a mesh is not written yet)."""
    lora = cfg.model.lora
    if lora is None:
        return
    try:
        LoraSpec(lora.rank, lora.alpha, lora.dropout, LoraSpec.resolve_targets(lora.targets), lora.init)
    except ModelInputError as error:
        raise ConfigError(f"model.lora.targets: {error}") from None
    if cfg.method.name == "reward_model" and cfg.reward_model.freeze_backbone:
        raise ConfigError("model.lora adapts the backbone that reward_model.freeze_backbone=true freezes: "
                          "drop one of the two")
    if lora.quantize is not None and max(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) > 1:
        raise qlora_on_a_mesh(lora.quantize)


def qlora_on_a_mesh(qtype: str) -> ConfigError:
    return ConfigError(f"model.lora.quantize={qtype!r}: a quantised base on a mesh of several devices is not "
                       "supported yet; train QLoRA on one device, or LoRA without quantize on the mesh")


def _check_groups(cfg: TrainConfig, m: Method) -> None:
    """One sample per prompt leaves a group-relative method nothing to compare (every advantage 0)."""
    why = single_sample_problem(cfg, m)
    if why is not None:
        raise ConfigError(f"method {m.name!r} with rollout.samples_per_prompt=1: {why}, and one sample has nothing "
                          "to be compared with (every advantage is 0), so nothing would be learned; set "
                          "rollout.samples_per_prompt >= 2")


def load_recipe(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """`load_config(TrainConfig, path, overrides)` checked against its method (check_recipe)."""
    cfg = load_config(TrainConfig, path, overrides)
    check_recipe(cfg)
    return cfg


def compose(cfg: TrainConfig) -> Composition:
    """The recipe's method with its objective built (a misspelt `method.loss` key is a ConfigError here)."""
    m = check_recipe(cfg)
    kind = cfg.method.responses or m.responses
    return Composition(m, m.build(cfg, m), kind, keeps_reference(cfg, m))


def response_source(cfg: TrainConfig, composition: Composition, codec: TextCodec, scorer: Scorer,
                    reward: RewardFn | None = None) -> ResponseSource:
    """The response source of the composition's kind, computing what its objective needs; `reward`: the
    recipe's text reward (recipe_reward), for the sampled kinds."""
    needs, kind = composition.objective.needs, composition.kind
    if kind in ("dataset", "kto"):
        packed = cfg.data.packed_length if cfg.data.packing else None  # data.packing: SFT only (recipe_checks)
        return DatasetCompletions(codec, scorer, needs, "answer" if kind == "dataset" else "completion",
                                  cfg.data.assistant_only_loss, packed)
    if kind == "pairs":
        return DatasetPairs(codec, scorer, needs)
    if kind == "labelled":
        return LabelledTextsSource(codec, cfg.reward_model.max_length)
    gen = generation_config(cfg.rollout, codec)
    if kind == "env":
        return EnvRollouts(cfg.env, codec, gen, scorer, needs, cfg.data.max_prompt_tokens)
    samples = _policy_samples(cfg, codec, scorer, gen, needs, reward, sample_from=kind)
    return PairsFromSamples(samples, scorer) if kind == "sample_pairs" else samples


def _policy_samples(cfg: TrainConfig, codec: TextCodec, scorer: Scorer, gen: Any, needs: Needs,
                    reward: RewardFn | None, *, sample_from: str) -> PolicySamples:
    internal = cfg.reward.name if cfg.reward.name in INTERNAL_REWARDS else None
    if sample_from == "sample_pairs":  # the pairs are ranked by reward
        needs, sample_from = Needs(reward=True), "policy"
    return PolicySamples(codec, gen, scorer, needs, cfg.rollout.samples_per_prompt, reward, internal,
                         cfg.reward.scale, answer_format(cfg.reward.name, cfg.data.source), sample_from)


def recipe_reward(cfg: TrainConfig) -> RewardFn | None:
    """The recipe's text reward (None: no reward, or an internal one computed from the policy)."""
    if cfg.reward.name is None:
        return None
    try:
        return build_reward(cfg.reward.name, cfg.reward.scale, soft_scorer=cfg.reward.soft_scorer,
                            on_error=cfg.reward.on_error)
    except ValueError as error:
        raise ConfigError(f"reward.name: {error}") from error

