"""``tools/caffe``: gflags syntax, train/test/time output like Caffe's, errors as one line."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.model import read_solverstate
from lymph_cv.formats.caffe.prototxt import read_net_prototxt
from lymph_cv.commands.caffe_tool import main
from lymph_cv.net.build import build_net
from lymph_cv.stages.timing import forward_backward_by_layer
from lymph_cv.stages import train as training
from trainutil import make_dataset, make_fold

from conftest import REPO_ROOT

CAFFE = REPO_ROOT / "tools" / "caffe"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fold trained for 20 iterations by ``tools/caffe train`` (a real subprocess)."""
    root = make_dataset(tmp_path_factory.mktemp("tool") / "work", n_train=64, n_test=48)
    solver = make_fold(root, max_iter=20, snapshot=10, test_interval=10, display=5)
    process = subprocess.run([sys.executable, str(CAFFE), "train", f"--solver={solver}", "-gpu", "-1"],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "Optimization Done." in process.stderr
    return solver


def test_train_writes_caffe_snapshots(trained):
    fold = trained.parent
    assert read_solverstate(fold / "1_caffenet_train_w32_iter_20.solverstate").iter == 20
    assert (fold / "1_caffenet_train_w32_iter_10.caffemodel").is_file()
    assert "Optimization Done." in (fold / "train.log").read_text()


def test_test_logs_batches_and_means(trained, capsys):
    fold = trained.parent
    status = main(["test", "-model", str(fold / "1-net.prototxt"),
                   f"--weights={fold / '1_caffenet_train_w32_iter_20.caffemodel'}", "-iterations", "3"])
    err = capsys.readouterr().err
    assert status == 0, err
    batches = [float(v) for v in re.findall(r"\] Batch \d, accuracy = (\S+)", err)]
    assert len(batches) == 3
    mean = float(re.search(r"\] accuracy = (\S+)", err).group(1))
    assert mean == pytest.approx(np.mean(batches), abs=1e-5)
    assert re.search(r"\] Loss: \S+", err)
    assert re.search(r"\] loss = (\S+) \(\* 1 = \1 loss\)", err)


def test_time_reports_iterations_and_layers(trained, capsys):
    status = main(["time", "--model", str(trained.parent / "1-net.prototxt"), "--iterations=2"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert len(re.findall(r"Iteration: \d forward-backward time: \S+ ms\.", err)) == 2
    assert re.search(r"     conv1\tforward: \S+ ms\.", err) and re.search(r"     conv1\tbackward: \S+ ms\.", err)
    for line in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward", "Total Time"):
        assert line in err


def test_layerwise_backward_equals_whole_net_backward(trained):
    net = build_net(read_net_prototxt(trained.parent / "1-net.prototxt"), caffe_pb2.TRAIN,
                    base_dir=trained.parent)
    net.init_params(torch.Generator().manual_seed(0))
    layers = training.data_layers(net, caffe_pb2.TRAIN, 0, lambda p: trained.parent / p)
    inputs = training.feed(layers, 0, torch.device("cpu"))
    loss, forward, backward = forward_backward_by_layer(net, inputs)
    by_layer = [entry.param.grad.clone() for entry in net.learnable]
    for entry in net.learnable:
        entry.param.grad = None
    net.loss(net(inputs)).backward()
    for a, entry in zip(by_layer, net.learnable):
        torch.testing.assert_close(a, entry.param.grad)
    assert len(forward) == len(backward) == len(net.layers) and loss > 0


@pytest.mark.parametrize("argv, message", [
    (["train"], "need -solver for caffe train"),
    (["train", "-solver", "s.prototxt", "-snapshot", "a", "-weights", "b"], "not both"),
    (["test", "-model", "m.prototxt"], "need model weights"),
    (["train", "-solvr", "x"], "unknown command line flag 'solvr'"),
    (["time", "-model", "m", "-iterations", "many"], "illegal value 'many' specified for int32 flag"),
    (["fly"], "unknown action fly; available caffe actions: train, test, time, device_query"),
    (["train", "-solver", "missing.prototxt"], "missing.prototxt"),
    (["train", "-solver", "s", "-gpu", "x"], "-gpu 'x'"),
])
def test_errors_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_help_lists_flags(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "-solver" in out and "-iterations" in out and "default: 50" in out


def test_gpu_flag_without_cuda_is_one_error_line(trained, capsys):
    if torch.cuda.is_available():
        assert main(["test", "-model", str(trained.parent / "1-net.prototxt"), "-gpu", "0", "-weights",
                     str(trained.parent / "1_caffenet_train_w32_iter_20.caffemodel"), "-iterations", "1"]) == 0
        return
    assert main(["train", "-solver", str(trained), "-gpu", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("error: CUDA was asked for but no CUDA device is available "
                                               "(valid: cpu, auto)")
