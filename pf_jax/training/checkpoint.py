"""Orbax checkpoints of the whole train state, with a JSON sidecar, corruption fallback and SIGTERM stop.

A checkpoint of step s is the directory `<dir>/<s>/` holding two orbax items:
  state  the train state pytree (params as nnx.State, optimizer state, log Z / value heads, step, RNG:
         typed key arrays `jax.random.key(...)` and raw uint32 key data both round-trip);
  meta   JSON: {"step": s, "data_state": iterator state, "config": recipe dump, ...anything JSON}.
Saves are asynchronous (the step loop continues while files are written) every `every_steps` steps and
whenever forced (end of run, SIGTERM); the last `keep` are kept. A step directory is trusted only if it
has orbax's commit marker, a readable sidecar naming the same step, and restores without error;
otherwise it is moved to `<dir>/corrupt/` with a warning and the previous checkpoint is used. An intact
checkpoint of a different state (another model, optimizer or recipe: its stored tree names other arrays
or other shapes) is not corrupt: restoring it raises CheckpointMismatchError and moves nothing.
"""

import dataclasses
import logging
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from pf_jax.config import CheckpointConfig

logger = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"
CORRUPT_DIR = "corrupt"


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint step was unreadable and skipped."""


class CheckpointMismatchError(ValueError):
    """An intact checkpoint holds a different state than the one asked for (other arrays or shapes)."""


def _state_mismatch(stored: Any, target: Any, limit: int = 3) -> str | None:
    """What differs between the stored state's tree metadata and the target (array names and shapes;
    dtypes are cast on restore, typed PRNG keys are stored as their key data), or None."""
    stored_flat = ocp.tree.to_flat_dict(stored.tree if hasattr(stored, "tree") else stored)
    target_flat = ocp.tree.to_flat_dict(target)
    name = lambda path: "/".join(map(str, path))
    order = lambda keys: sorted(keys, key=lambda k: (str(k[0]) != "params", k))  # parameters named first
    problems = [f"missing from the checkpoint: {name(k)}" for k in order(set(target_flat) - set(stored_flat))]
    problems += [f"not in this run's state: {name(k)}" for k in order(set(stored_flat) - set(target_flat))]
    for k in order(set(target_flat) & set(stored_flat)):
        want, got = target_flat[k], stored_flat[k]
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key) or not hasattr(got, "shape"):
            continue
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{name(k)} has shape {tuple(got.shape)} in the checkpoint, {tuple(want.shape)} here")
    if not problems:
        return None
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    meta: dict[str, Any]


class Checkpointer:
    """Save / restore the train state pytree plus a JSON sidecar with orbax's CheckpointManager.

    Usage in a step loop:
        ckpt = Checkpointer(run_dir / "checkpoints", every_steps=100, keep=3)
        restored = ckpt.restore_latest(jax.eval_shape(lambda: state))   # None on a fresh run
        ...
        ckpt.save(step, state, {"data_state": it.state.to_json(), "config": cfg.model_dump()})
        ...
        ckpt.save(last_step, state, meta, force=True); ckpt.close()   # close waits for async writes
    """

    def __init__(self, directory: str | Path, every_steps: int = 100, keep: int = 3, async_save: bool = True) -> None:
        if every_steps < 1 or keep < 1:
            raise ValueError(f"every_steps and keep must be >= 1, got {every_steps} and {keep}")
        self.directory = Path(directory).absolute()
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, run_dir: str | Path) -> "Checkpointer":
        """`cfg.dir`, or `<run_dir>/checkpoints` when it is None."""
        directory = Path(cfg.dir) if cfg.dir is not None else Path(run_dir) / "checkpoints"
        return cls(directory, every_steps=cfg.every_steps, keep=cfg.keep, async_save=cfg.async_save)

    def steps(self) -> list[int]:
        """Steps with a checkpoint directory on disk, oldest first (not yet checked for integrity)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Start an async save of `state` and the JSON `meta` if `step` is a multiple of `every_steps`
        (or `force`), and no checkpoint of `step` exists yet. Returns whether a save started."""
        if step in self._manager.all_steps():
            return False
        if not force and step % self.every_steps:
            return False
        sidecar = {**(meta or {}), "step": int(step)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(sidecar))
        return bool(self._manager.save(step, args=args, force=True))

    def reached_preemption(self, step: int) -> bool:
        """True when a multi-host preemption notice (JAX's sync manager) says every host stops at `step`."""
        return bool(self._manager.reached_preemption(step))

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restore checkpoint `step` onto the structure, shapes, dtypes (and shardings) of `abstract_state`
        (concrete arrays or jax.ShapeDtypeStruct leaves). Raises ValueError naming the step and the
        problem when the checkpoint is incomplete or unreadable, and CheckpointMismatchError (a ValueError)
        when it is intact but holds other arrays or shapes than abstract_state."""
        step_dir = self.directory / str(step)
        if not (step_dir / COMMIT_MARKER).is_file():
            raise ValueError(f"checkpoint {step_dir} has no commit marker {COMMIT_MARKER} (half-written)")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as error:  # a damaged or missing tree metadata file
            raise ValueError(f"checkpoint {step_dir} is unreadable: {type(error).__name__}: {error}"[:600]) from error
        mismatch = None if stored is None else _state_mismatch(stored, target)
        if mismatch:
            raise CheckpointMismatchError(
                f"checkpoint {step_dir} holds a different state than this run's: {mismatch}. It was written by "
                "another model, optimizer or recipe: resume it with that recipe, or run this one in another "
                "directory (logging.run_name or checkpoint.dir)")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as error:  # orbax / tensorstore raise many types for damaged files
            detail = str(error).split(" [tensorstore_spec")[0][:500]  # tensorstore appends kilobytes of spec
            raise ValueError(f"checkpoint {step_dir} is unreadable: {type(error).__name__}: {detail}") from error
        meta = restored.meta
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise ValueError(f"checkpoint {step_dir} has a sidecar for step {meta and meta.get('step')!r}, not {step}")
        return Restored(step, restored.state, meta)

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """The newest checkpoint that restores cleanly, or None if there is none.

        Each newer step that fails (no commit marker, missing or truncated file, bad sidecar) is reported
        with a CorruptCheckpointWarning and moved to `<dir>/corrupt/<step>-<unix time>` so later saves of
        that step can proceed; the previous checkpoint is tried next. CheckpointMismatchError (an intact
        checkpoint of another state) is raised as is: nothing is moved.
        """
        for step in reversed(self.steps()):
            try:
                return self.restore(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except ValueError as error:
                message = f"skipping corrupt checkpoint of step {step}: {error}"
                warnings.warn(message, CorruptCheckpointWarning, stacklevel=2)
                logger.warning(message)
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        target = self.directory / CORRUPT_DIR / f"{step}-{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
        self._manager.reload()


class StopSignal:
    """Turns SIGTERM (preemption) into a request to save and exit at the next step boundary.

    Install once in the main thread (`with StopSignal() as stop:`); the loop checks `stop.requested`
    after each step. The previous handlers come back on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.requested = False
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        self.received = signal.Signals(signum)
        logger.warning("received %s: saving a checkpoint and stopping at the next step boundary", self.received.name)

    def __enter__(self) -> "StopSignal":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
