"""Multi-process runs on loopback: 2 processes x 2 CPU devices (gloo) train like 1 process x 4 devices,
and a checkpoint written by the 2-process run restores in a 1-process run on another mesh.

Processes are started by launch/local.sh (the script users rehearse with), each test bounded by a
timeout that kills the whole process group.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pf_jax.sharding.distributed import DistributedSetupError, detect_cluster, initialize_distributed
from tests.subprocesses import run_in_process_group

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "launch" / "local.sh"
WORKER = ROOT / "tests" / "multihost" / "train_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, devices: int | None, *command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """launch/local.sh -n N [-d K] -- command; the process group is killed if it overruns."""
    args = ["bash", str(LOCAL), "-n", str(n), "-p", str(free_port())]
    if devices:
        args += ["-d", str(devices)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return run_in_process_group([*args, "--", *command], cwd=ROOT, env=env, timeout=timeout, label=command)


def worker(n: int, devices: int, *args: str) -> dict:
    done = launch(n, devices, sys.executable, str(WORKER), *args)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith('{"process_count"')][-1])


def test_detect_cluster_from_environment():
    assert detect_cluster({}) == "single"
    assert detect_cluster({"PF_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "explicit"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert detect_cluster({**slurm, "SLURM_NTASKS": "16"}) == "slurm"
    assert detect_cluster({**slurm, "SLURM_NTASKS": "1"}) == "single"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) == "single"
    assert detect_cluster({"PF_DISTRIBUTED": "tpu"}) == "tpu"
    assert detect_cluster({"PF_DISTRIBUTED": "off", "PF_COORDINATOR_ADDRESS": "h:1"}) == "single"
    with pytest.raises(DistributedSetupError, match="PF_DISTRIBUTED='mpi'"):
        detect_cluster({"PF_DISTRIBUTED": "mpi"})


def test_incomplete_explicit_environment_is_named():
    with pytest.raises(DistributedSetupError, match="PF_NUM_PROCESSES is not"):
        initialize_distributed({"PF_COORDINATOR_ADDRESS": "127.0.0.1:1234", "PF_PROCESS_ID": "0"})
    with pytest.raises(DistributedSetupError, match="expected host:port"):
        initialize_distributed({"PF_COORDINATOR_ADDRESS": "localhost"})
    with pytest.raises(DistributedSetupError, match=r"PF_PROCESS_ID=2 must be in \[0, PF_NUM_PROCESSES=2\)"):
        initialize_distributed({"PF_COORDINATOR_ADDRESS": "h:1", "PF_NUM_PROCESSES": "2", "PF_PROCESS_ID": "2"})
    info = initialize_distributed({})
    assert (info.mode, info.process_index, info.process_count) == ("single", 0, 1)
    assert info.device_count == jax.device_count()


def test_local_launcher_stops_the_others_when_one_process_fails():
    start = time.monotonic()
    # the others' `sleep` runs as a child of their shell (the command after it keeps bash from exec'ing it):
    # stopping a process must stop its children too, or they outlive the launcher holding its pipes
    script = 'if [ "$PF_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 120; echo unreachable'
    done = launch(3, None, "bash", "-c", script, timeout=60)
    assert done.returncode == 3
    assert "stopping the others" in done.stderr
    assert time.monotonic() - start < 30


@pytest.mark.multiprocess
def test_two_processes_train_like_one_and_checkpoint_restores_in_one(tmp_path):
    two = worker(2, 2, "train", "--out", str(tmp_path / "two"), "--mesh", "2,2,1", "--steps", "3")
    one = worker(1, 4, "train", "--out", str(tmp_path / "one"), "--mesh", "2,2,1", "--steps", "3")
    assert (two["process_count"], two["local_device_count"], two["device_count"]) == (2, 2, 4)
    assert (one["process_count"], one["local_device_count"], one["device_count"]) == (1, 4, 4)
    assert two["local_rows"] == 4 and one["local_rows"] == 8  # each process loads only its share
    print("2 processes x 2 devices:", two["losses"], "\n1 process x 4 devices:", one["losses"])
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=1e-5)
    p2, p1 = np.load(tmp_path / "two" / "params.npz"), np.load(tmp_path / "one" / "params.npz")
    assert max(float(np.abs(p2[k] - p1[k]).max()) for k in p2) < 1e-5

    # the 2-process checkpoint, restored by one process on a different mesh (fsdp=4)
    back = worker(1, 4, "restore", "--out", str(tmp_path / "restored"), "--ckpt", str(tmp_path / "two" / "ckpt"),
                  "--mesh", "1,4,1")
    assert back["step"] == 3 and back["meta_losses"] == two["losses"]  # metadata written once, by process 0
    assert back["spec"] == "P(None, 'fsdp')"  # resharded from the (2, 2, 1) layout it was saved in
    restored = np.load(tmp_path / "restored" / "params.npz")
    assert sorted(restored) == sorted(p2)
    for k in p2:
        np.testing.assert_array_equal(restored[k], p2[k])


def test_each_process_samples_its_rows_over_all_its_devices(tmp_path):
    """Several processes: the trainer's sampler layout gives each process a whole copy on each of its
    devices (before: its first device only, the others idle) and generate splits the rows over them, with
    the same result as on one device."""
    done = launch(2, 2, sys.executable, str(ROOT / "tests" / "multihost" / "sample_worker.py"), str(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((tmp_path / f"result_{p}.json").read_text()) for p in (0, 1)]
    for r in results:
        assert (r["process_count"], r["local_device_count"]) == (2, 2), r
        assert r["row_devices"] == r["local_devices"] and r["spec"] == "P('data',)", r  # 6 rows over 2 devices
        assert r["mismatched_entries"] == 0 and r["max_logprob_diff"] < 1e-5, r
    assert results[0]["local_devices"] != results[1]["local_devices"]
