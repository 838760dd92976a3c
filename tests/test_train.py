"""The training loop: learning, Caffe's schedule and log, snapshots, resume, signals, errors."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from lymph_cv.formats.caffe.model import net_params, read_caffemodel, read_solverstate
from lymph_cv.errors import ConfigError, TrainingError
from lymph_cv.stages.train import train
from trainutil import make_dataset, make_fold

# caffe-facts §9: the regexes of Caffe's tools/extra/parse_log.py.
ITERATION = re.compile(r"Iteration (\d+)")
TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
GLOG_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")


def parse_caffe_log(path: Path):
    """A re-implementation of parse_log.py's logic: (train rows, test rows) keyed by iteration."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Solving" in line)
    train_rows, test_rows = {}, {}
    iteration, rate = None, None
    for line in lines[start:]:
        tokens = line.split()
        datetime.strptime(tokens[0][1:] + " " + tokens[1], "%m%d %H:%M:%S.%f")  # raises if malformed
        found = ITERATION.search(line)
        if found:
            iteration = int(found.group(1))
        if iteration is None:
            continue
        found = LEARNING_RATE.search(line)
        if found:
            rate = float(found.group(1))
        for regex, rows in ((TRAIN_OUTPUT, train_rows), (TEST_OUTPUT, test_rows)):
            found = regex.search(line)
            if found:
                row = rows.setdefault(iteration, {"lr": rate})
                row[found.group(2)] = float(found.group(3))
    return train_rows, test_rows


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("train") / "work")


def fold_copy(data_root: Path, tmp_path: Path, **kwargs) -> Path:
    """A fresh fold folder beside the shared databases (solver files in ``tmp_path``/1)."""
    work = tmp_path / "work"
    work.mkdir(parents=True)
    for name in ("DB_train_1", "DB_test_1", "DB_train_w32_1.binaryproto"):
        os.symlink(data_root / name, work / name)
    return make_fold(work, **kwargs)


def weights_of(path: Path):
    return {name: [a.copy() for a in arrays] for name, arrays in net_params(read_caffemodel(path)).items()}


def test_training_learns_and_logs_like_caffe(data_root, tmp_path):
    solver = fold_copy(data_root, tmp_path, max_iter=300, test_interval=100, display=50, snapshot=150,
                       base_lr=0.002)
    result = train(solver, progress=False)
    fold = solver.parent
    assert result.iterations == 300 and not result.stopped_early
    assert [p.name for p in result.snapshots] == ["1_caffenet_train_w32_iter_150.caffemodel",
                                                  "1_caffenet_train_w32_iter_300.caffemodel"]
    for n in (150, 300):
        state = read_solverstate(fold / f"1_caffenet_train_w32_iter_{n}.solverstate")
        assert state.iter == n and state.learned_net == f"1_caffenet_train_w32_iter_{n}.caffemodel"
        assert len(state.history) == 4 and all(np.all(np.asarray(h.data) >= 0) for h in state.history)

    train_rows, test_rows = parse_caffe_log(fold / "train.log")
    assert sorted(test_rows) == [0, 100, 200, 300]
    assert sorted(train_rows) == [0, 50, 100, 150, 200, 250]
    assert all(row["lr"] == pytest.approx(0.002) for row in train_rows.values() if row["lr"] is not None)
    assert test_rows[0]["accuracy"] < 0.5 < 0.9 < test_rows[300]["accuracy"]  # 3 classes: chance 1/3
    assert test_rows[300]["loss"] < test_rows[0]["loss"] / 3
    assert train_rows[250]["loss"] < train_rows[0]["loss"]
    assert result.test_scores["accuracy"] == test_rows[300]["accuracy"]

    text = (fold / "train.log").read_text()
    lines = text.splitlines()
    after_solving = lines[next(i for i, line in enumerate(lines) if "Solving" in line):]
    assert all(GLOG_PREFIX.match(line) for line in after_solving)
    assert "Learning Rate Policy: fixed" in text and text.rstrip().endswith("Optimization Done.")
    assert re.search(r"    Test net output #1: loss = \S+ \(\* 1 = \S+ loss\)", text)
    # Caffe's order at a snapshot + test iteration: snapshot files, then the test, then the display.
    assert text.index("iter_300.caffemodel") < text.rindex("Iteration 300, loss") < text.rindex(
        "Iteration 300, Testing net")


def test_resume_gives_the_uninterrupted_weights(data_root, tmp_path):
    kwargs = dict(max_iter=40, snapshot=20, test_interval=15, display=10, dropout=True,
                  solver_extra="momentum: 0.0\n")
    solver = fold_copy(data_root, tmp_path / "a", **kwargs)
    train(solver, progress=False)
    full = weights_of(solver.parent / "1_caffenet_train_w32_iter_40.caffemodel")

    resumed = fold_copy(data_root, tmp_path / "b", **kwargs)
    train(resumed, max_iter=20, progress=False)
    result = train(resumed, snapshot=resumed.parent / "1_caffenet_train_w32_iter_20.solverstate",
                   progress=False)
    assert result.start_iteration == 20 and result.iterations == 40
    again = weights_of(resumed.parent / "1_caffenet_train_w32_iter_40.caffemodel")
    for name in full:
        for a, b in zip(full[name], again[name]):
            np.testing.assert_array_equal(a, b)
    log = (resumed.parent / "train.log").read_text()
    assert log.count("Solving tiny") == 2 and "Resuming from" in log  # the resumed run appends


def test_finetune_copies_weights_and_rejects_snapshot_with_weights(data_root, tmp_path):
    source = fold_copy(data_root, tmp_path / "src", max_iter=10, snapshot=0, test_interval=10)
    train(source, progress=False)
    model = source.parent / "1_caffenet_train_w32_iter_10.caffemodel"
    tuned = fold_copy(data_root, tmp_path / "ft", max_iter=1, snapshot=0, test_interval=10, base_lr=0.0)
    result = train(tuned, weights=[model], progress=False)
    assert result.start_iteration == 0
    train(tuned, weights=[model], progress=False)  # a fresh rerun keeps the earlier log aside
    assert (tuned.parent / "train.log.1").read_text().count("Finetuning from") == 1
    got = weights_of(tuned.parent / "1_caffenet_train_w32_iter_1.caffemodel")
    for name, arrays in weights_of(model).items():
        for a, b in zip(arrays, got[name]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="not both"):
        train(tuned, weights=[model], snapshot=model, progress=False)


def test_nan_loss_names_the_iteration(data_root, tmp_path):
    solver = fold_copy(data_root, tmp_path, max_iter=50, snapshot=0, test_interval=100, base_lr=1e30,
                       solver_extra="")
    text = solver.read_text().replace("solver_type: ADAGRAD", "solver_type: SGD")
    solver.write_text(text)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at iteration \d+"):
        train(solver, progress=False)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_snapshots_and_stops(data_root, tmp_path, signum):
    solver = fold_copy(data_root, tmp_path, max_iter=10 ** 6, snapshot=0, test_interval=10 ** 5,
                       display=100)
    log = solver.parent / "train.log"
    process = subprocess.Popen([sys.executable, "-m", "lymph_cv", "train", "--solver", str(solver),
                                "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "Iteration 200, lr" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    # 128 + signal, after the snapshot: a stopped training is not a finished one (was: 0)
    assert process.returncode == 128 + signum, stderr.decode()
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {signal.Signals(signum).name} at iteration ") and "--resume" in last
    text = log.read_text()
    assert text.rstrip().endswith("Optimization stopped early.")
    states = list(solver.parent.glob("*.solverstate"))
    assert len(states) == 1
    stopped_at = read_solverstate(states[0]).iter
    assert stopped_at >= 200 and states[0].name == f"1_caffenet_train_w32_iter_{stopped_at}.solverstate"
    assert f"stopped early at iteration {stopped_at}" in stdout.decode()


def test_cli_errors_are_one_line(runner, cli, data_root, tmp_path):
    solver = fold_copy(data_root, tmp_path, max_iter=2)
    model = solver.parent / "x.caffemodel"
    model.write_bytes(b"")
    result = runner.invoke(cli, ["train", "--solver", str(solver), "--weights", str(model),
                                 "--snapshot", str(model)])
    assert result.exit_code == 2 and "not both" in result.stderr
    result = runner.invoke(cli, ["train", "--solver", str(solver), "--device", "tpu"])
    assert result.exit_code == 2 and "cpu" in result.stderr
    (solver.parent.parent / "DB_test_1").unlink()  # the symlink to the shared test DB
    result = runner.invoke(cli, ["train", "--solver", str(solver)])
    assert result.exit_code == 2
    assert f"error: ../DB_test_1: not found in the current directory nor in {solver.parent}" in result.stderr
    bad = solver.parent / "bad.prototxt"
    bad.write_text(solver.read_text().replace('lr_policy: "fixed"', 'lr_policy: "cosine"'))
    result = runner.invoke(cli, ["train", "--solver", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {bad}: unknown lr_policy 'cosine' (valid: fixed, "
                                                  "step, exp, inv, multistep, poly, sigmoid, onecycle)"]


def test_cli_trains_from_another_directory(runner, cli, data_root, tmp_path, monkeypatch):
    solver = fold_copy(data_root, tmp_path, max_iter=5, snapshot=0, test_interval=5, display=0)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["train", "--solver", str(solver), "--seed", "3", "--max-iter", "4"])
    assert result.exit_code == 0, result.stderr
    assert "finished at iteration 4 (seed 3, cpu)" in result.output
    assert "test accuracy = " in result.output  # --max-iter off the test grid still ends with a test
    assert (solver.parent / "1_caffenet_train_w32_iter_4.caffemodel").is_file()
    assert not list(tmp_path.glob("*.caffemodel"))


def test_snapshot_reloads_with_pycaffe_and_inspect(data_root, tmp_path, runner, cli):
    import json

    import lymph_cv.pycaffe as caffe

    solver = fold_copy(data_root, tmp_path, max_iter=60, snapshot=0, test_interval=60, display=0)
    result = train(solver, progress=False)
    model = solver.parent / "1_caffenet_train_w32_iter_60.caffemodel"
    net = caffe.Net(str(solver.parent / "1-net.prototxt"), str(model), caffe.TEST)
    saved = weights_of(model)
    for name in ("conv1", "ip1"):
        for blob, array in zip(net.params[name], saved[name]):
            np.testing.assert_array_equal(blob.data, array)
    # one TEST batch through pycaffe (centre crops from the first key): far above chance (1/3)
    out = net.forward()
    assert out["accuracy"] > 0.6 and result.test_scores["accuracy"] > 0.6

    info = runner.invoke(cli, ["inspect", "--json", str(model)])
    assert info.exit_code == 0, info.stderr
    layers = {layer["name"]: layer for layer in json.loads(info.output)["layers"]}
    assert layers["conv1"]["blobs"] == [[8, 3, 3, 3], [8]]
    state = runner.invoke(cli, ["inspect", "--json", str(model.with_suffix(".solverstate"))])
    described = json.loads(state.output)
    assert described["iter"] == 60 and described["history_count"] == 4
    assert described["learned_net"] == model.name


def test_schedule_without_initial_test_and_with_iter_size(data_root, tmp_path):
    solver = fold_copy(data_root, tmp_path, max_iter=40, snapshot=0, test_interval=20, display=20,
                       solver_extra="test_initialization: false\niter_size: 2\naverage_loss: 4\n")
    result = train(solver, progress=False)
    train_rows, test_rows = parse_caffe_log(solver.parent / "train.log")
    assert sorted(test_rows) == [20, 40] and sorted(train_rows) == [0, 20]
    assert result.iterations == 40
    assert [p.name for p in result.snapshots] == ["1_caffenet_train_w32_iter_40.caffemodel"]


def test_resumes_from_the_published_caffe_solverstate(reference, tmp_path):
    """Caffe's own files load here: the tutorial's fold-1 solverstate resumes the rendered 32w net."""
    from lymph_cv.formats.caffe.blob import write_mean
    from lymph_cv.stages.render import render_fold
    from trainutil import write_db

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 3, 36, 36), dtype=np.uint8)
    labels = np.arange(48) % 3
    for kind in ("train", "test"):
        (tmp_path / f"{kind}_w32_1.txt").write_text("".join(f"p{i}.png\t{l}\n" for i, l in enumerate(labels)))
        write_db(tmp_path / f"DB_{kind}_1", images, labels)
    write_mean(tmp_path / "DB_train_w32_1.binaryproto", images.mean(axis=0).astype(np.float32))
    state = reference / "1_caffenet_train_w32_iter_600000.solverstate"
    adagrad = render_fold(tmp_path, 1, overrides={"batch_size": 16}).solver
    with pytest.raises(TrainingError, match="negative values, impossible for AdaGradSolver"):
        train(adagrad, snapshot=state, progress=False)  # its history is SGD momentum (caffe-facts §12)
    overrides = {"batch_size": 16, "base_lr": 1e-6, "solver_type": "SGD", "momentum": 0.9}
    solver = render_fold(tmp_path, 1, overrides=overrides).solver
    result = train(solver, snapshot=state, max_iter=600002, progress=False)
    assert result.start_iteration == 600000 and result.iterations == 600002
    published = weights_of(reference / "1_caffenet_train_w32_iter_600000.caffemodel")
    ours = weights_of(solver.parent / "1_caffenet_train_w32_iter_600002.caffemodel")
    assert set(ours) == set(published)
    for name in published:
        for a, b in zip(published[name], ours[name]):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-3)
    log = (solver.parent / "train.log").read_text()
    assert "Iteration 600000, Testing net (#0)" in log  # 600000 is on the test_interval grid
    saved = read_solverstate(solver.parent / "1_caffenet_train_w32_iter_600002.solverstate")
    assert saved.current_step == 5 and len(saved.history) == 10  # carried over from Caffe's state


def test_resolve_device_takes_cuda_n_like_run_and_evaluate():
    import torch

    from lymph_cv.stages.train import resolve_device

    if torch.cuda.is_available():
        assert resolve_device("cuda:0", 0) == torch.device("cuda", 0)
    else:
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            resolve_device("cuda:0", 0)
    with pytest.raises(ConfigError, match=r"unknown device 'cuda:x' \(valid: cpu, cuda, auto, cuda:N\)"):
        resolve_device("cuda:x", 0)


def test_corrupt_weights_or_snapshot_leave_the_earlier_log_in_place(data_root, tmp_path, runner, cli):
    """A bad --weights/--snapshot used to fail only after the earlier train.log was moved aside
    (fresh run) or after lines were appended to it (resume)."""
    solver = fold_copy(data_root, tmp_path, max_iter=2)
    log_path = solver.parent / "train.log"
    log_path.write_text("earlier run\n")
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\xff\x00junk")
    for option in ("--weights", "--snapshot"):
        result = runner.invoke(cli, ["train", "--solver", str(solver), option, str(junk)])
        assert result.exit_code == 2 and result.stderr.startswith(f"error: {junk}: expected a Caffe")
        assert log_path.read_text() == "earlier run\n"
        assert sorted(p.name for p in solver.parent.iterdir() if p.name.startswith("train.")) == ["train.log"]


def test_train_resume_flag_continues_from_the_newest_own_snapshot(data_root, tmp_path, runner, cli):
    """`train --resume` (what cluster jobs run): the newest snapshot of this solver's series, else a start."""
    from lymph_cv.stages.train import latest_solverstate, solver_snapshots

    solver = fold_copy(data_root, tmp_path / "r", max_iter=12, snapshot=4, test_interval=12, display=4)
    assert latest_solverstate(solver) is None
    result = runner.invoke(cli, ["train", "--solver", str(solver), "--resume", "--max-iter", "8"])
    assert result.exit_code == 0, result.stderr
    assert sorted(solver_snapshots(solver)) == [4, 8]
    other = solver.parent / "1_caffenet_train_w32_dropout_iter_100.solverstate"  # another series: ignored
    other.write_bytes((solver.parent / "1_caffenet_train_w32_iter_8.solverstate").read_bytes())
    assert latest_solverstate(solver) == solver.parent / "1_caffenet_train_w32_iter_8.solverstate"
    result = runner.invoke(cli, ["train", "--solver", str(solver), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert "resuming from" in result.stderr and "iter_8.solverstate" in result.stderr
    assert "finished at iteration 12" in result.stdout
    bad = runner.invoke(cli, ["train", "--solver", str(solver), "--resume", "--snapshot", str(other)])
    assert bad.exit_code == 2 and "--resume" in bad.stderr
