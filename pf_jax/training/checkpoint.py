"""Orbax checkpoints of the whole train state, with a JSON sidecar, content digests, corruption fallback,
a prompt stop when a save fails, and SIGTERM stop.

A checkpoint of step s is the directory `<dir>/<s>/` holding two orbax items:
  state  the train state pytree (params as nnx.State, optimizer state, log Z / value heads, step, RNG:
         typed key arrays `jax.random.key(...)` and raw uint32 key data both round-trip);
  meta   JSON: {"step": s, "digests": {array: sha256, dtype, shape}, "data": iterator state, ...}.
Saves are asynchronous (the step loop continues while files are written) every `every_steps` steps and
whenever forced (end of run, SIGTERM); the last `keep` are kept. The digests are computed from the arrays
when the save starts and committed with them (training/state_digests.py). A step directory is trusted
only if it has orbax's commit marker, a readable sidecar naming the same step, restores without error,
its arrays match their digests, and the caller accepts its sidecar (`restore_latest(accept=...)`, e.g. a
valid data position); otherwise it is moved to `<dir>/corrupt/` (or, when it cannot be moved, skipped in
place) with a warning naming the step and the problem, and the previous checkpoint is used. An intact
checkpoint of a different state (another model, optimizer or recipe: its stored tree names other arrays
or other shapes) is not corrupt: restoring it raises CheckpointMismatchError and moves nothing.

A save that cannot be written (read-only directory, full disk) raises CheckpointSaveError naming the
directory and the OS error, at the save itself or at the next step's `save` call when the asynchronous
write fails later; the checkpoints already on disk are kept.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from pf_jax.config import CheckpointConfig
from pf_jax.config.errors import RunStorageError, UserError
from pf_jax.data.iterator import IteratorState
from pf_jax.training.run_storage import STORAGE_HINT, probe_writable
from pf_jax.training.state_digests import as_saved, cast_to, first_difference, state_digests

logger = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"
CORRUPT_DIR = "corrupt"
DIGESTS_KEY = "digests"


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint step was unreadable and skipped."""


class CorruptCheckpointError(ValueError):
    """A checkpoint step cannot be trusted: unreadable, incomplete, or its bytes differ from what was saved."""


class CheckpointMismatchError(UserError):
    """An intact checkpoint holds a different state than the one asked for (other arrays or shapes)."""


class CheckpointSaveError(RunStorageError):
    """A checkpoint could not be written: names the directory, the step and the OS error."""


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


class _StorageTracebacksOff(logging.Filter):
    """Orbax (through absl) and asyncio log the OS error of a failed background write with its traceback,
    on top of the CheckpointSaveError that reports it to the user: keep their line, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and _os_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


_STORAGE_TRACEBACKS_OFF = _StorageTracebacksOff()


def _drop_closed_loop_reports() -> None:
    """When one write of a save fails (or a damaged checkpoint's read), tensorstore completes the others on
    the event loop orbax has already closed, and Python prints each 'Event loop is closed' with a
    traceback, at once, from a background thread: orbax's, and reported as the CheckpointSaveError (or the
    corrupt-checkpoint warning). Only those are dropped; every other unraisable report is kept."""
    previous = sys.unraisablehook
    if getattr(previous, "pf_jax_closed_loop_filter", False):
        return

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.pf_jax_closed_loop_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _os_error(error: BaseException) -> str | None:
    """The OS error behind a failed write: an OSError, or tensorstore's ValueError carrying an errno
    (`... No space left on device [os_error_code='28']`); None for anything else."""
    if isinstance(error, OSError):
        return f"{error.strerror or error}{f' ({error.filename})' if error.filename else ''}"
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code is None:
        return None
    return f"{os.strerror(int(code.group(1)))} ({str(error).split(' [tensorstore_spec')[0][:300]})"


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
        self._failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            # a step directory that cannot be created fails the save call itself; created in the background,
            # orbax's writer threads would wait 300 s for it and hold the process open at exit
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        for name in ("absl", "asyncio"):  # orbax logs through absl; a filter is added once
            logging.getLogger(name).addFilter(_STORAGE_TRACEBACKS_OFF)
        _drop_closed_loop_reports()
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
        """Start an async save of `state` and the JSON `meta` (plus the arrays' digests) if `step` is a
        multiple of `every_steps` (or `force`), and no checkpoint of `step` exists yet. Returns whether a
        save started. Call it every step: it raises CheckpointSaveError as soon as an earlier
        asynchronous save is found to have failed, and when this one cannot start."""
        self._raise_if_failed()
        if self._failed:  # writing on would only fail again, and leave more half-written steps
            raise CheckpointSaveError(f"not saving step {step}: an earlier save to {self.directory} failed{self._kept()}",
                                      hint=STORAGE_HINT)
        if step in self._manager.all_steps():
            return False
        if not force and step % self.every_steps:
            return False
        try:
            probe_writable(self.directory)
        except RunStorageError as error:
            self._failed = True
            raise CheckpointSaveError(f"cannot save the checkpoint of step {step}: {error}{self._kept()}",
                                      hint=error.hint) from None
        sidecar = {**(meta or {}), "step": int(step), DIGESTS_KEY: state_digests(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(sidecar))
        with self._save_errors():
            return bool(self._manager.save(step, args=args, force=True))

    def reached_preemption(self, step: int) -> bool:
        """True when a multi-host preemption notice (JAX's sync manager) says every host stops at `step`."""
        return bool(self._manager.reached_preemption(step))

    def wait(self) -> None:
        """Block until every started save is on disk (CheckpointSaveError if one failed)."""
        with self._save_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves in flight and release orbax; a failure already raised is not raised again."""
        reported = self._failed
        try:
            self.wait()
        except CheckpointSaveError:
            if not reported:
                raise
        finally:
            self._manager.close()

    def _raise_if_failed(self) -> None:
        with self._save_errors():
            self._manager.check_for_errors()

    @contextlib.contextmanager
    def _save_errors(self) -> Iterator[None]:
        """OS errors of orbax's (background) writes -> CheckpointSaveError naming the directory; other
        errors are not the storage's and propagate."""
        try:
            yield
        except Exception as error:
            cause = _os_error(error)
            if cause is None:
                raise
            self._failed = True
            raise CheckpointSaveError(f"saving a checkpoint to {self.directory} failed: {cause}{self._kept()}",
                                      hint=STORAGE_HINT) from None

    def _kept(self) -> str:
        try:
            kept = [s for s in self.steps() if (self.directory / str(s) / COMMIT_MARKER).is_file()]
        except Exception:  # the directory itself may be unreadable now
            return ""
        return f"; the last checkpoint on disk is step {kept[-1]}" if kept else "; no checkpoint is on disk yet"

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restore checkpoint `step` onto the structure, shapes, dtypes (and shardings) of `abstract_state`
        (concrete arrays or jax.ShapeDtypeStruct leaves). Raises CorruptCheckpointError (a ValueError)
        naming the step and the problem when the checkpoint is incomplete, unreadable, or its arrays differ
        from their recorded digests, and CheckpointMismatchError when it is intact but holds other arrays
        or shapes than abstract_state."""
        step_dir = self.directory / str(step)
        if not (step_dir / COMMIT_MARKER).is_file():
            raise CorruptCheckpointError(f"checkpoint {step_dir} has no commit marker {COMMIT_MARKER} (half-written)")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as error:  # a damaged or missing tree metadata file
            raise CorruptCheckpointError(f"checkpoint {step_dir} is unreadable: {type(error).__name__}: {error}"[:600]) from error
        mismatch = None if stored is None else _state_mismatch(stored, target)
        if mismatch:
            raise CheckpointMismatchError(
                f"checkpoint {step_dir} holds a different state than this run's: {mismatch}. It was written by "
                "another model, optimizer or recipe (model.scan_layers changes how the layers are stored): resume it "
                "with that recipe, or run this one in another directory (logging.run_name or checkpoint.dir)")
        meta = self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CorruptCheckpointError(f"checkpoint {step_dir} has a sidecar for step "
                                         f"{meta.get('step') if isinstance(meta, dict) else meta!r}, not {step}")
        digests = meta.get(DIGESTS_KEY)
        if digests is not None and not isinstance(digests, dict):
            raise CorruptCheckpointError(f"checkpoint {step_dir} has a malformed '{DIGESTS_KEY}' entry in its sidecar")
        try:
            saved_as = target if digests is None else as_saved(target, digests)
        except TypeError as error:  # a dtype name that is none
            raise CorruptCheckpointError(f"checkpoint {step_dir} records an unknown dtype: {error}") from None
        state = self._read(step, ocp.args.Composite(state=ocp.args.StandardRestore(saved_as))).state
        if digests is None:
            logger.warning("checkpoint %s records no content digests (written by an older pf_jax or on several "
                           "processes): its arrays cannot be verified", step_dir)
        elif problem := first_difference(state, digests):
            raise CorruptCheckpointError(f"checkpoint {step_dir}: {problem}")
        return Restored(step, cast_to(state, target), {k: v for k, v in meta.items() if k != DIGESTS_KEY})

    def _read(self, step: int, args: ocp.args.Composite) -> Any:
        try:
            return self._manager.restore(step, args=args)
        except Exception as error:  # orbax / tensorstore raise many types for damaged files
            detail = str(error).split(" [tensorstore_spec")[0][:500]  # tensorstore appends kilobytes of spec
            raise CorruptCheckpointError(f"checkpoint {self.directory / str(step)} is unreadable: "
                                         f"{type(error).__name__}: {detail}") from error

    def restore_latest(self, abstract_state: Any, accept: Callable[[dict[str, Any]], None] | None = None
                       ) -> Restored | None:
        """The newest checkpoint that restores cleanly and whose sidecar `accept(meta)` takes without
        raising (KeyError, TypeError, ValueError: a damaged sidecar), or None if there is none.

        Each newer step that fails (no commit marker, missing or truncated file, bytes that differ from
        their digests, bad sidecar) is reported with a CorruptCheckpointWarning and moved to
        `<dir>/corrupt/<step>-<unix time>` so later saves of that step can proceed, or skipped in place when
        it cannot be moved; the previous checkpoint is tried next. A UserError (CheckpointMismatchError: an
        intact checkpoint of another state; or one that `accept` raises) is raised as is: nothing is moved.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, abstract_state)
                if accept is not None:
                    accept(restored.meta)
                return restored
            except UserError:
                raise
            except (KeyError, TypeError, ValueError) as error:
                reason = error if isinstance(error, CorruptCheckpointError) else f"{type(error).__name__}: {error}"
                self._set_aside(step, f"skipping corrupt checkpoint of step {step}: {reason}")
        return None

    def _set_aside(self, step: int, message: str) -> None:
        """Warn with `message` and move the step to corrupt/, or leave it in place when it cannot be moved."""
        if jax.process_index() == 0:
            target = self.directory / CORRUPT_DIR / f"{step}-{int(time.time())}"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.directory / str(step)), str(target))
            except OSError as error:
                message += f"; it cannot be moved aside ({error.strerror or error}), so it is skipped in place"
        warnings.warn(message, CorruptCheckpointWarning, stacklevel=3)
        logger.warning(message)
        self._manager.reload()


def restore_data_position(iterator: Any, meta: dict[str, Any]) -> None:
    """Put `iterator` (BatchIterator or the curriculum's) at the data position a checkpoint's sidecar
    records. A missing, malformed or impossible position is a CorruptCheckpointError (the trainer falls
    back to the previous checkpoint); one saved for a data set of another size is a CheckpointMismatchError."""
    try:
        saved = IteratorState.from_json(meta["data"])
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCheckpointError(f"its sidecar has no valid data position ({type(error).__name__}: {error})") from None
    if saved.num_rows != iterator.state.num_rows:
        raise CheckpointMismatchError(
            f"the checkpoint of step {meta.get('step')} was saved for a data set of {saved.num_rows} rows; this run's "
            f"has {iterator.state.num_rows}: resume with the same data, or run in another directory")
    try:
        iterator.restore(saved)
    except ValueError as error:
        raise CorruptCheckpointError(f"its data position cannot be restored: {error}") from None


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


def base_record(model_name: str, base: Any) -> dict[str, Any]:
    """What a LoRA checkpoint records of the frozen base its adapters were trained on: the model's name and
    one sha256 over its arrays' digests (None when the arrays span several processes: not checked)."""
    digests = state_digests(base)
    joint = None if digests is None else hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    return {"model": model_name, "sha256": joint}


def check_base(meta: dict[str, Any], record: dict[str, Any] | None) -> None:
    """A CheckpointMismatchError when the checkpoint's adapters were trained on another base than this run's
    (or the run and the checkpoint differ in having adapters at all)."""
    saved = meta.get("base")
    if record is None and saved is None:
        return
    if record is None or saved is None:
        what = "LoRA adapters" if saved is not None else "a full model, not LoRA adapters"
        raise CheckpointMismatchError(f"the checkpoint of step {meta.get('step')} holds {what}, unlike this run "
                                      "(model.lora): resume with the same recipe, or run in another directory")
    if saved.get("sha256") and record["sha256"] and saved["sha256"] != record["sha256"]:
        raise CheckpointMismatchError(
            f"the adapters of step {meta.get('step')} were trained on another base model: model.name="
            f"{record['model']!r} (sha256 {record['sha256'][:16]}...) is not the base they were saved with "
            f"({saved.get('model')!r}, sha256 {saved['sha256'][:16]}...): resume with that base, or run in "
            "another directory")
