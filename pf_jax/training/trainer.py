"""The one training loop: prompt rows -> responses -> the objective's batch -> jitted update, for every
method (pf_jax.methods composes the three; this loop knows only their protocols), with checkpoints,
metrics, evaluation hooks and the export of what the run delivers.

Resumption is exact: the RNG key of step s is fold_in(seed, s), the prompt source's position is
checkpointed with the parameters and optimizer state, so a run killed at any point and restarted with the
same command ends with the parameters of a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pf_jax.config import ConfigError
from pf_jax.config.loading import config_to_yaml
from pf_jax.config.recipe import TrainConfig
from pf_jax.evaluation.scoring import MethodResult
from pf_jax.methods.batches import response_token_count
from pf_jax.methods.compose import compose, qlora_on_a_mesh, recipe_reward, response_source
from pf_jax.methods.prompts import prompt_source, training_rows
from pf_jax.methods.protocols import Models
from pf_jax.methods.scoring import Scorer
from pf_jax.models.lora import merged_model
from pf_jax.models.peft_io import save_peft_adapter
from pf_jax.training.async_rollouts import AsyncRollouts, importance_corrected
from pf_jax.training.checkpoint import (
    Checkpointer,
    StopSignal,
    base_record,
    check_base,
    restore_data_position,
)
from pf_jax.training.evaluators import distribution_probe_for, evaluator_for
from pf_jax.training.export_files import export_modules, finish_export
from pf_jax.training.guards import SkipGuard, check_prompts_fit, check_slots_fit
from pf_jax.training.metrics import MetricsLogger
from pf_jax.training.model_source import base_model_name, load_policy
from pf_jax.training.placement import MeshPlacement
from pf_jax.training.step import TrainState
from pf_jax.training.update import build_update

_PHASE = logging.getLogger("pf_jax.phase")  # what a CLI shows while it starts (pf_jax.phases)


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    completed: bool
    summary: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, MethodResult] = field(default_factory=dict)
    export_dir: Path | None = None


class Trainer:
    """Builds every piece of a recipe once; `run()` trains, checkpoints, evaluates and exports."""

    def __init__(self, cfg: TrainConfig, *, process_index: int = 0, process_count: int = 1) -> None:
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        self.composition = composition = compose(cfg)
        self.objective = composition.objective
        self.run_dir = Path(cfg.logging.runs_dir) / cfg.logging.run_name
        policy, self.codec = load_policy(cfg.model, runs_dir=cfg.logging.runs_dir)
        self.rows = training_rows(cfg, composition.kind, self.codec)
        check_prompts_fit(self.rows, lambda text: len(self.codec.encode_prompt(text)), policy.cfg, cfg,
                          sampling=composition.samples)
        check_slots_fit(policy, cfg, sampling=composition.samples)
        self.prompts = prompt_source(cfg, composition.kind, self.rows, process_index=process_index,
                                     process_count=process_count)
        update = build_update(cfg, composition, policy)
        self.graphdefs, self.tx, self.updates_per_step = update.graphdefs, update.tx, update.updates_per_step
        params, self.frozen, self.base_graphdef = update.params, update.frozen, update.base_graphdef
        self.reference = None
        if composition.reference:  # LoRA: the frozen base itself; else a copy of the initial policy
            self.reference = self.frozen["policy"] if self.lora else jax.tree_util.tree_map(jnp.copy, params["policy"])
        self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                                rng=jax.random.key(cfg.seed))
        self.train_step = jax.jit(update.step_fn, donate_argnums=0)
        self._place(update)
        self.base_record = base_record(cfg.model.name, self.frozen["policy"]) if self.lora else None
        self.reward = recipe_reward(cfg)
        self.scorer = Scorer(self.graphdefs["policy"], cfg.model.logprob_chunk)
        self.responses = response_source(cfg, composition, self.codec, self.scorer, self.reward)
        self.evaluator = evaluator_for(cfg, composition, self.codec, self.reward, self.run_dir)
        self.distribution = distribution_probe_for(cfg, composition, self.codec)
        self.distribution_history: list[dict[str, Any]] = []
        self.pipeline = self._async_rollouts()

    def _async_rollouts(self) -> AsyncRollouts | None:
        """rollout.mode=async: the in-flight rollouts (training/async_rollouts.py); None when synchronous."""
        if self.cfg.rollout.mode != "async":
            return None
        if self.process_count > 1:
            raise ConfigError("rollout.mode=async runs in one process for now (each process would sample on its "
                              "own thread between collective updates); set rollout.mode=sync for several processes")
        sample = lambda rows, params, step: self.responses(rows, self.models(params), self.step_key(step))
        return AsyncRollouts(sample, self.prompts.next_batch, lambda: self.prompts.state.to_json(),
                             self.cfg.rollout.max_staleness, self.cfg.steps)

    def _place(self, update: Any) -> None:
        """More than one device: state on the mesh, step jitted with explicit shardings (placement.py)."""
        self.placement = MeshPlacement.from_config(self.cfg.mesh, sampler_dtype=update.compute_dtype,
                                                   rollout_devices=self.cfg.rollout.devices)
        if self.placement is None:
            return
        if self.cfg.model.lora is not None and self.cfg.model.lora.quantize is not None:
            raise qlora_on_a_mesh(self.cfg.model.lora.quantize)
        self.state = self.placement.place_state(self.state)
        self.frozen = {k: self.placement.place_params(v) for k, v in self.frozen.items()}
        if self.reference is not None:
            self.reference = self.frozen["policy"] if self.lora else self.placement.place_params(self.reference)
            if self.placement.rollout_mesh is not None and not self.lora:  # only sampling and scoring read it
                self.reference = self.placement.sampler_params(self.reference, cast=True)
        self.train_step = self.placement.shard_step(update.step_fn)

    # -- one step --------------------------------------------------------------------------------------
    def step_key(self, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.cfg.seed), step)

    def sampler_view(self, params: Any, *, cast: bool = False) -> Any:
        """Parameters as the sampler / scorer / evaluator / exporter uses them (the explicit transfer to the
        sampler layout on a mesh, decoder matrices in the compute dtype when `cast`; the training arrays
        themselves on one device)."""
        return params if self.placement is None else self.placement.sampler_params(params, cast=cast)

    @property
    def lora(self) -> bool:
        """The policy trains LoRA adapters over a frozen base (model.lora)."""
        return "policy" in self.frozen

    def policy_params(self, params: Any = None) -> nnx.State:
        """The policy's whole state (of the trained `params`, default the current ones): with LoRA its
        adapters and its frozen base together."""
        adapters = (self.state.params if params is None else params)["policy"]
        return nnx.merge_state(adapters, self.frozen["policy"]) if self.lora else adapters

    def models(self, trained: Any = None) -> Models:
        """The modules of the trained parameters `trained` (default the current ones) as the sampler and the
        scorers use them (see methods.protocols.Models); with LoRA and model.lora.sampler=merge, rollouts
        decode the adapters folded into the weights."""
        trained = self.state.params if trained is None else trained
        params = {k: self.sampler_view(p) for k, p in trained.items() if k != "policy"}
        params["policy"] = self.sampler_view(self.policy_params(trained), cast=True)
        sampler = None
        if self.lora and self.cfg.model.lora.sampler == "merge":
            sampler = nnx.split(merged_model(nnx.merge(self.graphdefs["policy"], params["policy"])))
        return Models(self.graphdefs, params, self.sampler_view(self.reference, cast=True), self.base_graphdef,
                      sampler)

    def make_batch(self, rows: list[Any], step: int) -> tuple[Any, dict[str, float]]:
        """The objective's batch from this step's prompt rows, and the host metrics of making it."""
        models = self.models()
        key = self.step_key(step)
        if self.composition.samples and self.composition.kind != "env" and self.process_count > 1:
            key = jax.random.fold_in(key, self.process_index)  # each process samples its own prompts
        return self._batch_of(self.responses(rows, models, key))

    def _batch_of(self, responses: Any, **info: float) -> tuple[Any, dict[str, float]]:
        """The objective's batch from the step's responses, and the host metrics of making it (`info` too)."""
        batch, metrics = self.objective.batch(responses)
        self.last_rollout = (responses, batch)  # for the completions log (logging.completions_every)
        return batch, {**responses.metrics, **info, **metrics}

    @property
    def async_versions(self) -> int:
        """Parameter versions kept for the rollouts in flight (rollout.max_staleness in async mode, else 0)."""
        return 0 if self.pipeline is None else self.pipeline.k

    def async_batch(self, step: int) -> tuple[list[Any], Any, dict[str, float]]:
        """rollout.mode=async: the step's rollout, sampled by the policy of step max(0, step - k) while the
        previous steps updated, corrected toward the current policy (the log-probs before the update and
        TIS weights to the sampler's, pf_jax.losses.importance), and the objective's batch from it."""
        responses, info = self.pipeline.take(step, self.state.params)
        level = self.composition.method.importance
        if self.async_versions and level != "off_policy" and self.cfg.rollout.tis_cap is not None:
            # scored in the training layout, as the update's first forward pass sees the policy (no sampler
            # copy of the weights beside the one the in-flight rollout holds); on the host, since the
            # rollout's arrays may sit on the rollout group's devices
            seq = jax.tree_util.tree_map(np.asarray, responses.seq)
            proximal = np.asarray(self.scorer.logprobs(self.policy_params(), seq))
            info.update(importance_corrected(responses, proximal, self.cfg.rollout.tis_cap, level))
        return list(responses.rows), *self._batch_of(responses, **info)

    def update(self, batch: Any, step: int) -> dict[str, float]:
        """Every optimizer update of the step: rollout.updates_per_batch passes over rollout.minibatches."""
        r = self.cfg.rollout
        n = jax.tree_util.tree_leaves(batch)[0].shape[0]
        minibatches = r.minibatches if self.composition.samples else 1
        if n % minibatches:
            raise ConfigError(f"rollout.minibatches={minibatches} does not divide the {n} sequences of a step")
        rng = np.random.default_rng([self.cfg.seed, step])
        collected: dict[str, list[float]] = {}
        for _ in range(r.updates_per_batch if self.composition.samples else 1):
            order = rng.permutation(n) if minibatches > 1 else np.arange(n)
            for part in np.split(order, minibatches):
                mb = jax.tree_util.tree_map(lambda x, idx=part: x[idx], batch) if minibatches > 1 else batch
                self.state, metrics = self.train_step(self.state, mb, self.frozen)
                for k, v in metrics.items():
                    collected.setdefault(k, []).append(float(v))
        out = {k: float(np.mean(v)) for k, v in collected.items()}
        out["skipped"] = float(np.sum(collected.get("skipped", [0.0])))
        return out

    def initialize_heads(self, batch: Any, num_prompts: int) -> dict[str, float]:
        """The objective's heads adjusted from the first batch (e.g. PowerFlow's log Z' head started at the
        batch's least-squares value), averaged over processes."""
        params, info = self.objective.initialize(self.state.params, self.graphdefs, batch, num_prompts,
                                                 self._process_mean)
        if not info:  # nothing adjusted
            return {}
        self.state = self.state.replace(params=params)
        if self.placement is not None:
            self.state = self.placement.keep_layout(self.state)
        return info

    def _process_mean(self, value: float) -> float:
        if self.process_count == 1:
            return value
        from jax.experimental import multihost_utils

        return float(np.mean(multihost_utils.process_allgather(np.float32(value))))

    def train_one_step(self, step: int) -> dict[str, float]:
        """Make the step's batch, update on it; the step's metrics (timings and tokens/s included)."""
        t0 = time.perf_counter()
        announce, self._stepped = not getattr(self, "_stepped", False), True  # the first step this process runs
        if announce:
            _PHASE.info("step %d: first batch%s", step + 1,
                        " (the first rollout compiles the sampler)" if self.composition.samples else "")
        if self.pipeline is None:
            rows = self.prompts.next_batch()
            batch, info = self.make_batch(rows, step)
        else:
            rows, batch, info = self.async_batch(step)
        if step == 0:
            info.update(self.initialize_heads(batch, len(rows)))
        t1 = time.perf_counter()
        if announce:
            _PHASE.info("step %d: compiling and running the train step", step + 1)
        metrics = self.update(batch, step)
        t2 = time.perf_counter()
        if self.placement is not None and self.placement.rollout_mesh is not None:
            info["rollout/reshard_s"], self.placement.transfer_s = self.placement.transfer_s, 0.0
        metrics.update(info, rollout_s=t1 - t0, update_s=t2 - t1,
                       tokens_per_s=response_token_count(batch) / max(t2 - t0, 1e-9))
        return metrics

    # -- evaluation and export -------------------------------------------------------------------------
    def modules(self) -> dict[str, nnx.Module]:
        """The trained modules: the policy in the sampler layout (its matrices not cast; with LoRA, its
        adapters over the base), the heads as they train."""
        modules = {k: nnx.merge(self.graphdefs[k], p) for k, p in self.state.params.items() if k != "policy"}
        return {"policy": nnx.merge(self.graphdefs["policy"], self.sampler_view(self.policy_params())), **modules}

    def evaluate(self, name: str, *, key: jax.Array) -> MethodResult | None:
        if self.evaluator is None:
            return None
        return self.evaluator(name, self.models().sampler_model(), key=key)

    def probe_distribution(self, step: int, logger: MetricsLogger) -> None:
        """eval.distribution: the policy's distance to its target on the candidate sets, logged as dist/*
        at `step` (0: the base model) and kept in distribution_history."""
        models = self.models()
        metrics, intervals = self.distribution(models.policy(), models.reference_model())
        logger.log(step, {f"dist/{k}": v for k, v in metrics.items()}, force=True)
        self.distribution_history.append({"step": step, "metrics": metrics,
                                          "intervals": {k: list(v) for k, v in intervals.items()}})

    def export(self, modules: dict[str, nnx.Module] | None = None) -> Path:
        """What the run delivers, written by process 0 into run_dir/export: the objective's deliverable (the
        policy as HF safetensors + tokenizer, or the classifier); with LoRA the PEFT adapter in
        export/adapter and, with export.merge, the deliverable with the adapters merged."""
        directory = self.run_dir / "export"
        modules = self.modules() if modules is None else modules  # every process: the transfer is collective
        if self.process_index != 0:
            return directory
        policy = modules["policy"]
        if policy.lora is not None:
            save_peft_adapter(policy, directory / "adapter", base_model_name_or_path=base_model_name(self.cfg.model, self.cfg.logging.runs_dir))
            if not self.cfg.export.merge:
                return directory
            modules = {**modules, "policy": merged_model(policy)}
        modules = export_modules(modules, self.cfg.export)  # export.dtype (training/export_files.py)
        self.objective.deliver(modules, self.codec, directory)
        finish_export(directory, self.cfg, self.codec)  # generation_config.json, export.push_to_hub
        return directory

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.process_index == 0:
            (self.run_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        # closed on any exit: a save in flight finishes even when the run raises
        with Checkpointer.from_config(self.cfg.checkpoint, self.run_dir) as checkpointer:
            start = self._resume(checkpointer)
            evaluation = self._evaluate_base(start)
            logger = MetricsLogger.from_config(self.cfg.logging, self.cfg.steps, process_index=self.process_index,
                                               resume_step=start, config=self.cfg.model_dump())
            if self.distribution is not None and start == 0:
                self.probe_distribution(0, logger)
            try:
                done, completed = self._train(checkpointer, logger, start)
            finally:
                if self.pipeline is not None:
                    self.pipeline.close()
        result = RunResult(self.run_dir, done, completed, logger.close())
        if completed:
            self._finish(result, evaluation)
        result.evaluation = evaluation
        return result

    def _resume(self, checkpointer: Checkpointer) -> int:
        """The step to start from: the latest checkpoint's (restored into the state and prompt source), or 0.
        The target carries the current shardings: a checkpoint from another mesh / process count is
        resharded onto this run's devices."""
        if not self.cfg.checkpoint.resume:
            return 0
        abstract = lambda tree: jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        target = abstract(self.state)
        k = self.async_versions
        if k:  # the parameter versions of the in-flight rollouts (checkpoint_contents)
            target = {"train": target, "behaviour": [abstract(self.state.params)] * k}

        def accept(meta: dict[str, Any]) -> None:
            check_base(meta, self.base_record)
            restore_data_position(self.prompts, meta)
            self.distribution_history = list(meta.get("distribution", []))  # the probes up to that step

        restored = checkpointer.restore_latest(target, accept=accept)
        if restored is None:
            return 0
        self.state = restored.state["train"] if k else restored.state
        if k:
            self.pipeline.restore(restored.step, restored.state["behaviour"])
        print(f"[pf_jax] resumed {self.run_dir} at step {restored.step}")
        return restored.step

    def eval_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.cfg.seed), 10**9)

    def _evaluate_base(self, start: int) -> dict[str, MethodResult]:
        """The base model's evaluation, before the first step (kept in eval_base.json for a resumed run)."""
        if start != 0:
            return {}
        base = self.evaluate("base", key=self.eval_key())
        if base is None or self.process_index != 0:
            return {}
        (self.run_dir / "eval_base.json").write_text(json.dumps(base.to_json(include_responses=False)))
        return {"base": base}

    def _train(self, checkpointer: Checkpointer, logger: MetricsLogger, start: int) -> tuple[int, bool]:
        """Steps start..cfg.steps with a checkpoint policy, a stop signal and a save of the last finished
        step on error; (steps done, whether the run completed)."""
        steps, done, completed = self.cfg.steps, start, start >= self.cfg.steps
        finished: tuple[int, Any, dict] | None = None  # the last step finished here: (step, state, meta)
        guard = SkipGuard.from_config(self.cfg, self.updates_per_step)
        with StopSignal() as stop, _saved_on_error(lambda: self._save_finished(checkpointer, finished)):
            for step in range(start, steps):
                metrics = self.train_one_step(step)
                logger.log(step + 1, metrics)
                logger.log_completions(step + 1, *self.last_rollout)
                done, last = step + 1, step + 1 == steps
                if self.distribution is not None and self.distribution.due(done, last):
                    self.probe_distribution(done, logger)  # before the save: its checkpoint keeps the probe
                tree, meta = self.checkpoint_contents(done)
                finished = (done, tree, meta)
                checkpointer.save(done, tree, meta, force=last or stop.requested)
                guard.observe(done, metrics)
                completed = completed or last
                if stop.requested and not last:
                    print(f"[pf_jax] {stop.received.name if stop.received else 'stop'} received: saved step {done}, exiting")
                    break
                every = self.cfg.eval.every_steps
                if every and done % every == 0 and not last:
                    mid = self.evaluate(f"step{done}", key=self.eval_key())
                    if mid is not None:
                        logger.log(done, {f"eval/{k}": v for k, v in mid.metrics.items()}, force=True)
        return done, completed

    def checkpoint_contents(self, done: int) -> tuple[Any, dict[str, Any]]:
        """What a checkpoint after `done` steps holds: the train state and, in the sidecar, the data position
        (and the LoRA base's record, and the distribution probes so far). Asynchronous rollouts add the parameter versions that sample the
        in-flight rollouts, and the position is the one before their rows: a resumed run samples them again."""
        meta = {"data": self.prompts.state.to_json(), **({"base": self.base_record} if self.lora else {}),
                **({"distribution": self.distribution_history} if self.distribution_history else {})}
        if not self.async_versions:
            return self.state, meta
        meta["data"] = self.pipeline.data_position(done)
        return {"train": self.state, "behaviour": self.pipeline.behaviour_params(done)}, meta

    def _finish(self, result: RunResult, evaluation: dict[str, MethodResult]) -> None:
        """After the last step: export, the objective's own final metrics, the trained policy's evaluation
        beside the base model's, and the report."""
        modules = self.modules()
        if self.cfg.export.enabled:
            result.export_dir = self.export(modules)
        result.summary.update(self.objective.final_metrics(modules, self.codec, self.cfg, self.run_dir))
        if self.distribution_history and self.process_index == 0:
            from pf_jax.evaluation.report import write_distribution_report

            write_distribution_report(self.run_dir / "eval", self.distribution_history, self.distribution.alpha)
        name = self.cfg.method.name
        final = self.evaluate(name, key=self.eval_key())
        if final is None:
            return
        base_file = self.run_dir / "eval_base.json"
        if "base" not in evaluation and base_file.exists():
            evaluation["base"] = MethodResult.from_json(json.loads(base_file.read_text()))
        evaluation[name] = final
        if self.process_index == 0:
            from pf_jax.evaluation.report import write_report

            write_report(self.run_dir / "eval", list(evaluation.values()),
                         title=f"{self.cfg.logging.run_name}: held-out accuracy", include_responses=False)

    def _save_finished(self, checkpointer: Checkpointer, finished: tuple[int, Any, dict] | None) -> None:
        """After an exception: save the last step this process finished, unless it is already saved or the
        state has moved on since (an update part-way through minibatches, or buffers donated to a failed
        update). Only with one process: a save is collective, and the other processes may not have failed."""
        if finished is None or self.process_count > 1:
            return
        step, tree, meta = finished
        state = tree["train"] if isinstance(tree, dict) else tree
        if state is not self.state or any(getattr(x, "is_deleted", lambda: False)()
                                         for x in jax.tree_util.tree_leaves(state)):
            print(f"[pf_jax] the run failed during step {step + 1}; step {step} cannot be saved (its state was "
                  f"already being updated)", file=sys.stderr)
            return
        if checkpointer.save(step, tree, meta, force=True):
            checkpointer.wait()
            print(f"[pf_jax] the run failed during step {step + 1}; saved step {step} first: rerun the same command "
                  f"to resume from it", file=sys.stderr)


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
