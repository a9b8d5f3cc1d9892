"""rollout.mode=async: the rollout of step s + k is sampled on a background thread, with the policy of step
s, while step s updates (k = rollout.max_staleness; verl's one-step-off / AReaL's bounded staleness).

    step s:   take rollout s (sampled by the policy of step max(0, s - k))
              launch rollout s + k with a copy of the current parameters   ─┐ runs on the rollout thread
              log-probs of the current policy on rollout s (pi_before)      │
              TIS weights min(pi_before / pi_sampler, C), the update        ◄┘ overlaps with both

The schedule is fixed by the step number, never by timing: rollout p is always sampled by the parameters
of step max(0, p - k), with the key of step p, from the rows drawn for step p in order. Resumption is exact
by deterministic regeneration: a checkpoint after step d holds the train state, the parameter versions
that sample the in-flight rollouts d .. d + k - 1 (k copies of the trained parameters: with LoRA only the
adapters) and the data position before their rows; a resumed run draws the same rows and samples them
again with the same parameters and keys. A JAX computation releases the GIL, so the thread's decode
and the main thread's update run at the same time on the devices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pf_jax.losses.importance import truncated_importance_weights
from pf_jax.methods.protocols import Completions, Metrics


def parameter_versions(rollout: Any, sampling: bool) -> int:
    """How many copies of the trained parameters a run keeps for its rollouts in flight: rollout.max_staleness
    with rollout.mode=async on a sampling method (the planners count them), else 0."""
    return rollout.max_staleness if sampling and rollout.mode == "async" else 0


Sample = Callable[[list[Any], Any, int], Any]
"""(rows, trained parameters, step) -> the step's responses, sampled by those parameters with its key."""


@dataclass
class _Pending:
    rows: list[Any]
    version: int  # the step whose parameters sample it
    future: Future


class AsyncRollouts:
    """The in-flight rollouts of an asynchronous run. sample: the response source over a parameter version;
    draw / position: the prompt source's next rows and its position (JSON); staleness: k; steps: the run's
    last step (nothing is launched past it)."""

    def __init__(self, sample: Sample, draw: Callable[[], list[Any]], position: Callable[[], dict],
                 staleness: int, steps: int) -> None:
        self.sample, self.draw, self.position = sample, draw, position
        self.k, self.steps = staleness, steps
        self.pending: dict[int, _Pending] = {}
        self.versions: dict[int, Any] = {}  # step -> a copy of its trained parameters, while a rollout needs it
        self.positions: dict[int, dict] = {-1: position()}  # step -> the data position after its rows were drawn
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pf_jax-rollout")

    def version_of(self, step: int) -> int:
        """The step whose parameters sample rollout `step`."""
        return max(0, step - self.k)

    # -- the step ------------------------------------------------------------------------------------
    def take(self, step: int, params: Any) -> tuple[Any, Metrics]:
        """Rollout `step` (waiting for it if it is still being sampled), after launching rollout step + k
        with `params` (the parameters of `step`). Metrics: its staleness and the time waited for it."""
        self._keep(step, params)
        for p in range(step, min(step + self.k + 1, self.steps)):
            if p not in self.pending:
                self._launch(p)
        pending = self.pending.pop(step)
        t0 = time.perf_counter()
        responses = pending.future.result()
        for v in [v for v in self.versions if v < self.version_of(step + 1)]:
            del self.versions[v]  # no rollout in flight needs it any more
        for p in [p for p in self.positions if p < step]:
            del self.positions[p]  # a checkpoint after this step reads positions[step] on
        return responses, {"rollout/staleness": float(step - pending.version),
                           "rollout/wait_s": time.perf_counter() - t0}

    def _keep(self, step: int, params: Any) -> None:
        """The parameters of `step`, which sample rollout step + k, copied (the update donates the originals);
        with k = 0 the rollout ends before the update starts, so no copy is needed."""
        if step not in self.versions:
            self.versions[step] = params if self.k == 0 else jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, params))

    def _launch(self, step: int) -> None:
        rows = self.draw()
        self.positions[step] = self.position()
        params = self.versions[self.version_of(step)]
        self.pending[step] = _Pending(rows, self.version_of(step), self.pool.submit(self.sample, rows, params, step))

    # -- checkpoints ---------------------------------------------------------------------------------
    def behaviour_params(self, done: int) -> list[Any]:
        """The parameter versions that sample the in-flight rollouts done .. done + k - 1 (k entries)."""
        return [self.versions[self.version_of(p)] for p in range(done, done + self.k)]

    def data_position(self, done: int) -> dict:
        """The data position before the rows of rollout `done` were drawn (after those of done - 1)."""
        return self.positions[done - 1]

    def restore(self, done: int, behaviour: list[Any]) -> None:
        """A resumed run: the parameter versions of a checkpoint after step `done` (behaviour_params); the
        prompt source is already at that checkpoint's data position."""
        self.pending.clear()
        self.versions = {self.version_of(p): v for p, v in zip(range(done, done + self.k), behaviour)}
        self.positions = {done - 1: self.position()}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def importance_corrected(responses: Completions, proximal_logp: np.ndarray, cap: float, level: str) -> Metrics:
    """Give `responses` the log-probs of the policy before the update (the loss's ratio is taken against
    them) and the TIS weights to the sampler's log-probs; returns the weights' metrics (tis/*)."""
    host = lambda x: jnp.asarray(np.asarray(x))  # off whichever devices the rollout used
    weights, metrics = truncated_importance_weights(host(proximal_logp), host(responses.behaviour_logp),
                                                    host(responses.seq.response_mask), cap, level)  # type: ignore[arg-type]
    responses.proximal_logp, responses.importance_weight = proximal_logp, weights
    return {f"tis/{k.removeprefix('tis_')}": float(v) for k, v in metrics.items()}
