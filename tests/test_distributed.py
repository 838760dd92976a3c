"""Training on several processes (torch.distributed, gloo on the CPU), as Caffe's ``-gpu 0,1``.

The rule tested (caffe-facts §13): N processes of batch B each read the records of one process's
batch of N·B (rank r takes the strided share r::N), every rank's gradient is averaged, and the same
update runs everywhere; so N processes end with the weights of one process with the N-times batch.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lymph_cv.core.distributed import World, discover, first_host, parse_gpus
from lymph_cv.errors import ConfigError
from lymph_cv.formats.caffe.model import read_caffemodel
from trainutil import make_dataset, make_fold

ITERATIONS = 20
TIMEOUT_S = 240


def _solver(root: Path, solver_type: str, batch: int, max_iter: int = ITERATIONS, snapshot: int = 0) -> Path:
    make_dataset(root, n_train=96, n_test=32)
    # a rate at which SGD with momentum stays stable on the tiny net (0.01 diverges)
    path = make_fold(root, batch=batch, max_iter=max_iter, test_interval=1000, test_iter=2, display=5,
                     snapshot=snapshot, base_lr=0.001 if solver_type == "SGD" else 0.01)
    text = path.read_text().replace("solver_type: ADAGRAD", f"solver_type: {solver_type}")
    if solver_type == "SGD":
        text += "momentum: 0.9\n"
    path.write_text(text)
    return path


def _train(solver: Path, *extra: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lymph_cv", "train", "--solver", str(solver), "--device", "cpu",
                           *extra], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _weights(solver: Path, iteration: int) -> dict:
    model = solver.parent / f"1_caffenet_train_w32_iter_{iteration}.caffemodel"
    net = read_caffemodel(model)
    return {(layer.name, i): np.array(blob.data, dtype=np.float64)
            for layer in net.layer for i, blob in enumerate(layer.blobs)}


def _assert_same(a: dict, b: dict, atol: float = 1e-5, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=rtol, err_msg=str(key))


@pytest.fixture(scope="module")
def adagrad_pair(tmp_path_factory):
    """One process with batch 16 and two with batch 8 (snapshots every 10 iterations), AdaGrad."""
    root = tmp_path_factory.mktemp("adagrad")
    single = _solver(root / "single", "ADAGRAD", batch=16)
    double = _solver(root / "double", "ADAGRAD", batch=8, snapshot=10)
    one = _train(single)
    assert one.returncode == 0, one.stderr
    two = _train(double, "--procs", "2")
    assert two.returncode == 0, two.stderr
    return single, double


def _check_pair(single: Path, double: Path) -> None:
    _assert_same(_weights(single, ITERATIONS), _weights(double, ITERATIONS))
    log = (double.parent / "train.log").read_text()
    assert "Training on 2 processes" in log
    # only the root rank writes the log and the snapshots
    assert log.count("Optimization Done.") == 1
    assert log.count(f"Iteration {ITERATIONS}, loss") == 1


def test_two_processes_equal_one_with_the_doubled_batch_adagrad(adagrad_pair):
    _check_pair(*adagrad_pair)


def test_two_processes_equal_one_with_the_doubled_batch_sgd(tmp_path):
    single = _solver(tmp_path / "single", "SGD", batch=16)
    double = _solver(tmp_path / "double", "SGD", batch=8)
    assert _train(single).returncode == 0
    two = _train(double, "--procs", "2")
    assert two.returncode == 0, two.stderr
    _check_pair(single, double)
    assert sorted(p.name for p in double.parent.glob("*.caffemodel")) == [
        f"1_caffenet_train_w32_iter_{ITERATIONS}.caffemodel"]


def test_two_processes_resume_exactly(tmp_path, adagrad_pair):
    _, whole = adagrad_pair
    parts = _solver(tmp_path / "parts", "ADAGRAD", batch=8, snapshot=10)
    first = _train(parts, "--procs", "2", "--max-iter", "10")
    assert first.returncode == 0, first.stderr
    rest = _train(parts, "--procs", "2", "--resume")
    assert rest.returncode == 0, rest.stderr
    _assert_same(_weights(whole, ITERATIONS), _weights(parts, ITERATIONS), atol=0)


RESIDUAL_NET = """name: "tiny-residual"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true crop_size: 8 mean_file: "../DB_train_w32_1.binaryproto" }
  data_param { source: "../DB_train_1" batch_size: BATCH } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 8 mean_file: "../DB_train_w32_1.binaryproto" }
  data_param { source: "../DB_test_1" batch_size: BATCH } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 pad: 1 kernel_size: 3 bias_term: false weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 6 pad: 1 kernel_size: 3 bias_term: false weight_filler { type: "msra" } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_sync_bn_two_processes_equal_one_with_the_doubled_batch(tmp_path):
    # The rule tested: with --sync-bn, BatchNorm's batch statistics (and its stored mean/variance
    # blobs) are those of the whole N·B batch, so a residual net with BatchNorm trains on two ranks
    # as on one with the doubled batch.  Without it each rank normalises by its own B samples (Caffe).
    runs = {}
    for name, batch, extra in (("single", 16, ()), ("double", 8, ("--procs", "2", "--sync-bn"))):
        solver = _solver(tmp_path / name, "SGD", batch=batch)
        (solver.parent / "1-net.prototxt").write_text(RESIDUAL_NET.replace("BATCH", str(batch)))
        done = _train(solver, *extra)
        assert done.returncode == 0, done.stderr
        runs[name] = _weights(solver, ITERATIONS)
    # BatchNorm's blobs are sums over 20 updates (values near 10): float32 summation order shows
    # there at 1e-5 relative, so the statistics are compared relative, the weights absolutely.
    stats = {key for key in runs["single"] if key[0].startswith("bn")}
    _assert_same({k: v for k, v in runs["single"].items() if k not in stats},
                 {k: v for k, v in runs["double"].items() if k not in stats})
    _assert_same({k: runs["single"][k] for k in stats}, {k: runs["double"][k] for k in stats}, rtol=1e-5)
    assert any(layer == "bn1" for layer, _ in runs["double"])


def _children(pid: int) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_rank_fails_the_run_fast_with_one_line(tmp_path):
    solver = _solver(tmp_path, "ADAGRAD", batch=8, max_iter=10 ** 6)
    launcher = subprocess.Popen([sys.executable, "-m", "lymph_cv", "train", "--solver", str(solver), "--device",
                                 "cpu", "--procs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        log = solver.parent / "train.log"
        _wait_for(lambda: log.exists() and "Iteration 5, loss" in log.read_text(), 120, "training to start")
        ranks = _wait_for(lambda: (lambda c: c if len(c) == 2 else None)(_children(launcher.pid)), 10, "two ranks")
        os.kill(ranks[1], signal.SIGKILL)
        started = time.monotonic()
        _, err = launcher.communicate(timeout=60)
        assert time.monotonic() - started < 45
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines and "rank 1" in lines[-1] and "SIGKILL" in lines[-1], err
    assert "Traceback" not in err


def test_sigint_stops_every_rank_at_one_iteration_after_a_snapshot(tmp_path):
    solver = _solver(tmp_path, "ADAGRAD", batch=8, max_iter=10 ** 6)
    launcher = subprocess.Popen([sys.executable, "-m", "lymph_cv", "train", "--solver", str(solver), "--device",
                                 "cpu", "--procs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = solver.parent / "train.log"
    try:
        _wait_for(lambda: log.exists() and "Iteration 5, loss" in log.read_text(), 120, "training to start")
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, err
    models = list(solver.parent.glob("*.caffemodel"))
    assert len(models) == 1 and "Optimization stopped early." in log.read_text()
    assert "Traceback" not in err


def test_the_world_comes_from_the_launcher_environment():
    assert discover({}) == World()
    torchrun = discover({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                         "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.size, torchrun.local_rank, torchrun.address, torchrun.port) == (1, 4, 1, "n1", 1234)
    mpi = discover({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert (mpi.rank, mpi.size, mpi.local_rank, mpi.launcher) == (2, 3, 0, "mpirun")
    srun = discover({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
                     "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "42"})
    assert (srun.rank, srun.size, srun.local_rank, srun.address, srun.port) == (3, 4, 1, "gpu07", 29542)
    # a batch script (no job step) is one process whatever --ntasks said
    assert not discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "42"}).distributed
    with pytest.raises(ConfigError):
        discover({"RANK": "4", "WORLD_SIZE": "4"})
    assert first_host("node1,node2") == "node1" and first_host("a[1,3-4]") == "a1"
    assert parse_gpus("0,1") == [0, 1]
    for bad in ("0,0", "x", "-1", ""):
        with pytest.raises(ConfigError):
            parse_gpus(bad)
