"""Evaluation in bfloat16 (lymph_cv.net.bf16, ``--precision bfloat16``): float32's votes, close scores."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lymph_cv.core import devices
from lymph_cv.core.devices import cpu_has_bfloat16

from test_evaluate import CLASSES, _published_args, published  # noqa: F401  (the module's fixture)



class _Pool:
    """A MAX pooling's geometry, as lymph_cv.net.layers.PoolingLayer holds it."""

    def __init__(self, kernel, stride, pad, ceil=True):
        self.kernel, self.stride, self.pad, self.ceil, self.name = kernel, stride, pad, ceil, "pool"


@pytest.mark.parametrize("shape, kernel, stride, pad", [((20, 32, 32, 32), (3, 3), (2, 2), (0, 0)),
                                                        ((3, 5, 9, 7), (3, 2), (2, 1), (1, 1)),
                                                        ((2, 4, 6, 6), (2, 2), (2, 2), (0, 0))])
def test_relu_maxpool_on_int16_bit_patterns_is_exact(shape, kernel, stride, pad):
    from lymph_cv.net.bf16 import native_pool, native_relu_maxpool, relu_maxpool_int16

    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 100).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("-inf")
    x[-1, -1, -1, -1] = -0.0
    pool = _Pool(kernel, stride, pad)
    expected = F.relu(F.max_pool2d(x.float(), kernel, stride, pad, ceil_mode=True))
    assert torch.equal(relu_maxpool_int16(x, pool).float(), expected)
    module = native_pool()
    assert module is not None, "lymph_cv.net.maxpool16 is not built (make native)"
    native = native_relu_maxpool(module, x, pool)
    assert native.shape == expected.shape and native.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(native.float(), expected)
    with pytest.raises(ValueError, match="buffer sizes"):
        module.relu_maxpool(np.zeros(4, np.int16), np.zeros(4, np.int16), 1, 2, 2, 1, 2, 2, 2, 2, 0, 0, 1, 1, 1)


def test_the_prefix_follows_the_deploy_nets_layer_order(published):  # noqa: F811
    from lymph_cv.net.bf16 import BFloat16Forward
    from lymph_cv.stages.evaluate import WindowClassifier

    forward = BFloat16Forward(WindowClassifier(published["deploy"], published["model"], backend="torch").net)
    assert forward.layer_names == ["conv1", "pool1", "relu1", "conv2", "relu2", "pool2", "conv3", "relu3", "pool3"]
    names = [layer.name for layer in forward.layers]
    assert {names[p]: names[r] for p, r in forward.pools.items()} == {"pool1": "relu1"}  # ReLU after a MAX pooling


def _full_image(root):
    from lymph_cv.stages.evaluate import ParentEntry
    from lymph_cv.stages.synth import generate

    generate(root, per_class=1, cases_per_class=1, seed=5, workers=1)
    path = next((root / CLASSES[1]).glob("*.tif"))
    return ParentEntry(1, path.name, path, 1)


def test_bfloat16_votes_are_float32s_on_a_full_image(published, tmp_path):  # noqa: F811
    """The published fold-1 model on a full-size 1388×1040 image: the same votes, close scores, and
    the rechecked windows carry float32's probabilities exactly."""
    from lymph_cv.formats.caffe.blob import read_mean
    from lymph_cv.stages.evaluate import (BF16_MARGIN_BOUND, BF16_WORST_DEVIATION, Rechecks, WindowClassifier,
                                          evaluate_images)

    entry = _full_image(tmp_path)
    mean = read_mean(published["mean"])
    exact = evaluate_images(WindowClassifier(published["deploy"], published["model"], backend="torch"), [entry], mean, progress=False)[0]
    low = WindowClassifier(published["deploy"], published["model"], precision="bfloat16", backend="torch")
    rechecks = Rechecks()
    ours = evaluate_images(low, [entry], mean, progress=False, rechecks=rechecks)[0]
    assert rechecks.windows == len(exact.probs) == 1376 and 0 < rechecks.rechecked < rechecks.windows
    assert ours.probs.argmax(1).tolist() == exact.probs.argmax(1).tolist()
    assert ours.votes.tolist() == exact.votes.tolist() and ours.predicted == exact.predicted
    assert np.abs(ours.probs - exact.probs).max() <= BF16_WORST_DEVIATION  # what the bound was derived from
    same = (ours.probs == exact.probs).all(axis=1)
    assert same.sum() >= rechecks.rechecked
    from lymph_cv.stages.evaluate import decision_margins

    assert same[decision_margins(exact.probs) < BF16_MARGIN_BOUND / 2].all()  # surely rechecked


@pytest.mark.parametrize("batch_size", [10, 320])
def test_a_bound_above_every_margin_rechecks_every_window(published, batch_size):  # noqa: F811
    """margin_bound 2 (margins are ≤ 1): every window's float32 probabilities, bit for bit, also
    when a recheck batch is a single window (10 crops, padded to oneDNN's minimum)."""
    from lymph_cv.formats.caffe.blob import read_mean
    from lymph_cv.stages.evaluate import ParentEntry, Rechecks, WindowClassifier, evaluate_images

    mean = read_mean(published["mean"])
    entry = ParentEntry(1, "x", published["images"] / published["names"][0], 0)
    exact = evaluate_images(WindowClassifier(published["deploy"], published["model"], backend="torch"), [entry], mean, progress=False)[0]
    low = WindowClassifier(published["deploy"], published["model"], precision="bfloat16", backend="torch")
    rechecks = Rechecks()
    ours = evaluate_images(low, [entry], mean, progress=False, batch_size=batch_size, margin_bound=2.0,
                           rechecks=rechecks)[0]
    assert rechecks.rechecked == rechecks.windows == len(exact.probs) == 12
    assert np.array_equal(ours.probs, exact.probs)
    raw = evaluate_images(low, [entry], mean, progress=False, margin_bound=0.0)[0]
    assert not np.array_equal(raw.probs, exact.probs)  # it did run in bfloat16


def test_evaluate_precision_option_is_recorded(published, runner, cli, tmp_path):  # noqa: F811
    out = tmp_path / "w"
    result = runner.invoke(cli, _published_args(published, out) + ["--skip-missing", "--precision", "bfloat16"])
    assert result.exit_code == 0, result.stderr
    settings = json.loads((out / "eval" / "fold_1" / "metrics.json").read_text())["settings"]
    if cpu_has_bfloat16():
        assert settings["precision"] == "bfloat16" and "precision_asked" not in settings
        assert settings["rechecked"]["windows"] == 36 and settings["rechecked"]["bound"] > 0
    else:  # test_bfloat16_on_a_cpu_without_it_runs_float32
        assert (settings["precision"], settings["precision_asked"]) == ("float32", "bfloat16")
    result = runner.invoke(cli, _published_args(published, out) + ["--precision", "float16"])
    assert result.exit_code == 2 and "float16" in result.stderr


@pytest.mark.parametrize("flags,native", [("fpu sse avx2 fma", False), ("fpu avx512f avx512_bf16", True),
                                          ("fpu amx_tile amx_bf16", True)])
def test_bfloat16_on_a_cpu_without_it_runs_float32(published, runner, cli, tmp_path, monkeypatch, caplog, flags, native):  # noqa: F811
    """Where the CPU lists no bfloat16 arithmetic, `--precision bfloat16` evaluates in float32 (the
    same votes, not emulated bfloat16's minutes), says so once and records both."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_bfloat16(str(cpuinfo)) == native
    monkeypatch.setattr(devices, "CPUINFO_FILE", str(cpuinfo))
    out = tmp_path / "w"
    result = runner.invoke(cli, _published_args(published, out) + ["--skip-missing", "--precision", "bfloat16"])
    assert result.exit_code == 0, result.stderr
    settings = json.loads((out / "eval" / "fold_1" / "metrics.json").read_text())["settings"]
    warned = [r for r in caplog.records if "no bfloat16 arithmetic" in r.getMessage()]
    if native:
        assert settings["precision"] == "bfloat16" and "precision_asked" not in settings and not warned
    else:
        assert (settings["precision"], settings["precision_asked"]) == ("float32", "bfloat16") and len(warned) == 1
        exact = runner.invoke(cli, _published_args(published, tmp_path / "f") + ["--skip-missing"])
        assert exact.exit_code == 0, exact.stderr
        rows = [(folder / "eval" / "fold_1" / "images.csv").read_text() for folder in (out, tmp_path / "f")]
        assert rows[0] == rows[1]


def test_cpu_features_that_cannot_be_read_assume_nothing_away(tmp_path):
    assert cpu_has_bfloat16(str(tmp_path / "absent"))
    (tmp_path / "other").write_text("processor\t: 0\nmodel name\t: no feature list\n")
    assert cpu_has_bfloat16(str(tmp_path / "other"))
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_has_bfloat16(str(tmp_path / "arm"))


def test_bfloat16_without_amx(published):  # noqa: F811
    """oneDNN limited to AVX2 (no AMX, no avx512_bf16: its bfloat16 is emulated): the same votes."""
    script = (
        "import sys, numpy as np\n"
        "from lymph_cv.formats.caffe.blob import read_mean\n"
        "from lymph_cv.stages.evaluate import ParentEntry, WindowClassifier, evaluate_images\n"
        "deploy, model, mean, image = sys.argv[1:]\n"
        "entry = ParentEntry(1, 'x', image, 0)\n"
        "votes = [evaluate_images(WindowClassifier(deploy, model, precision=p, backend='torch'), [entry], read_mean(mean),\n"
        "                         progress=False)[0].votes.tolist() for p in ('float32', 'bfloat16')]\n"
        "assert votes[0] == votes[1], votes\n"
        "print('ok', votes)\n")
    image = published["images"] / published["names"][2]
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", script, str(published["deploy"]), str(published["model"]),
                           str(published["mean"]), str(image)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr


def test_run_passes_the_precision_to_its_evaluation(tmp_path):
    """`run --precision bfloat16` reaches the evaluate stage's parameters (float32: the key earlier runs have)."""
    from lymph_cv.stages.evaluate import STAGE
    from lymph_cv.stages.stage import RunOptions

    assert "precision" not in STAGE.params(RunOptions(workdir=tmp_path))
    assert STAGE.params(RunOptions(workdir=tmp_path, precision="bfloat16"))["precision"] == "bfloat16"
