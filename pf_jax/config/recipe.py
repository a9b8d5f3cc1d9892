"""The typed schema of a training recipe: YAML files in configs/ plus dotted CLI overrides.

A recipe names the three choices of DESIGN.md — where prompts come from (`data`), where responses come
from (`method.responses`, defaulted by the method), and the gradient coefficient (`method.name` and its
`method.loss` arguments) — plus the reward, the model, the optimizer and the run's bookkeeping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pf_jax.config.mesh import MeshConfig
from pf_jax.config.sections import CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig, Section

DType = Literal["float32", "bfloat16"]

# The shipped recipes (default.yaml, the arithmetic and maze base models, the at-scale recipes, the model
# configs the dry run reads offline): package data, so an installed pf_jax finds them wherever it runs. A
# checkout's top-level configs/ is a link to this folder.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


class CurriculumSection(Section):
    """How an instruction source's levels are sampled (data.source: instructions_synthetic[_hard] or a
    curriculum jsonl): an instruction uniformly, then a level uniformly in 1..min(k, max_level(step)).

    schedule: `uniform` (every level always) or `linear` (max_level ramps start_level -> end_level over
    ramp_steps steps). synthetic_instructions: how many synthetic instructions a synthetic source makes.
    seed: of the level sampling (None: data.shuffle_seed).
    """

    schedule: Literal["uniform", "linear"] = "uniform"
    start_level: int = Field(1, ge=1)
    end_level: int = Field(4, ge=1)
    ramp_steps: int = Field(100, ge=1)
    synthetic_instructions: int = Field(64, ge=1)
    seed: int | None = None


class RewardModelSection(Section):
    """The constraint classifier trained by `method.name: reward_model` (backbone = the recipe's model).

    mlp_dim: width of ConstraintClassifierHead's hidden layer. freeze_backbone: train the head only.
    max_length: classifier inputs are cut to this many tokens. synthetic_examples: rows per soft constraint
    of the synthetic source `soft_constraints_synthetic` (the test split has held-out topics).
    eval_examples: held-out rows scored after training (accuracy in the run summary); 0 disables.
    """

    mlp_dim: int = Field(128, ge=1)
    freeze_backbone: bool = False
    max_length: int = Field(128, ge=4)
    synthetic_examples: int = Field(512, ge=2)
    eval_examples: int = Field(200, ge=0)


class TinyModelConfig(Section):
    """Sizes of a decoder trained from scratch (`model.name: tiny`); the vocabulary comes from the data."""

    architecture: Literal["llama", "qwen2", "qwen3", "gemma3"] = "llama"
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(512, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=2)
    init_seed: int = 0
    # char: the arithmetic characters; words: pf_jax.data.word_codec over the instruction tasks' vocabulary;
    # maze-words: the lower-casing word codec over the maze's vocabulary (pf_jax.tasks.maze)
    tokenizer: Literal["char", "words", "maze-words"] = "char"


class LoraSection(Section):
    """LoRA adapters on the policy (`model.lora`; absent: full fine-tuning). Only the adapters (and the
    method's own heads) train; the base stays frozen in its storage dtype and is the reference / base model
    of methods that keep one, so no second copy of the model is kept.

    rank, alpha: y = x W + (alpha / rank) x A B. dropout: on the adapter's input while training.
    targets: HF / PEFT projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj),
    `all-linear` for all seven, and `embed_tokens` for the input embedding. init: A's initialisation,
    `gaussian` N(0, 1/rank) or `kaiming` (PEFT's default); B starts at 0, so step 0 is the base model.
    init_from: a PEFT adapter directory to continue from (its rank, alpha and targets replace these).
    quantize: QLoRA's frozen base, stored `int8` (per output channel), `int4` or `nf4` (per group of
    `group_size` inputs) and dequantised layer by layer; None keeps it in param_dtype.
    sampler: how rollouts decode with the adapters: `merge` (W + (alpha/rank) A B once per update, then the
    base model's fast decode) or `apply` (the adapters in every decode step).
    """

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)
    init: Literal["gaussian", "kaiming"] = "gaussian"
    init_from: str | None = None
    quantize: Literal["int8", "int4", "nf4"] | None = None
    group_size: int = Field(64, ge=1)
    sampler: Literal["merge", "apply"] = "merge"


class ModelSection(Section):
    """The policy to train (and, frozen, its reference / base copy).

    name: `tiny` (from scratch), `arith-base` (the built-in arithmetic base model, trained by
    configs/arith/base.yaml on first use), an embedded alias such as `gemma3-270m`, a local HF or pf_jax
    export directory, a `.gguf` file, or a hub name (online only).
    dtype: compute dtype; param_dtype: storage dtype of the trained parameters. float32 storage with
    bfloat16 compute is mixed precision with float32 master weights.
    chat_template: false renders text prompts as they are, true wraps them as a user turn of the
    tokenizer's chat template; a name (`gemma3`, `qwen2.5`: pf_jax/models/chat_templates) or a `.jinja`
    path sets that template first. Conversational rows always use a template.
    scan_layers: store the layers stacked and run them as one lax.scan (MaxText's `scan_layers`): one
    compiled block however deep the model, the layout for TPU pods. false: one parameter set per layer,
    unrolled, as torch and Tunix hold them. XLA:CPU then reads each layer's weights in place (Gemma 3 270M's
    GRPO gradient 9.8 -> 8.6 s in isolation on a 2-core AVX2 EPYC), but the whole step gained nothing on an
    AVX-512 EPYC and the update compiled in 222 s instead of 13. A checkpoint keeps its layout; resuming
    with the other one is refused.
    """

    name: str = "arith-base"
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    remat: bool = False
    scan_layers: bool = True
    logprob_chunk: int = Field(128, ge=1)
    chat_template: bool | str = False
    log_z_width: int = Field(128, ge=1)
    lora: LoraSection | None = None


class RolloutSection(Section):
    """How responses are sampled from a policy and how often each rollout batch is reused.

    batching: `static` decodes every sample of a rollout in one batch until the longest ends;
    `continuous` decodes `slots` rows at a time and gives a row whose sample ended (EOS, a stop token,
    max_new_tokens) to the next waiting sample (pf_jax.sampling.continuous). Its draws are keyed per
    sample, so its samples differ from static's for the same seed; they do not depend on `slots`.
    slots: rows decoded at once with continuous batching (null: one per sample); their KV cache must fit
    in memory. With the sampler's weights on a mesh, the slots are split over its batch axes (rounded up
    to a multiple of their shard count), as static batching splits its rows, and so are the prompts: each
    shard's slots take the samples of its own prompts.
    kv_cache: where continuous batching keeps the slots' keys and values: `dense`, a row of prompt bucket +
    max_new_tokens per slot; `paged`, one pool of page_size-token pages (pf_jax.sampling.slot_caches): a
    prompt's pages are shared by its samples, a sample takes a page each time it writes past its pages and
    frees them when it ends. kv_pages: the pool's pages for the samples (null: every slot's worst case, at
    least one sample's); with fewer, the youngest samples are preempted when pages run out and start again
    later, drawing the same tokens, so memory follows the tokens held. Paged runs on one device for now.
    mode: `sync` samples each step's rollout with the policy being updated; `async` samples step s + k's
    rollout (k = max_staleness) with the policy of step s on a background thread while step s updates
    (pf_jax.training.async_rollouts). Losses then take the ratio against the policy before the update and
    weight each token by the truncated importance ratio min(pi_before / pi_sampler, tis_cap) to the
    sampler's own log-probs (TIS). max_staleness 0 is synchronous. tis_cap null: no correction (the ratio
    is taken against the sampler's log-probs as in sync mode; an ablation).
    devices: give the rollout its own group of this many devices (the last ones; one process): the
    sampler, its scoring passes and evaluation run there, the update on a mesh of the others (laid out
    by `mesh:`), and the weights move between the two once per rollout, timed as rollout/reshard_s.
    null: rollout and update share every device.
    min_new_tokens: EOS is not sampled before this many tokens (fixed-length rollouts, e.g. for
    benchmarks; transformers' min_new_tokens); stop strings still cut. At most max_new_tokens.
    """

    prompts_per_step: int = Field(16, ge=1)
    samples_per_prompt: int = Field(8, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    max_new_tokens: int = Field(16, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    updates_per_batch: int = Field(1, ge=1)
    minibatches: int = Field(1, ge=1)
    stop: list[str] = Field(default_factory=list)
    batching: Literal["static", "continuous"] = "static"
    slots: int | None = None
    kv_cache: Literal["dense", "paged"] = "dense"
    page_size: int = Field(16, ge=1)
    kv_pages: int | None = Field(None, ge=1)
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1
    tis_cap: float | None = 2.0
    devices: int | None = None

    @field_validator("max_staleness")
    @classmethod
    def _staleness_not_negative(cls, k: int) -> int:
        if k < 0:
            raise ValueError(f"rollout.max_staleness (how many updates older than the learner a rollout's policy "
                             f"may be) must be >= 0, got {k}")
        return k

    @field_validator("tis_cap")
    @classmethod
    def _cap_positive(cls, cap: float | None) -> float | None:
        if cap is not None and not cap > 0:
            raise ValueError(f"rollout.tis_cap (the truncation of the importance weight pi_before / pi_sampler) "
                             f"must be > 0, got {cap}")
        return cap

    @field_validator("slots", "devices")
    @classmethod
    def _count_positive(cls, n: int | None, info: ValidationInfo) -> int | None:
        what = {"slots": "rows decoded at once", "devices": "the devices of the rollout group"}[info.field_name]
        if n is not None and n <= 0:
            raise ValueError(f"rollout.{info.field_name} ({what}) must be >= 1, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("a stop string must not be empty")
        return stop

    @model_validator(mode="after")
    def _min_within_max(self) -> RolloutSection:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"rollout.min_new_tokens={self.min_new_tokens} exceeds rollout.max_new_tokens="
                             f"{self.max_new_tokens}")
        if self.kv_cache == "paged" and self.batching != "continuous":
            raise ValueError("rollout.kv_cache=paged is continuous batching's cache: set rollout.batching=continuous")
        return self


class MethodSection(Section):
    """The gradient coefficient and, by default, the response source the method implies.

    name: a method of pf_jax.methods.registry.METHODS (sft, rft, online_rft, ppo, grpo, grpo_process,
    dr_grpo, dapo, gspo, gspo_token, rloo, reinforce_pp, reinforce_pp_baseline, powerflow, tb,
    length_aware_tb, tb_token, dpo, cdpo, robust_dpo, ipo, simpo, orpo, kto, online_dpo).
    loss / advantage: keyword arguments bound to the method's loss / advantage function (checked against
    its signature: a misspelt key is an error naming the nearest argument).
    responses: override the response source (`dataset`, `policy`, `reference`).
    reward_kl_coef: KL to the reference folded into the token rewards (PPO, REINFORCE++), k1 estimator.
    alpha: the GFlowNet target exponent, log R = alpha log p_base (PowerFlow: 4 sharpens, 0.5 flattens).
    log_z: GFlowNet partition estimate: `head` = the learned per-prompt log Z'(q) MLP (PowerFlow, FlowRL);
        `group` = the least-squares value over the prompt's samples, mean_i [target_i - logpi_old_i]
        per token (the VarGrad / log-variance estimate, Richter et al. 2020), no extra parameters.
    """

    name: str = "powerflow"
    alpha: float = Field(4.0, gt=0.0)
    log_z: Literal["head", "group"] = "head"
    loss: dict[str, Any] = Field(default_factory=dict)
    advantage: dict[str, Any] = Field(default_factory=dict)
    responses: Literal["dataset", "policy", "reference"] | None = None
    entropy_coef: float = Field(0.0, ge=0.0)
    reward_kl_coef: float = Field(0.0, ge=0.0)
    value_coef: float | None = Field(None, ge=0.0)
    dynamic_sampling: bool = False
    overlong_max_tokens: int | None = Field(None, ge=1)
    overlong_cache_tokens: int | None = Field(None, ge=1)


class RewardSection(Section):
    """What scores a response (where the method uses a reward): a name of pf_jax.tasks.rewards.REWARDS, or
    `package.module:function`, a function (prompts, completions, **row fields) -> one float per completion
    (TRL's reward_funcs convention). on_error: what a reward that raises or returns a non-finite value for
    a row does: `stop` the run naming the row, or count it and give it reward `zero`.

    format_penalty: PowerFlow's psi(y), added to the base log-likelihood target when the response has no
    parseable answer (0 disables it).
    soft_scorer: for `instructions`, an exported constraint classifier (method reward_model) that scores
    soft constraints.
    """

    name: str | None = None
    scale: float = 1.0
    format_penalty: float = Field(0.0, le=0.0)
    soft_scorer: str | None = None  # `instructions`: directory of an exported reward_model classifier
    on_error: Literal["stop", "zero"] = "stop"


class EnvSection(Section):
    """Multi-turn environment rollouts (methods with `responses="env"`: rewardflow, gigpo, grpo_episode).

    name: the environment (maze, sokoban, textworld); tasks: task strings (maze-4x4, sokoban-6x6,
    tw-simple / tw-cooking / a game file); task_seeds: seeds seed_offset .. seed_offset+task_seeds-1 of
    every task form the task pool; tasks_per_step: (task, seed) groups per training step, group_size
    episodes each. max_steps: turns per episode; history_window: earlier turns shown in the prompt.
    gamma / invalid_penalty / step_weight: RewardFlow's (and GiGPO's) discount, the penalty of an invalid
    action and w in A = A_episode + w A_step. textworld_state_key: TextWorld's state key source.
    """

    name: Literal["maze", "sokoban", "textworld"] = "maze"
    tasks: list[str] = Field(default_factory=lambda: ["maze-4x4"], min_length=1)
    task_seeds: int = Field(16, ge=1)
    seed_offset: int = Field(0, ge=0)
    tasks_per_step: int = Field(4, ge=1)
    group_size: int = Field(8, ge=1)
    max_steps: int = Field(10, ge=1)
    history_window: int = Field(2, ge=0)
    require_action_tags: bool = False
    show_admissible_actions: bool = True
    gamma: float = Field(0.9, gt=0.0, le=1.0)
    invalid_penalty: float = Field(0.1, ge=0.0)
    step_weight: float = Field(1.0, ge=0.0)
    textworld_state_key: Literal["description", "feedback", "facts"] = "description"
    min_row_bucket: int = Field(32, ge=1)


class DistributionSection(Section):
    """The distribution-matching probe of a GFlowNet recipe (PowerFlow, TB, ...; pf_jax.evaluation.
    distribution_match): on the first `prompts` held-out problems, `samples` base-model samples each give
    the candidate set (the distinct responses); every `every_steps` steps (and before the first and after
    the last) each candidate is scored by teacher forcing under the base and the policy, and the policy's
    distribution on the set is compared with p_base^alpha (and its length-tilted fixed point) by total
    variation, KL and the pairwise inversion rate, logged as dist/* metrics and plotted over steps."""

    enabled: bool = False
    prompts: int = Field(64, ge=1)
    samples: int = Field(64, ge=2)
    every_steps: int = Field(10, ge=1)


class EvalSection(Section):
    """Held-out accuracy (avg@k, maj@k, pass@k) and diversity of the base and the trained policy.

    The held-out rows never include training rows: `source` (another file or dataset; None: data.source)
    at `split`, or with `fraction` a hash-based share of data.source's rows that training leaves out. A
    local file has no splits, so with neither `source` nor `fraction` the in-run evaluation is skipped.
    """

    enabled: bool = True
    problems: int = Field(200, ge=1)
    samples: int = Field(8, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    every_steps: int | None = Field(None, ge=1)
    split: str = "test"
    source: str | None = None
    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    distribution: DistributionSection = DistributionSection()

    @model_validator(mode="after")
    def _one_held_out_set(self) -> EvalSection:
        if self.source is not None and self.fraction is not None:
            raise ValueError("eval.source and eval.fraction name two held-out sets; set one of them")
        return self


class TrainingSection(Section):
    """How the step loop guards a run: after `max_consecutive_skips` steps in a row whose every update was
    skipped (non-finite loss, gradient or update) the run stops, saving what it had, without exporting."""

    max_consecutive_skips: int = Field(20, ge=1)


class ExportSection(Section):
    """What a finished run writes into <run_dir>/export. `export: false` in a recipe is `export.enabled:
    false`. merge: with LoRA, also write the merged full model (W + (alpha/rank) A B) as an HF directory
    in export/ beside the PEFT adapter in export/adapter/; without LoRA the policy is always exported whole.
    dtype: the exported weights' dtype (None: model.param_dtype). push_to_hub: a hub repo id the export is
    uploaded to when the run finishes (online only; offline it is skipped with a message)."""

    enabled: bool = True
    merge: bool = True
    dtype: DType | None = None
    push_to_hub: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


class TrainConfig(Section):
    """A whole recipe. `steps` counts rollout batches (one prompt batch each), not optimizer updates.
    The schema checks each section; whether the recipe fits its method (a reward where one is needed,
    loss arguments the method's loss takes) is pf_jax.methods.compose.check_recipe's."""

    model: ModelSection = ModelSection()
    data: DataConfig = DataConfig()
    method: MethodSection = MethodSection()
    reward: RewardSection = RewardSection()
    rollout: RolloutSection = RolloutSection()
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalSection = EvalSection()
    curriculum: CurriculumSection = CurriculumSection()
    reward_model: RewardModelSection = RewardModelSection()
    env: EnvSection = EnvSection()
    mesh: MeshConfig = MeshConfig()  # (data, fsdp, tensor) over all devices; one device: all axes 1 (or -1)
    training: TrainingSection = TrainingSection()
    steps: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    export: ExportSection = ExportSection()
