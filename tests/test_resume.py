"""A run killed with SIGKILL (or preempted with SIGTERM) and restarted with the same command ends with
exactly the parameters of a run that was never interrupted."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

RECIPE = [
    "model.name=tiny", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.head_dim=16", "model.log_z_width=16",
    "method.name=powerflow", "data.source=arithmetic", "steps=10", "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4", "rollout.max_new_tokens=4", "rollout.minibatches=2", "rollout.updates_per_batch=2",
    "eval.enabled=false", "checkpoint.every_steps=1", "checkpoint.keep=2", "logging.tensorboard=false",
    "logging.plots=false", "logging.progress_bar=false", "optimizer.lr=1e-3",
]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _command(runs_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pf_jax.train", *RECIPE, f"logging.runs_dir={runs_dir}", "logging.run_name=r", *extra]


def _final_params(runs_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(runs_dir / "r" / "export" / "model.safetensors"))


def _logged_steps(runs_dir: Path) -> int:
    path = runs_dir / "r" / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines(keepends=True) if x.endswith("\n")]
    return max((x["step"] for x in lines), default=0)


def _interrupt(runs_dir: Path, sig: signal.Signals, after_step: int, *extra: str) -> tuple[int, str]:
    proc = subprocess.Popen(_command(runs_dir, *extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while _logged_steps(runs_dir) < after_step:
        assert proc.poll() is None, f"run ended before step {after_step}:\n{proc.stdout.read()}"
        assert time.time() < deadline, "run too slow"
        time.sleep(0.05)
    # Freeze the run the moment the step is seen, so the signal lands mid-run however loaded the machine
    # is (a tiny step takes ~0.1 s), then deliver it and let the run go on.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = tmp_path_factory.mktemp("straight")
    done = subprocess.run(_command(runs), env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return _final_params(runs)


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    code, _ = _interrupt(tmp_path, signal.SIGKILL, after_step=3)
    assert code == -signal.SIGKILL
    assert not (tmp_path / "r" / "export").exists()
    resumed = subprocess.run(_command(tmp_path), env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed" in resumed.stdout
    _assert_same(_final_params(tmp_path), uninterrupted)


ASYNC = ("rollout.mode=async", "rollout.max_staleness=2")


def test_sigkill_of_an_async_run_then_resume_matches_uninterrupted(tmp_path):
    """rollout.mode=async: the rollouts in flight at the kill are sampled again on resume, from the parameter
    versions the checkpoint holds, so the run still ends with an uninterrupted run's parameters."""
    straight = tmp_path / "straight"
    done = subprocess.run(_command(straight, *ASYNC), env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    killed = tmp_path / "killed"
    code, _ = _interrupt(killed, signal.SIGKILL, 4, *ASYNC)
    assert code == -signal.SIGKILL
    resumed = subprocess.run(_command(killed, *ASYNC), env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed" in resumed.stdout
    _assert_same(_final_params(killed), _final_params(straight))


def test_sigterm_saves_exits_cleanly_and_resumes(tmp_path, uninterrupted):
    code, out = _interrupt(tmp_path, signal.SIGTERM, after_step=2)
    assert code == 0, out
    assert "SIGTERM received: saved step" in out
    resumed = subprocess.run(_command(tmp_path), env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _assert_same(_final_params(tmp_path), uninterrupted)


def test_resuming_with_another_model_is_a_clear_error_and_moves_nothing(tmp_path, capsys):
    """A run dir reused with a wider model: before, every good checkpoint was quarantined as corrupt and
    the run started over from step 0."""
    from pf_jax.train import main

    common = [*RECIPE, "steps=2", "export=false", f"logging.runs_dir={tmp_path}", "logging.run_name=r"]
    assert main(common) == 0
    checkpoints = tmp_path / "r" / "checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    assert main([*common, "steps=4", "model.tiny.hidden_size=64"]) == 2
    err = capsys.readouterr().err
    assert "holds a different state than this run's: params/" in err, err
    assert "has shape (32, 16) in the checkpoint, (64, 16) here" in err, err  # the hidden size named
    assert sorted(p.name for p in checkpoints.iterdir()) == before  # nothing moved to corrupt/


def _in_process(runs_dir: Path, *extra: str):
    from pf_jax.config import load_config
    from pf_jax.config.recipe import TrainConfig
    from pf_jax.training.trainer import Trainer

    return Trainer(load_config(TrainConfig, None, [*RECIPE, "steps=4", "checkpoint.every_steps=100",
                                                   f"logging.runs_dir={runs_dir}", "logging.run_name=r", *extra]))


def _fail_on_call(monkeypatch, owner, name: str, call: int, error: BaseException) -> None:
    """Fault injection: the real `owner.name`, except that its `call`-th call raises `error`."""
    real, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("error", [RuntimeError("environment crashed"), KeyboardInterrupt()],
                         ids=["exception", "ctrl-c"])
def test_an_error_mid_run_saves_the_last_finished_step_then_resumes(tmp_path, capsys, monkeypatch, error):
    """checkpoint.every_steps=100 would save nothing before step 4: an error while making step 3's batch
    must not lose steps 1-2, and the resumed run ends exactly where an unbroken one does."""
    from pf_jax.training.trainer import Trainer

    straight = _in_process(tmp_path / "straight").run()
    assert straight.completed
    with monkeypatch.context() as patch:
        _fail_on_call(patch, Trainer, "make_batch", 3, error)
        with pytest.raises(type(error)):
            _in_process(tmp_path / "broken").run()
    assert "failed during step 3; saved step 2 first" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "broken" / "r" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    resumed = _in_process(tmp_path / "broken").run()
    assert resumed.completed and resumed.final_step == 4
    assert "resumed" in capsys.readouterr().out
    _assert_same(_final_params(tmp_path / "broken"), _final_params(tmp_path / "straight"))


def test_an_error_inside_an_update_saves_nothing_half_updated(tmp_path, capsys, monkeypatch):
    """The recipe updates in 2 minibatches x 2 passes: an error at step 3's second minibatch leaves a state
    that is neither step 2 nor step 3, so nothing is saved and the message says why."""
    trainer = _in_process(tmp_path)
    _fail_on_call(monkeypatch, trainer, "train_step", 2 * 4 + 2, RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        trainer.run()
    assert "step 2 cannot be saved" in capsys.readouterr().err
    assert not any(p.name.isdigit() for p in (tmp_path / "r" / "checkpoints").iterdir())


# A run killed at a chosen moment: the real `python -m pf_jax.train`, with one function wrapped to SIGKILL the
# process from inside it, halfway through what it writes.
KILLING_TRAIN = textwrap.dedent(
    """
    import json, os, signal, sys
    from pf_jax.training import checkpoint, run_storage, state_digests

    where, at = sys.argv[1], int(sys.argv[2])
    if where == "metrics":  # half of step `at`'s metrics line reaches metrics.jsonl
        real_append = run_storage.LineLog.append

        def append(self, record):
            if record.get("step") == at:
                line = (json.dumps(record) + "\\n").encode()
                os.write(self._fd, line[: len(line) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real_append(self, record)

        run_storage.LineLog.append = append
    else:  # step `at`'s checkpoint dies while its digests are being computed, arrays half hashed
        real_save, real_digest, saving, hashed = checkpoint.Checkpointer.save, state_digests.array_digest, [0], [0]

        def save(self, step, *args, **kwargs):
            saving[0] = step
            return real_save(self, step, *args, **kwargs)

        def array_digest(x):
            hashed[0] += saving[0] == at
            if hashed[0] == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_digest(x)

        checkpoint.Checkpointer.save, state_digests.array_digest = save, array_digest
    from pf_jax.train import main

    sys.exit(main(sys.argv[3:]))
    """
)


def test_kills_during_a_metrics_write_and_a_digest_write_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    """Before, a kill mid-write of metrics.jsonl left half a JSON line and the resume died on JSONDecodeError."""
    script = tmp_path / "killing_train.py"
    script.write_text(KILLING_TRAIN)
    runs = tmp_path / "runs"
    metrics, checkpoints = runs / "r" / "metrics.jsonl", runs / "r" / "checkpoints"
    command = [*_command(runs), "logging.every_steps=1"]  # every step's line written (training unchanged)
    for where, at in (("metrics", 3), ("digests", 6)):
        killed = subprocess.run([sys.executable, str(script), where, str(at), *command[3:]], env=ENV,
                                capture_output=True, text=True, timeout=900)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        if where == "metrics":
            assert not metrics.read_text().endswith("\n")  # a torn line, as a kill mid-write leaves
        else:
            assert not [p for p in checkpoints.iterdir() if p.name.startswith("6")]  # step 6 never began
    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed" in resumed.stdout
    _assert_same(_final_params(runs), uninterrupted)
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 11))  # each step once, every line whole


def _tmpfs_allowed() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def _stopped_with_one_line(code: int, err: str, *words: str) -> None:
    assert code == 2, err[-3000:]
    assert "Traceback (most recent call last)" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("pf_jax.train: ")]
    assert len(lines) == 1, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]


def _disk_fills(command: list[str], ckpt: Path) -> subprocess.CompletedProcess:
    """In a private mount namespace: a 450 KiB tmpfs holds step 1's checkpoint (~310 KiB) but not step 2's;
    the run must stop with a message. Then the tmpfs grows and the same command runs again."""
    if not _tmpfs_allowed():
        pytest.skip("no private tmpfs mount here (needs root and unshare)")
    ckpt.mkdir()
    run = shlex.join(command)
    script = (f"mount -t tmpfs -o size=450k tmpfs {ckpt} && {{ {run}; echo @@exit=$? >&2; }}; "
              f"mount -o remount,size=64m {ckpt} && {run}")
    both = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=ENV,
                          capture_output=True, text=True, timeout=1200)
    first_err, _, rest = both.stderr.partition("@@exit=")
    _stopped_with_one_line(int(rest.split()[0]), first_err, str(ckpt), "No space left on device",
                           "the last checkpoint on disk is step 1")
    return both


def _turns_read_only(command: list[str], ckpt: Path, runs: Path) -> subprocess.CompletedProcess:
    """The checkpoint directory is made read-only after step 3 is logged (root runs the trainer without
    CAP_DAC_OVERRIDE, so that it obeys the mode as other users do): the run must stop within seconds."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root ignores a read-only directory, and setpriv is not there to drop that capability")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    proc = subprocess.Popen([*prefix, *command], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while _logged_steps(runs) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.chmod(ckpt, 0o555)
    began = time.time()
    _, err = proc.communicate(timeout=300)
    assert time.time() - began < 60, f"{time.time() - began:.0f} s to stop after the failed save"
    _stopped_with_one_line(proc.returncode, err, str(ckpt), "Permission denied", "the last checkpoint on disk is step")
    assert any(p.name.isdigit() for p in ckpt.iterdir())  # the last good checkpoint is kept
    os.chmod(ckpt, 0o755)
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("failure", ["disk-fills", "turns-read-only"])
def test_a_failed_save_stops_the_run_promptly_and_the_resume_matches(tmp_path, uninterrupted, failure):
    """Before, training went on after a failed save and then stalled ~5 minutes at exit (read-only), or its
    torn metrics line blocked the resume (full disk). Now the run stops at the next step with one line naming
    the directory and the OS error, keeps its last good checkpoint, and the same command resumes."""
    runs, ckpt = tmp_path / "runs", tmp_path / "ckpt"
    command = [*_command(runs), f"checkpoint.dir={ckpt}"]
    resumed = _disk_fills(command, ckpt) if failure == "disk-fills" else _turns_read_only(command, ckpt, runs)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    _assert_same(_final_params(runs), uninterrupted)
