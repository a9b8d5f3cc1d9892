"""Every shipped method, one record each: where its responses come from, its objective and its loss.

A Method names the response source kind (pf_jax.methods.compose builds it, with the prompt source its
rows need), the objective's builder (the family's estimator bound in), the pure loss of pf_jax.losses with
the method's defaults (TRL / verl / paper values, methods/unified-rl.md), whether it needs a reward and
when it keeps a frozen reference. A recipe names a method by `method.name`; the recipe's `method.loss`
and `method.advantage` are bound on top of the defaults, checked against the functions' signatures.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Literal

from pf_jax.config import ConfigError
from pf_jax.config.recipe import TrainConfig
from pf_jax.losses import advantages as adv
from pf_jax.losses import classification, gflownet, policy_gradient, preference, supervised
from pf_jax.losses.cispo import cispo_loss
from pf_jax.methods import agentic as agentic_objective
from pf_jax.methods.agentic import Agentic
from pf_jax.methods.bound import Bound
from pf_jax.methods.classifier import ConstraintClassifier
from pf_jax.methods.gflownet import GFlowNet, powerflow_arguments, trajectory_arguments
from pf_jax.methods.policy_gradient import (
    Estimator,
    PolicyGradient,
    RatioLoss,
    gae,
    group_outcome,
    group_outcome_per_token,
    process_steps,
    token_returns,
)
from pf_jax.methods.preference import KTO, Preference
from pf_jax.methods.protocols import Objective
from pf_jax.methods.supervised import Supervised
from pf_jax.tasks.arithmetic import digit_step_rewards

ResponseKind = Literal["dataset", "pairs", "kto", "labelled", "policy", "reference", "sample_pairs", "env"]
SAMPLED: frozenset[str] = frozenset({"policy", "reference", "sample_pairs", "env"})


@dataclass(frozen=True)
class Method:
    """name; responses: the response source kind; build(cfg, method) -> the recipe's Objective; loss:
    the pure loss with the method's defaults; estimator: the family's estimator (policy gradient:
    an Estimator of advantages; agentic: the step advantages), None for the others; reward: a reward is
    needed; reference: when a frozen copy of the initial policy is kept ("if_kl": when a KL term is on);
    value_coef: weight of the value loss (PPO); importance: how a rollout sampled by an older policy is
    corrected (rollout.mode=async, pf_jax.losses.importance): TIS weights per `token`, per `sequence`
    (PowerFlow's sequence weight) or `geometric` (GSPO's length-normalised ratio); `off_policy`: the loss
    is valid for samples of any policy (trajectory balance), nothing to correct; None: no ratio to
    correct with, so no asynchronous rollouts."""

    name: str
    responses: ResponseKind
    build: Callable[[TrainConfig, Method], Objective]
    loss: Bound
    estimator: Any = None
    reward: bool = False
    reference: Literal["never", "always", "if_kl"] = "never"
    value_coef: float = 0.0
    importance: Literal["token", "sequence", "geometric", "off_policy"] | None = None


def _loss(cfg: TrainConfig, m: Method, **extra: Any) -> Callable[..., Any]:
    return m.loss.bind({**cfg.method.loss, **extra}, what="method.loss")


def keeps_reference(cfg: TrainConfig, m: Method) -> bool:
    """A frozen copy of the initial policy is kept when the method samples from it or always compares with
    it (DPO, PowerFlow's base model), or when a KL term is on: the loss's kl_coef (its default or the
    recipe's) or the reward's."""
    if (cfg.method.responses or m.responses) == "reference":
        return True
    if m.reference != "if_kl":
        return m.reference == "always"
    return bool(m.loss.value("kl_coef", cfg.method.loss, 0.0)) or bool(cfg.method.reward_kl_coef)


def single_sample_problem(cfg: TrainConfig, m: Method) -> str | None:
    """Why the method cannot learn from one sample per prompt, or None: group-relative advantages (GRPO,
    RLOO, ...) compare a sample with the others of its prompt, online DPO pairs its best and worst, a
    GFlowNet's group log Z is their mean residual."""
    kind = cfg.method.responses or m.responses
    if kind not in ("policy", "sample_pairs") or cfg.rollout.samples_per_prompt > 1:
        return None
    if isinstance(m.estimator, Estimator) and m.estimator.fn.accepts("group_ids"):
        return f"its advantages ({m.estimator.fn.fn.__name__}) compare each sample with the others of its prompt"
    if kind == "sample_pairs":
        return "its preference pairs are the best and the worst sample of a prompt"
    if is_gflownet(m) and cfg.method.log_z == "group":
        return "method.log_z=group estimates log Z from the samples of a prompt"
    return None


def is_gflownet(m: Method) -> bool:
    """A GFlowNet method (PowerFlow, the TB family): its objective is built by _gflownet."""
    return isinstance(m.build, partial) and m.build.func is _gflownet


def is_policy_gradient(m: Method) -> bool:
    """A single-turn policy-gradient method (PPO, GRPO and variants, RLOO, REINFORCE++, CISPO)."""
    return m.build is _policy_gradient


def _supervised(cfg: TrainConfig, m: Method) -> Supervised:
    return Supervised(_loss(cfg, m), keep_correct_only=m.reward, chunk_size=cfg.model.logprob_chunk)


def _ratio_loss(cfg: TrainConfig, m: Method) -> RatioLoss:
    value_coef = m.value_coef if cfg.method.value_coef is None else cfg.method.value_coef
    return RatioLoss(_loss(cfg, m), cfg.model.logprob_chunk, cfg.method.entropy_coef, value_coef)


def _policy_gradient(cfg: TrainConfig, m: Method) -> PolicyGradient:
    return PolicyGradient(_ratio_loss(cfg, m), m.estimator, cfg.method, reference=keeps_reference(cfg, m))


def _agentic(cfg: TrainConfig, m: Method) -> Agentic:
    return Agentic(_ratio_loss(cfg, m), m.estimator, cfg.env, reference=keeps_reference(cfg, m))


def _gflownet(cfg: TrainConfig, m: Method, *, arguments: Any, per_token: bool) -> GFlowNet:
    if "alpha" in cfg.method.loss:
        raise ConfigError("set the GFlowNet target exponent with method.alpha, not method.loss.alpha")
    alpha = {"alpha": cfg.method.alpha} if m.loss.accepts("alpha") else {}
    return GFlowNet(_loss(cfg, m, **alpha), arguments, cfg.method.alpha, per_token,
                    learned_partition=cfg.method.log_z == "head", head_width=cfg.model.log_z_width,
                    format_penalty=cfg.reward.format_penalty, chunk_size=cfg.model.logprob_chunk)


def _preference(cfg: TrainConfig, m: Method) -> Preference:
    return Preference(_loss(cfg, m), reference=m.reference != "never", chunk_size=cfg.model.logprob_chunk)


def _kto(cfg: TrainConfig, m: Method) -> KTO:
    return KTO(_loss(cfg, m), chunk_size=cfg.model.logprob_chunk)


def _classifier(cfg: TrainConfig, m: Method) -> ConstraintClassifier:
    r = cfg.reward_model
    return ConstraintClassifier(_loss(cfg, m), r.mlp_dim, r.freeze_backbone, r.max_length)


def _pg(name: str, estimator: Estimator, **loss: Any) -> Method:
    return Method(name, "policy", _policy_gradient, Bound(policy_gradient.ppo_clip_loss, loss), estimator,
                  reward=True, reference="if_kl", importance="token")


def _gfn(name: str, loss: Callable[..., Any], arguments: Any, per_token: bool, importance: str,
         **defaults: Any) -> Method:
    # The frozen base model defines the target log R = alpha log p_base: it is the reference copy.
    build = partial(_gflownet, arguments=arguments, per_token=per_token)
    return Method(name, "policy", build, Bound(loss, defaults), reference="always", importance=importance)


def _pref(name: str, loss: Callable[..., Any], reference: str = "always", **defaults: Any) -> Method:
    return Method(name, "pairs", _preference, Bound(loss, defaults), reference=reference)  # type: ignore[arg-type]


def _env(name: str, steps: Any) -> Method:
    # Multi-turn env rollouts: one batch row per policy turn; KL 0.01 (k3) to the initial policy by default.
    loss = Bound(policy_gradient.ppo_clip_loss, dict(clip_low=0.2, kl_coef=0.01, kl_estimator="k3",
                                                     aggregation="token_mean"))
    return Method(name, "env", _agentic, loss, steps, reference="if_kl")


_GRPO_LOSS = dict(clip_low=0.2, kl_coef=0.04, kl_estimator="k3", aggregation="seq_mean_token_mean")
_GRPO_ADVANTAGES = group_outcome(adv.grpo_outcome_advantages, normalize_std=True)
_GSPO = Bound(policy_gradient.gspo_loss, dict(clip_low=3e-4, clip_high=4e-4))

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in [
    Method("sft", "dataset", _supervised, Bound(supervised.nll_loss, {"aggregation": "token_mean"})),
    Method("rft", "reference", _supervised, Bound(supervised.nll_loss, {"aggregation": "token_mean"}), reward=True,
           reference="always"),
    Method("online_rft", "policy", _supervised, Bound(supervised.nll_loss, {"aggregation": "token_mean"}),
           reward=True),
    Method("ppo", "policy", _policy_gradient,
           Bound(policy_gradient.ppo_clip_loss, dict(clip_low=0.2, dual_clip=3.0, aggregation="token_mean")),
           gae(adv.gae_advantages, gamma=1.0, lam=0.95), reward=True, reference="if_kl", value_coef=0.1,
           importance="token"),
    _pg("grpo", _GRPO_ADVANTAGES, **_GRPO_LOSS),
    _pg("grpo_process", process_steps(adv.grpo_process_advantages, digit_step_rewards), **_GRPO_LOSS),
    _pg("dr_grpo", group_outcome(adv.grpo_outcome_advantages, normalize_std=False), clip_low=0.2, kl_coef=0.0,
        aggregation="seq_mean_token_sum_norm"),
    _pg("dapo", _GRPO_ADVANTAGES, clip_low=0.2, clip_high=0.28, kl_coef=0.0, aggregation="token_mean"),
    Method("gspo", "policy", _policy_gradient, _GSPO, _GRPO_ADVANTAGES, reward=True, reference="if_kl",
           importance="geometric"),
    Method("gspo_token", "policy", _policy_gradient, Bound(policy_gradient.gspo_loss, {**_GSPO.defaults,
           "token_level": True}), _GRPO_ADVANTAGES, reward=True, reference="if_kl", importance="token"),
    Method("cispo", "policy", _policy_gradient, Bound(cispo_loss), _GRPO_ADVANTAGES, reward=True, reference="if_kl",
           importance="token"),
    _pg("rloo", group_outcome(adv.rloo_advantages), clip_low=0.2, aggregation="seq_mean_token_mean"),
    _pg("reinforce_pp", token_returns(adv.reinforce_pp_advantages, gamma=1.0), clip_low=0.2,
        aggregation="token_mean"),
    _pg("reinforce_pp_baseline", group_outcome_per_token(adv.reinforce_pp_baseline_advantages), clip_low=0.2,
        kl_coef=0.001, kl_estimator="k3", aggregation="token_mean"),
    _gfn("powerflow", gflownet.powerflow_loss, powerflow_arguments, True, "sequence", clip_eps=0.2),
    _gfn("tb", gflownet.trajectory_balance_loss, trajectory_arguments("log_z"), False, "off_policy"),
    _gfn("length_aware_tb", gflownet.length_aware_tb_loss, trajectory_arguments("log_z_prime"), True, "off_policy"),
    _gfn("tb_token", gflownet.tb_token_loss, trajectory_arguments("log_z"), False, "off_policy"),
    _pref("dpo", preference.dpo_loss, beta=0.1),
    _pref("cdpo", preference.dpo_loss, beta=0.1, label_smoothing=0.1),
    _pref("robust_dpo", preference.robust_dpo_loss, beta=0.1, label_smoothing=0.1),
    _pref("ipo", preference.ipo_loss, tau=0.1),
    _pref("simpo", preference.simpo_loss, reference="never", beta=2.0, gamma=0.5),
    _pref("orpo", preference.orpo_loss, reference="never", lam=0.1),
    Method("kto", "kto", _kto, Bound(preference.kto_loss, {"beta": 0.1}), reference="always"),
    Method("online_dpo", "sample_pairs", _preference, Bound(preference.dpo_loss, {"beta": 0.1}), reward=True,
           reference="always"),
    Method("reward_model", "labelled", _classifier, Bound(classification.binary_cross_entropy_loss)),
    _env("rewardflow", agentic_objective.rewardflow_steps),
    _env("gigpo", agentic_objective.gigpo_steps),
    _env("grpo_episode", agentic_objective.episode_return_steps),
]})


def get_method(name: str) -> Method:
    """The record of `name`; an unknown name is a ConfigError naming the nearest method."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} (known: {', '.join(METHODS)})")
    return METHODS[name]


def make_loss_fn(name: str, **overrides: Any) -> Callable[..., Any]:
    """The method's pure loss with its defaults (then `overrides`) bound as keyword arguments."""
    return get_method(name).loss.bind(overrides, what=f"method {name!r}")


def make_advantage_fn(name: str, **overrides: Any) -> Callable[..., Any]:
    """The method's advantage estimator with its defaults bound; a ConfigError if the method has none."""
    m = get_method(name)
    if not isinstance(m.estimator, Estimator):
        raise ConfigError(f"method {name!r} has no advantage estimator")
    return m.estimator.fn.bind(overrides, what=f"method {name!r}")
