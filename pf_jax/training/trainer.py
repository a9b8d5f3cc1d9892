"""The one training loop: prompts -> responses -> rewards -> estimator -> jitted update, for every method.

Resumption is exact: the RNG key of step s is fold_in(seed, s), the data position is checkpointed with
the parameters and optimizer state, so a run killed at any point and restarted with the same command
ends with the parameters of a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.config import ConfigError, DataConfig
from pf_jax.config.loading import config_to_yaml
from pf_jax.data.codec import TextCodec
from pf_jax.data.instruction_rows import instruction_source_kind, load_instruction_rows
from pf_jax.data.iterator import BatchIterator
from pf_jax.data.loading import load_preference_rows, load_prompt_rows, read_rows
from pf_jax.evaluation.scoring import MethodResult, Problem, score_responses
from pf_jax.losses import get_loss_method
from pf_jax.models.hf_io import export_hf_directory
from pf_jax.rewards.registry import ANSWER_EXTRACTORS, ARITHMETIC_CHECKER, build_reward
from pf_jax.training.agentic import AgenticExperience, agentic_task_rows
from pf_jax.training.batch import SequenceBatch
from pf_jax.training.checkpoint import Checkpointer, StopSignal, restore_data_position
from pf_jax.training.experience import ExperienceMaker, generation_config, sample_responses
from pf_jax.training.guards import SkipGuard, check_prompts_fit
from pf_jax.training.instruction_source import curriculum_batches
from pf_jax.training.methods import MethodSpec, method_spec
from pf_jax.training.metrics import MetricsLogger
from pf_jax.training.model_source import load_policy
from pf_jax.training.placement import MeshPlacement
from pf_jax.training.recipe import TrainConfig
from pf_jax.training.step import TrainState
from pf_jax.training.update import build_update


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    completed: bool
    summary: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, MethodResult] = field(default_factory=dict)
    export_dir: Path | None = None


def _uses_samples(cfg: TrainConfig, spec: MethodSpec) -> bool:
    return (cfg.method.responses or spec.responses) in ("policy", "reference", "env")


def _needs_reference(cfg: TrainConfig, spec: MethodSpec) -> bool:
    """A frozen copy of the initial policy is kept when the method always uses one (DPO, PowerFlow's
    base model) or when a KL term is on: the loss's kl_coef (its default or the recipe's) or the reward's."""
    if (cfg.method.responses or spec.responses) == "reference":
        return True
    if spec.reference != "if_kl":
        return spec.reference == "always"
    kl_coef = {**get_loss_method(spec.loss).loss_defaults, **cfg.method.loss}.get("kl_coef", 0.0)
    return bool(kl_coef) or bool(cfg.method.reward_kl_coef)


def _freezes_policy(cfg: TrainConfig, spec: MethodSpec) -> bool:
    """The policy is a frozen backbone (only the reward model's head trains): no optimizer state for it."""
    return spec.family == "reward_model" and cfg.reward_model.freeze_backbone


def load_training_rows(cfg: TrainConfig, spec: MethodSpec, codec: TextCodec) -> list[dict[str, Any]]:
    """Validated rows for the method: prompts (+ reference answers), SFT pairs, preference pairs, KTO rows."""
    count = lambda text: len(codec.encode_prompt(text))
    if spec.family == "reward_model":
        from pf_jax.training.reward_model import load_classifier_rows

        return load_classifier_rows(cfg.data, cfg.reward_model.synthetic_examples)
    if instruction_source_kind(cfg.data) is not None:
        if not _uses_samples(cfg, spec):
            raise ConfigError(f"data.source '{cfg.data.source}' gives instruction prompts without responses; method "
                              f"{spec.name!r} trains on dataset responses (use a sampling method, e.g. grpo)")
        return load_instruction_rows(cfg.data, cfg.curriculum.synthetic_instructions)
    if spec.family == "preference" and not spec.pairs_from_samples:
        rows = load_preference_rows(cfg.data, count)
    elif spec.family == "kto":
        raw = list(read_rows(cfg.data))
        rows_out = []
        for i, row in enumerate(raw):
            missing = [k for k in ("prompt", "completion", "label") if not isinstance(row, Mapping) or k not in row]
            if missing:
                if cfg.data.on_bad_row == "stop":
                    raise ConfigError(f"bad row {i} in {cfg.data.source}: missing field(s) {missing} for KTO")
                continue
            rows_out.append({"prompt": row["prompt"], "completion": row["completion"], "label": bool(row["label"])})
        print(f"[pf_jax] KTO rows: kept {len(rows_out)} of {len(raw)}")
        return rows_out
    else:
        rows = load_prompt_rows(cfg.data, count)
    if rows.report.skipped:
        print(f"[pf_jax] data: {rows.report.summary()}")
    return list(rows.rows)


class Trainer:
    """Builds every piece of a recipe once; `run()` trains, checkpoints, evaluates and exports."""

    def __init__(self, cfg: TrainConfig, *, process_index: int = 0, process_count: int = 1) -> None:
        self.cfg = cfg
        self.spec = spec = method_spec(cfg.method.name)
        self.run_dir = Path(cfg.logging.runs_dir) / cfg.logging.run_name
        self.process_index, self.process_count = process_index, process_count
        policy, self.codec = load_policy(cfg.model, runs_dir=cfg.logging.runs_dir)
        agentic = spec.responses == "env"
        self.rows = agentic_task_rows(cfg.env) if agentic else load_training_rows(cfg, spec, self.codec)
        self.sampling = _uses_samples(cfg, spec)
        check_prompts_fit(self.rows, lambda text: len(self.codec.encode_prompt(text)), policy.cfg, cfg, sampling=self.sampling)
        per_step = cfg.rollout.prompts_per_step if self.sampling else cfg.batch_size
        per_step = cfg.env.tasks_per_step if agentic else per_step
        self.iterator = BatchIterator(self.rows, per_step, seed=cfg.data.shuffle_seed, shuffle=cfg.data.shuffle,
                                      process_index=process_index, process_count=process_count)
        if self.sampling and (curriculum := curriculum_batches(cfg, per_step, process_index=process_index,
                                                               process_count=process_count)):
            self.iterator = curriculum

        update = build_update(cfg, spec, policy, sampling=self.sampling, frozen_policy=_freezes_policy(cfg, spec))
        self.graphdefs, params, self.loss_fn, self.tx = update.graphdefs, update.params, update.loss_fn, update.tx
        self.ref_params = jax.tree_util.tree_map(jnp.copy, params["policy"]) if _needs_reference(cfg, spec) else None
        self.updates_per_step = update.updates_per_step
        self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                                rng=jax.random.key(cfg.seed))
        compute, step_fn = update.compute_dtype, update.step_fn
        self.train_step = jax.jit(step_fn, donate_argnums=0)
        # More than one device: state on the mesh, step jitted with explicit shardings (training/placement.py).
        self.placement = MeshPlacement.from_config(cfg.mesh, sampler_dtype=compute)
        if self.placement is not None:
            self.state = self.placement.place_state(self.state)
            if self.ref_params is not None:
                self.ref_params = self.placement.place_params(self.ref_params)
            self.train_step = self.placement.shard_step(step_fn)

        reward_name = cfg.reward.name
        self.reward_fn = build_reward(reward_name, cfg.reward.scale, soft_scorer=cfg.reward.soft_scorer) if reward_name else None
        self.answer_format = ANSWER_EXTRACTORS.get(reward_name or "") or (
            ANSWER_EXTRACTORS["arithmetic"] if cfg.data.source.startswith("arithmetic") else None)
        self.instruction_eval: dict[str, dict[str, float]] = {}
        self.experience = ExperienceMaker(cfg, spec, self.codec, self.graphdefs, self.reward_fn, self.answer_format)
        self.agentic = AgenticExperience(cfg, spec.name, self.codec, self.graphdefs, self.experience.gen,
                                         self.experience.scorer) if agentic else None

    # -- one step --------------------------------------------------------------------------------------
    def step_key(self, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.cfg.seed), step)

    def make_batch(self, rows, step: int) -> tuple[dict, dict]:
        params = {k: self.sampler_view(p, cast=k == "policy") for k, p in self.state.params.items()}
        ref = self.sampler_view(self.ref_params, cast=True)
        if self.agentic is not None:
            return self.agentic.make_batch(rows, params, ref, self.step_key(step))
        if self.sampling:
            key = self.step_key(step)
            if self.process_count > 1:  # each process samples its own prompts: independent streams
                key = jax.random.fold_in(key, self.process_index)
            return self.experience.from_samples(rows, params, ref, key)
        return self.experience.from_dataset(rows, params, ref)

    def sampler_view(self, params: Any, *, cast: bool = False) -> Any:
        """Parameters as the sampler / scorer / evaluator / exporter uses them (the explicit transfer to the
        sampler layout on a mesh, decoder matrices in the compute dtype when `cast`; the training arrays
        themselves on one device)."""
        return params if self.placement is None else self.placement.sampler_params(params, cast=cast)

    def update(self, batch: dict, step: int) -> dict[str, float]:
        r = self.cfg.rollout
        n = jax.tree_util.tree_leaves(batch)[0].shape[0]
        minibatches = r.minibatches if self.sampling else 1
        if n % minibatches:
            raise ConfigError(f"rollout.minibatches={minibatches} does not divide the {n} sequences of a step")
        rng = np.random.default_rng([self.cfg.seed, step])
        collected: dict[str, list[float]] = {}
        for _ in range(r.updates_per_batch if self.sampling else 1):
            order = rng.permutation(n) if minibatches > 1 else np.arange(n)
            for part in np.split(order, minibatches):
                mb = jax.tree_util.tree_map(lambda x, idx=part: x[idx], batch) if minibatches > 1 else batch
                self.state, metrics = self.train_step(self.state, mb)
                for k, v in metrics.items():
                    collected.setdefault(k, []).append(float(v))
        out = {k: float(np.mean(v)) for k, v in collected.items()}
        out["skipped"] = float(np.sum(collected.get("skipped", [0.0])))
        return out

    def init_log_partition(self, batch: dict, num_prompts: int) -> float:
        """Start the log Z'(q) head at the least-squares value of the first batch (its output bias; the
        last layer's weights start at zero), so the policy's first updates are not spent on an offset
        that the head would otherwise take hundreds of steps to learn (e.g. -11 nats/token for Gemma)."""
        from pf_jax.training.experience import group_log_partition

        seq = batch["seq"]
        groups = np.repeat(np.arange(num_prompts), seq.prompt_tokens.shape[0] // num_prompts)
        estimate = group_log_partition(batch["log_reward"], batch["old_logp"], seq.response_mask, groups,
                                       num_prompts, per_token=self.spec.loss in ("powerflow", "length_aware_tb"))
        value = float(jnp.mean(estimate))
        if self.process_count > 1:  # each process saw its own prompts: the global batch's mean
            from jax.experimental import multihost_utils

            value = float(np.mean(multihost_utils.process_allgather(np.float32(value))))
        head = nnx.merge(self.graphdefs["log_z"], self.state.params["log_z"])
        head.out.bias[...] = jnp.full_like(head.out.bias[...], value)
        params = {**self.state.params, "log_z": nnx.state(head, nnx.Param)}
        self.state = self.state.replace(params=params)
        if self.placement is not None:
            self.state = self.placement.keep_layout(self.state)
        return value

    # -- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, name: str, policy_params: nnx.State, *, key: jax.Array) -> MethodResult | None:
        cfg = self.cfg
        if cfg.reward.name == "instructions" and cfg.eval.enabled and instruction_source_kind(cfg.data):
            from pf_jax.training.instruction_eval import evaluate_instruction_reward

            self.instruction_eval[name] = evaluate_instruction_reward(self, name, policy_params, key=key)
            return None
        checker = ARITHMETIC_CHECKER if (cfg.reward.name in (None, "arithmetic", "majority_vote")
                                         and cfg.data.source.startswith("arithmetic")) else None
        if cfg.reward.name in ("math", "majority_vote_math"):
            from pf_jax.evaluation.answer_checkers import MathVerifyChecker

            checker = MathVerifyChecker()
        if checker is None or not cfg.eval.enabled or self.agentic is not None:
            return None
        rows = self._eval_rows()
        problems = [Problem(r["prompt"], r["answer"], str(i)) for i, r in enumerate(rows)]
        model = nnx.merge(self.graphdefs["policy"], self.sampler_view(policy_params, cast=True))
        gen = generation_config(cfg, self.codec, temperature=cfg.eval.temperature)
        texts: list[list[str]] = []
        chunk = 64
        for start in range(0, len(problems), chunk):
            part = problems[start : start + chunk]
            _, _, t, _ = sample_responses(model, self.codec, [p.prompt for p in part], cfg.eval.samples,
                                          jax.random.fold_in(key, start), gen)
            k = cfg.eval.samples
            texts += [t[i * k : (i + 1) * k] for i in range(len(part))]
        settings = {"method": name, "temperature": cfg.eval.temperature, "samples": cfg.eval.samples}
        if name != "base" and self.spec.family == "gflownet":
            settings["alpha"] = cfg.method.alpha
        return score_responses(name, problems, texts, checker, settings)

    def _eval_rows(self) -> list[dict[str, Any]]:
        data = DataConfig(**{**self.cfg.data.model_dump(), "split": self.cfg.eval.split, "answer_field": "answer"})
        rows = list(load_prompt_rows(data).rows)
        return rows[: self.cfg.eval.problems]

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.process_index == 0:
            (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        # closed on any exit: a save in flight finishes even when the run raises
        with Checkpointer.from_config(cfg.checkpoint, self.run_dir) as checkpointer:
            start = 0
            if cfg.checkpoint.resume:
                # the target carries the current shardings: a checkpoint from another mesh / process count
                # is resharded onto this run's devices
                target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                self.state)
                restored = checkpointer.restore_latest(target, accept=lambda meta: restore_data_position(self.iterator, meta))
                if restored is not None:
                    self.state = restored.state
                    start = restored.step
                    print(f"[pf_jax] resumed {self.run_dir} at step {start}")
            eval_key = jax.random.fold_in(jax.random.key(cfg.seed), 10**9)
            evaluation: dict[str, MethodResult] = {}
            base_file = self.run_dir / "eval_base.json"
            if start == 0:
                base = self.evaluate("base", self.state.params["policy"], key=eval_key)
                if base is not None and self.process_index == 0:
                    base_file.write_text(json.dumps(base.to_json(include_responses=False)))
                    evaluation["base"] = base

            logger = MetricsLogger.from_config(cfg.logging, cfg.steps, process_index=self.process_index,
                                               resume_step=start, config=cfg.model_dump())
            completed = start >= cfg.steps
            done = start
            finished: tuple[int, Any, dict] | None = None  # the last step finished here: (step, state, meta)
            guard = SkipGuard.from_config(cfg, self.updates_per_step)
            with StopSignal() as stop, _saved_on_error(lambda: self._save_finished(checkpointer, finished)):
                for step in range(start, cfg.steps):
                    t0 = time.perf_counter()
                    rows = self.iterator.next_batch()
                    batch, info = self.make_batch(rows, step)
                    if step == 0 and "log_z" in self.graphdefs:
                        info["log_z_init"] = self.init_log_partition(batch, len(rows))
                    t1 = time.perf_counter()
                    metrics = self.update(batch, step)
                    t2 = time.perf_counter()
                    tokens = sum(int(v.response_mask.sum()) for v in batch.values() if isinstance(v, SequenceBatch))
                    metrics.update(info, rollout_s=t1 - t0, update_s=t2 - t1, tokens_per_s=tokens / max(t2 - t0, 1e-9))
                    logger.log(step + 1, metrics)
                    done = step + 1
                    meta = {"data": self.iterator.state.to_json()}
                    finished = (done, self.state, meta)
                    last = step + 1 == cfg.steps
                    checkpointer.save(step + 1, self.state, meta, force=last or stop.requested)
                    guard.observe(step + 1, metrics)
                    if last:
                        completed = True
                    if stop.requested and not last:
                        print(f"[pf_jax] {stop.received.name if stop.received else 'stop'} received: saved step {step + 1}, exiting")
                        break
                    if cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0 and not last:
                        mid = self.evaluate(f"step{step + 1}", self.state.params["policy"], key=eval_key)
                        if mid is not None:
                            logger.log(step + 1, {f"eval/{k}": v for k, v in mid.metrics.items()})
        summary = logger.close()
        result = RunResult(self.run_dir, done, completed, summary)
        if completed:
            if cfg.export:
                result.export_dir = self.export()
            if self.spec.family == "reward_model":
                from pf_jax.training.reward_model import evaluate_classifier

                result.summary["classifier_eval"] = evaluate_classifier(self)
            final = self.evaluate(cfg.method.name, self.state.params["policy"], key=eval_key)
            if final is not None:
                if "base" not in evaluation and base_file.exists():
                    evaluation["base"] = _result_from_json(json.loads(base_file.read_text()))
                evaluation[cfg.method.name] = final
                if self.process_index == 0:
                    self._report(evaluation)
        result.evaluation = evaluation
        return result

    def _save_finished(self, checkpointer: Checkpointer, finished: tuple[int, Any, dict] | None) -> None:
        """After an exception: save the last step this process finished, unless it is already saved or the
        state has moved on since (an update part-way through minibatches, or buffers donated to a failed
        update). Only with one process: a save is collective, and the other processes may not have failed."""
        if finished is None or self.process_count > 1:
            return
        step, state, meta = finished
        if state is not self.state or any(getattr(x, "is_deleted", lambda: False)()
                                         for x in jax.tree_util.tree_leaves(state)):
            print(f"[pf_jax] the run failed during step {step + 1}; step {step} cannot be saved (its state was "
                  f"already being updated)", file=sys.stderr)
            return
        if checkpointer.save(step, state, meta, force=True):
            checkpointer.wait()
            print(f"[pf_jax] the run failed during step {step + 1}; saved step {step} first: rerun the same command "
                  f"to resume from it", file=sys.stderr)

    def export(self) -> Path:
        directory = self.run_dir / "export"
        if self.spec.family == "reward_model":
            from pf_jax.training.reward_model import export_classifier

            return export_classifier(self, directory)
        model = nnx.merge(self.graphdefs["policy"], self.sampler_view(self.state.params["policy"]))
        if self.process_index == 0:
            export_hf_directory(model, directory)
            self.codec.save(directory)
        return directory

    def _report(self, evaluation: dict[str, MethodResult]) -> None:
        from pf_jax.evaluation.report import write_report

        write_report(self.run_dir / "eval", list(evaluation.values()),
                     title=f"{self.cfg.logging.run_name}: held-out accuracy", include_responses=False)


@contextlib.contextmanager
def _saved_on_error(save: Callable[[], None]) -> Iterator[None]:
    """Calls `save` when the body raises (Ctrl-C included), then lets the error go on; a failure of the save
    itself is reported, not raised over the original error."""
    try:
        yield
    except (Exception, KeyboardInterrupt):
        try:
            save()
        except Exception as error:  # the original error is the one to raise
            print(f"[pf_jax] could not save the last finished step: {type(error).__name__}: {error}", file=sys.stderr)
        raise


def _result_from_json(data: dict[str, Any]) -> MethodResult:
    return MethodResult(name=data["name"], settings=data["settings"], responses=[],
                        correct=np.zeros((data["num_problems"], data["samples_per_problem"]), bool),
                        answer_keys=[], metrics=data["metrics"],
                        pass_at_k={int(k): v for k, v in data["pass_at_k"].items()})


def train(cfg: TrainConfig) -> RunResult:
    """Run a recipe end to end (the body of `python -m pf_jax.train`); joins a multi-process run first
    when the environment describes one (pf_jax.sharding.distributed)."""
    from pf_jax.sharding.distributed import initialize_distributed

    initialize_distributed()
    return Trainer(cfg, process_index=jax.process_index(), process_count=jax.process_count()).run()
