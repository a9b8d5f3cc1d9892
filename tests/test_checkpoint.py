"""Checkpoints: real orbax saves and restores, keep-last-K, damaged files on disk, SIGTERM in a real
subprocess."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, struct

from pf_jax.config import CheckpointConfig
from pf_jax.training.checkpoint import Checkpointer, CheckpointMismatchError, CorruptCheckpointWarning

REPO = Path(__file__).resolve().parents[1]


def train_state(scale: float):
    # Arrays large enough that orbax stores them in data files rather than inline in the manifest.
    params = {"w": jnp.full((64, 64), scale), "log_z": jnp.asarray(scale)}
    opt_state = optax.adamw(1e-3).init(params)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(0), int(scale)))
    return {"params": params, "opt_state": opt_state, "rng": rng}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(directory, steps, keep=5, every=1):
    with Checkpointer(directory, every_steps=every, keep=keep) as ckpt:
        for step in steps:
            ckpt.save(step, train_state(step), {"data_state": {"epoch": 0, "position": step}, "config": {"a": 1}})


def test_round_trip_keeps_structure_rng_and_sidecar(tmp_path):
    save_steps(tmp_path, [1])
    with Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore_latest(train_state(0))
    assert restored.step == 1
    assert_trees_equal(restored.state, train_state(1))
    assert type(restored.state["opt_state"][0]) is type(train_state(0)["opt_state"][0])
    key = jax.random.wrap_key_data(restored.state["rng"])
    assert jax.random.normal(key) == jax.random.normal(jax.random.fold_in(jax.random.key(0), 1))
    assert restored.meta == {"step": 1, "data_state": {"epoch": 0, "position": 1}, "config": {"a": 1}}


@struct.dataclass
class NnxTrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def test_nnx_state_struct_dataclass_and_typed_key(tmp_path):
    _, policy = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Param)
    params = {"policy": policy, "log_z": jnp.zeros(())}
    state = NnxTrainState(jnp.asarray(7), params, optax.adam(1e-3).init(params), jax.random.key(11))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(7, state, {"data_state": None}, force=True)
        ckpt.wait()
        restored = ckpt.restore_latest(jax.eval_shape(lambda: state))
    assert isinstance(restored.state, NnxTrainState) and isinstance(restored.state.params["policy"], nnx.State)
    assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)
    assert jax.random.uniform(restored.state.rng) == jax.random.uniform(jax.random.key(11))
    np.testing.assert_array_equal(restored.state.params["policy"]["kernel"][...], policy["kernel"][...])
    assert_trees_equal(jax.random.key_data(restored.state.rng), jax.random.key_data(state.rng))


def test_interval_force_and_keep_last(tmp_path):
    with Checkpointer(tmp_path, every_steps=3, keep=2) as ckpt:
        started = [ckpt.save(step, train_state(step)) for step in range(1, 11)]
        assert ckpt.save(10, train_state(10), force=True)
        assert not ckpt.save(10, train_state(10), force=True)  # already there
        ckpt.wait()
        assert ckpt.steps() == [9, 10]
    assert [s for s, ok in zip(range(1, 11), started) if ok] == [3, 6, 9]


def test_fresh_directory_restores_nothing(tmp_path):
    with Checkpointer(tmp_path / "none") as ckpt:
        assert ckpt.restore_latest(train_state(0)) is None


def test_from_config_default_dir(tmp_path):
    ckpt = Checkpointer.from_config(CheckpointConfig(every_steps=7, keep=1, async_save=False), tmp_path / "run")
    assert ckpt.directory == (tmp_path / "run" / "checkpoints").absolute() and ckpt.every_steps == 7
    ckpt.close()


def _data_files(step_dir: Path) -> list[Path]:
    files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files, f"no data files under {step_dir}"
    return sorted(files, key=lambda p: p.stat().st_size)


def _truncate_data(step_dir):
    # Every data file: orbax keeps per-process files beside the merged database, and a restore need not read
    # the largest of them (truncating only the largest left a readable checkpoint in ~1 run in 5).
    for path in _data_files(step_dir):
        os.truncate(path, path.stat().st_size // 2)


def _remove_data(step_dir):
    for path in _data_files(step_dir):
        path.unlink()


# When one read of a damaged checkpoint fails, orbax's restore returns while tensorstore still has reads in
# flight; they complete later and post to the event loop orbax has closed, which Python reports as an ignored
# "Event loop is closed". That is orbax's, not the behaviour under test.
orbax_late_reads = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning")


@orbax_late_reads
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "commit_success.txt").unlink(), "no commit marker"),
        (_truncate_data, "unreadable"),
        (_remove_data, "unreadable"),
        (lambda d: (d / "meta" / "metadata").unlink(), "unreadable"),
        (lambda d: (d / "meta" / "metadata").write_text('{"step": 2}'), "sidecar for step 2"),
    ],
    ids=["no-commit-marker", "truncated-data", "removed-data", "removed-sidecar", "wrong-sidecar"],
)
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, reason):
    save_steps(tmp_path, [2, 4])
    damage(tmp_path / "4")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.warns(CorruptCheckpointWarning, match=f"step 4: .*{reason}"):
            restored = ckpt.restore_latest(train_state(0))
        assert restored.step == 2
        assert_trees_equal(restored.state, train_state(2))
        assert ckpt.steps() == [2]
        assert len(list((tmp_path / "corrupt").iterdir())) == 1
        # The run continues and can save step 4 again.
        assert ckpt.save(4, train_state(4), force=True)
        ckpt.wait()
        assert_trees_equal(ckpt.restore_latest(train_state(0)).state, train_state(4))


def test_restore_with_wrong_structure_names_the_step_and_the_arrays(tmp_path):
    save_steps(tmp_path, [1])
    with Checkpointer(tmp_path) as ckpt, pytest.raises(
            CheckpointMismatchError, match=r"checkpoint .*/1 holds a different state.*not in this run's state: opt_state"):
        ckpt.restore(1, {"params": {"w": jnp.zeros((64, 64))}})


def test_checkpoint_of_another_state_is_an_error_not_corruption(tmp_path):
    """An intact checkpoint of other shapes (e.g. a run dir reused with a wider model) must not be taken
    for corruption: before, restore_latest moved every good checkpoint to corrupt/ and started over."""
    save_steps(tmp_path, [2, 4])
    wider = train_state(0)
    wider["params"]["w"] = jnp.zeros((64, 65))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointMismatchError, match=r"params/w has shape \(64, 64\) in the checkpoint, "
                                                          r"\(64, 65\) here"):
            ckpt.restore_latest(wider)
        assert ckpt.steps() == [2, 4] and not (tmp_path / "corrupt").exists()
        assert_trees_equal(ckpt.restore_latest(train_state(0)).state, train_state(4))


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from pf_jax.training.checkpoint import Checkpointer, StopSignal

    directory, total = sys.argv[1], int(sys.argv[2])
    with StopSignal() as stop, Checkpointer(directory, every_steps=1000, keep=2) as ckpt:
        restored = ckpt.restore_latest({"x": jnp.zeros(256)})
        step, x = (restored.step, restored.state["x"]) if restored else (0, jnp.zeros(256))
        while step < total:
            x = x + 1.0
            step += 1
            print(f"step {step}", flush=True)
            if stop.requested:
                ckpt.save(step, {"x": x}, {"reason": stop.received.name}, force=True)
                print(f"stopped at {step}", flush=True)
                break
            time.sleep(0.05)
        else:
            ckpt.save(step, {"x": x}, {"reason": "done"}, force=True)
    """
)


def test_sigterm_saves_at_step_boundary_and_resume_finishes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ckpt_dir), "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.strip() == "step 5":
            proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=120)
    assert returncode == 0, proc.stderr.read()
    stopped = int(lines[-1].removeprefix("stopped at "))
    assert stopped >= 5 and lines[-2] == f"step {stopped}"
    with Checkpointer(ckpt_dir) as ckpt:
        restored = ckpt.restore_latest({"x": jnp.zeros(256)})
    assert restored.step == stopped and restored.meta["reason"] == "SIGTERM"
    np.testing.assert_array_equal(restored.state["x"], np.full(256, float(stopped)))
    # Same command again resumes from the saved step and runs to the end.
    done = subprocess.run(
        [sys.executable, str(script), str(ckpt_dir), str(stopped + 3)],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    assert done.stdout.split() == ["step", str(stopped + 1), "step", str(stopped + 2), "step", str(stopped + 3)]
    with Checkpointer(ckpt_dir) as ckpt:
        final = ckpt.restore_latest({"x": jnp.zeros(256)})
    assert final.step == stopped + 3 and float(final.state["x"][0]) == stopped + 3


KILLED_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from pf_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], every_steps=1, keep=3)
    ckpt.save(1, {"x": jnp.ones(4_000_000)})
    ckpt.wait()
    ckpt.save(2, {"x": jnp.full(4_000_000, 2.0)})  # async: returns while the files are being written
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkill_during_async_save_leaves_a_usable_previous_checkpoint(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(script), str(ckpt_dir)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    # The kill lands while step 2 is being written. How far orbax got varies (its temporary directory may
    # not exist yet), but a finished step 2 never does.
    names = {p.name for p in ckpt_dir.iterdir()}
    assert "1" in names and names <= {"1", "2.orbax-checkpoint-tmp"}, names
    abstract = {"x": jnp.zeros(4_000_000)}
    with Checkpointer(ckpt_dir) as ckpt:
        restored = ckpt.restore_latest(abstract)
        assert restored.step == 1 and float(restored.state["x"].min()) == 1.0
        assert ckpt.save(2, {"x": jnp.full(4_000_000, 2.0)}, force=True)
        ckpt.wait()
        assert ckpt.restore_latest(abstract).step == 2
    assert not [p for p in ckpt_dir.iterdir() if "tmp" in p.name]


# --- integrity: digests, damaged sidecars, a step that cannot be moved, failed saves -----------------------

def _flip_middle_of_largest_data_file(step_dir: Path) -> None:
    path = _data_files(step_dir)[-1]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # size kept
    path.write_bytes(bytes(data))


def random_state(seed: int):
    # Random values: a flipped block of constants could decompress to the same array.
    return {"params": {"w": jax.random.normal(jax.random.key(seed), (256, 256))}, "step": jnp.asarray(seed)}


def test_flipped_bytes_with_the_size_kept_fall_back_naming_step_and_array(tmp_path):
    """The probe's silent corruption: before, step 4 was resumed with 12 of 12 tensors changed."""
    with Checkpointer(tmp_path) as ckpt:
        for step in (2, 4):
            ckpt.save(step, random_state(step), force=True)
    _flip_middle_of_largest_data_file(tmp_path / "4")
    changed = r"step 4: .*array \['params'\]\['w'\] differs from what was saved"
    with Checkpointer(tmp_path) as ckpt, pytest.warns(CorruptCheckpointWarning, match=changed):
        restored = ckpt.restore_latest(random_state(0))
    assert restored.step == 2
    assert_trees_equal(restored.state, random_state(2))
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt").iterdir()] == ["4"]


def test_restore_onto_another_dtype_reads_and_checks_the_saved_bytes(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, random_state(1), force=True)
        ckpt.wait()
        target = {"params": {"w": jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)}, "step": jnp.asarray(0)}
        restored = ckpt.restore(1, target)
    assert restored.state["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored.state["params"]["w"], random_state(1)["params"]["w"].astype(jnp.bfloat16))


def _sidecar(step_dir: Path) -> dict:
    import json

    return json.loads((step_dir / "meta" / "metadata").read_text())


def _rewrite_sidecar(step_dir: Path, edit) -> None:
    import json

    meta = _sidecar(step_dir)
    edit(meta)
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))


def save_with_data_positions(directory: Path, iterator) -> None:
    with Checkpointer(directory) as ckpt:
        for step in (1, 2):
            iterator.next_batch()
            ckpt.save(step, train_state(step), {"data": iterator.state.to_json()}, force=True)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda meta: meta.pop("data"), "no valid data position .*KeyError"),
        (lambda meta: meta["data"].update(position=10**9), "data position cannot be restored: .*out of range"),
        (lambda meta: meta["data"].update(epoch="x"), "no valid data position .*ValueError"),
        (lambda meta: meta.update(digests="not a mapping"), "malformed 'digests'"),
        (lambda meta: meta["digests"].pop(next(iter(meta["digests"]))), "has no recorded digest"),
    ],
    ids=["no-data-key", "impossible-position", "malformed-position", "malformed-digests", "missing-digest"],
)
def test_damaged_sidecar_falls_back_instead_of_raising(tmp_path, edit, reason):
    """Before, a sidecar without 'data' was a KeyError and an impossible position a ValueError: rc 1."""
    from pf_jax.data.iterator import BatchIterator
    from pf_jax.training.checkpoint import restore_data_position

    rows = list(range(10))
    save_with_data_positions(tmp_path, BatchIterator(rows, 2, seed=0))
    _rewrite_sidecar(tmp_path / "2", edit)
    resumed = BatchIterator(rows, 2, seed=0)
    with Checkpointer(tmp_path) as ckpt, pytest.warns(CorruptCheckpointWarning, match=f"step 2: .*{reason}"):
        restored = ckpt.restore_latest(train_state(0), accept=lambda meta: restore_data_position(resumed, meta))
    assert restored.step == 1 and resumed.state.position == 1
    assert_trees_equal(restored.state, train_state(1))


def test_data_position_of_another_data_set_is_a_mismatch_not_corruption(tmp_path):
    from pf_jax.data.iterator import BatchIterator
    from pf_jax.training.checkpoint import restore_data_position

    save_with_data_positions(tmp_path, BatchIterator(list(range(10)), 2, seed=0))
    other = BatchIterator(list(range(12)), 2, seed=0)
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointMismatchError, match="10 rows; this run's has 12"):
        ckpt.restore_latest(train_state(0), accept=lambda meta: restore_data_position(other, meta))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


@orbax_late_reads
def test_damaged_step_that_cannot_be_moved_is_skipped_in_place(tmp_path):
    """Before, a failed move aside stopped the fallback: the readable older step was not tried."""
    save_steps(tmp_path, [2, 4])
    _truncate_data(tmp_path / "4")
    (tmp_path / "corrupt").write_text("a file where the corrupt/ directory would go")
    in_place = "step 4: .*cannot be moved aside .*skipped in place"
    with Checkpointer(tmp_path) as ckpt, pytest.warns(CorruptCheckpointWarning, match=in_place):
        restored = ckpt.restore_latest(train_state(0))
    assert restored.step == 2 and (tmp_path / "4").is_dir()


def test_a_save_that_cannot_be_written_stops_at_once_naming_directory_and_os_error(tmp_path):
    from pf_jax.training.checkpoint import CheckpointSaveError

    directory = tmp_path / "ckpt"
    with Checkpointer(directory, every_steps=1) as ckpt:
        ckpt.save(1, train_state(1))
        ckpt.wait()
        directory.rename(tmp_path / "moved")
        directory.write_text("not a directory any more")
        with pytest.raises(CheckpointSaveError, match=f"step 2: cannot write to {directory}: File exists"):
            ckpt.save(2, train_state(2))
