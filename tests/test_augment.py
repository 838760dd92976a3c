"""Modern training: flips and quarter turns in the data layer, mixup, label smoothing, soft-target
loss, and exact resume with all of them on (with one-cycle and AdamW)."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from lymph_cv.errors import ConfigError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.model import net_params, read_caffemodel
from lymph_cv.formats.caffe.prototxt import parse_net_text
from lymph_cv.net.augment import (STREAM_GEOMETRY, Augmentation, augment_labels, flip_and_turn,
                                  geometry_draws, mix, mixup_draws, soft_targets, stream)
from lymph_cv.net.build import build_net
from lymph_cv.net.datalayer import DataLayer
from lymph_cv.stages.train import train
from trainutil import make_dataset, make_fold, write_db


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("augment") / "work", n_train=96, n_test=48)


def test_flip_and_turn_by_hand():
    image = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    batch = np.concatenate([image] * 4)
    out = flip_and_turn(batch.copy(), np.array([True, False, False, True]), np.array([0, 1, 2, 1]))
    assert out[0, 0].tolist() == [[2, 3], [0, 1]]      # upside down
    assert out[1, 0].tolist() == [[1, 3], [0, 2]]      # a quarter turn counter-clockwise
    assert out[2, 0].tolist() == [[3, 2], [1, 0]]      # half a turn
    assert out[3, 0].tolist() == [[3, 1], [2, 0]]      # upside down, then a quarter turn
    flips, turns = geometry_draws(np.random.default_rng(0), 1000, True, True)
    assert 0.4 < flips.mean() < 0.6 and set(turns.tolist()) == {0, 1, 2, 3}
    flips, turns = geometry_draws(np.random.default_rng(0), 5, False, False)
    assert not flips.any() and not turns.any()


def data_layer(root, augmentation, phase=caffe_pb2.TRAIN, crop=8):
    text = (f'layer {{ name: "d" type: "Data" top: "data" top: "label" transform_param {{ mirror: true '
            f'crop_size: {crop} }} data_param {{ source: "{root / "DB_train_1"}" batch_size: 16 }} }}')
    return DataLayer(parse_net_text(text).layer[0], phase, 5, lambda p: root / p, augmentation=augmentation)


def test_data_layer_flips_and_turns_after_the_same_crops(data_root, tmp_path):
    plain = data_layer(data_root, None)
    augmented = data_layer(data_root, Augmentation(vertical_flip=True, rotate90=True))
    for batch in (0, 3):
        base, labels = plain.batch_arrays(batch)
        got, got_labels = augmented.batch_arrays(batch)
        flips, turns = geometry_draws(stream(5, caffe_pb2.TRAIN, batch, STREAM_GEOMETRY), 16, True, True)
        np.testing.assert_array_equal(got, flip_and_turn(base.copy(), flips, turns))
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(got, augmented.batch_arrays(batch)[0])  # a pure function of b
    assert not np.array_equal(got, base)
    test_layer = data_layer(data_root, Augmentation(vertical_flip=True), phase=caffe_pb2.TEST)
    assert test_layer.augmentation is None  # TEST batches stay Caffe's
    wide = write_db(tmp_path / "DB_wide", np.zeros((2, 3, 12, 10), np.uint8), [0, 1])
    text = f'layer {{ name: "d" type: "Data" top: "data" data_param {{ source: "{wide}" batch_size: 2 }} }}'
    with pytest.raises(ConfigError, match="quarter turns need square inputs"):
        DataLayer(parse_net_text(text).layer[0], caffe_pb2.TRAIN, 0, lambda p: tmp_path / p,
                  augmentation=Augmentation(rotate90=True))


def test_mixup_draws_and_mixing_by_hand():
    lam, partner = mixup_draws(np.random.default_rng(1), 2000, 0.4)
    assert lam.min() >= 0.5 and lam.max() <= 1.0 and sorted(partner.tolist()) == list(range(2000))
    raw = np.random.default_rng(1).beta(0.4, 0.4, size=2000)  # the same stream: max(λ, 1 − λ)
    np.testing.assert_allclose(lam, np.maximum(raw, 1 - raw))
    data = torch.tensor([[[[1.0]]], [[[3.0]]]])
    targets = soft_targets(torch.tensor([0.0, 2.0]), 3)
    mixed, mixed_targets = mix(data, targets, np.array([0.75, 0.6]), np.array([1, 0]))
    np.testing.assert_allclose(mixed.reshape(-1).numpy(), [0.75 * 1 + 0.25 * 3, 0.6 * 3 + 0.4 * 1])
    np.testing.assert_allclose(mixed_targets.numpy(), [[0.75, 0, 0.25], [0.4, 0, 0.6]])
    smooth = soft_targets(torch.tensor([1.0]), 4, smoothing=0.2)
    np.testing.assert_allclose(smooth.numpy(), [[0.05, 0.85, 0.05, 0.05]])
    with pytest.raises(ConfigError, match="label smoothing must be in"):
        Augmentation(label_smoothing=1.0)
    with pytest.raises(ConfigError, match="mixup alpha"):
        Augmentation(mixup_alpha=-1.0)


LOSS_NET = """name: "loss"
input: "scores" input_dim: 2 input_dim: 3 input_dim: 1 input_dim: 1
input: "label" input_dim: 2 input_dim: 1 input_dim: 1 input_dim: 1
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "scores" bottom: "label" top: "loss" }
"""


def test_soft_target_loss_is_the_lambda_weighted_pair_of_losses():
    net = build_net(parse_net_text(LOSS_NET), caffe_pb2.TRAIN)
    scores = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.2, -1.0]], dtype=torch.float32, requires_grad=True)
    lam = np.array([0.8, 0.55])
    _, targets = mix(torch.zeros(2, 1), soft_targets(torch.tensor([0.0, 2.0]), 3), lam, np.array([1, 0]))
    loss = net({"scores": scores, "label": targets})["loss"]
    log_p = torch.log_softmax(scores.detach().double(), dim=1).numpy()
    hand = np.mean([-(0.8 * log_p[0, 0] + 0.2 * log_p[0, 2]), -(0.55 * log_p[1, 2] + 0.45 * log_p[1, 0])])
    assert float(loss.detach()) == pytest.approx(hand, rel=1e-6)
    loss.backward()
    p = np.exp(log_p)
    np.testing.assert_allclose(scores.grad.numpy(), (p - targets.numpy()) / 2, rtol=1e-5, atol=1e-7)
    # one-hot soft targets give Caffe's own loss
    hard = net({"scores": scores.detach(), "label": torch.tensor([0.0, 2.0])})["loss"]
    onehot = net({"scores": scores.detach(), "label": soft_targets(torch.tensor([0.0, 2.0]), 3)})["loss"]
    assert float(hard) == pytest.approx(float(onehot), rel=1e-6)
    data, smoothed = augment_labels(torch.ones(2, 1), torch.tensor([0.0, 1.0]), 3,
                                    Augmentation(label_smoothing=0.3), None)
    assert smoothed[0].tolist() == pytest.approx([0.8, 0.1, 0.1]) and data.tolist() == [[1.0], [1.0]]


MODERN = {"lr_policy: \"fixed\"": "lr_policy: \"onecycle\"", "solver_type: ADAGRAD": "type: \"AdamW\"\nmomentum: 0.9"}
AUGMENT = ("augmentation_param { mixup_alpha: 0.4 label_smoothing: 0.1 vertical_flip: true rotate90: true }\n")


def modern_fold(data_root, tmp_path, **kwargs):
    work = tmp_path / "work"
    work.mkdir(parents=True)
    for name in ("DB_train_1", "DB_test_1", "DB_train_w32_1.binaryproto"):
        os.symlink(data_root / name, work / name)
    solver = make_fold(work, solver_extra=AUGMENT, **kwargs)
    text = solver.read_text()
    for old, new in MODERN.items():
        text = text.replace(old, new)
    solver.write_text(text)
    return solver


def weights_of(path):
    return {name: [a.copy() for a in arrays] for name, arrays in net_params(read_caffemodel(path)).items()}


def test_resume_with_mixup_flips_onecycle_and_adamw_equals_the_uninterrupted_run(data_root, tmp_path):
    kwargs = dict(max_iter=24, snapshot=12, test_interval=12, display=6, base_lr=0.01)
    solver = modern_fold(data_root, tmp_path / "a", **kwargs)
    train(solver, progress=False)
    full = weights_of(solver.parent / "1_caffenet_train_w32_iter_24.caffemodel")
    record = json.loads((solver.parent / "train.json").read_text())
    assert record["lr_policy"] == "onecycle" and record["solver_type"] == "AdamW"
    assert record["augmentation"] == {"mixup_alpha": 0.4, "label_smoothing": 0.1, "vertical_flip": True,
                                      "rotate90": True}
    assert record["onecycle"]["pct_start"] == 0.25 and record["onecycle"]["div_final"] == 1e5

    # (not --max-iter 12: a shorter max_iter is a shorter cycle) the first half's snapshot, resumed
    resumed = modern_fold(data_root, tmp_path / "b", **kwargs)
    for suffix in ("caffemodel", "solverstate"):
        shutil.copy(solver.parent / f"1_caffenet_train_w32_iter_12.{suffix}", resumed.parent)
    result = train(resumed, snapshot=resumed.parent / "1_caffenet_train_w32_iter_12.solverstate", progress=False)
    assert result.start_iteration == 12 and result.iterations == 24
    again = weights_of(resumed.parent / "1_caffenet_train_w32_iter_24.caffemodel")
    for name in full:
        for a, b in zip(full[name], again[name]):
            np.testing.assert_array_equal(a, b)
    # mixup off (an override) is another run: the weights differ
    other = modern_fold(data_root, tmp_path / "c", **kwargs)
    train(other, progress=False, augmentation={"mixup_alpha": 0.0})
    changed = weights_of(other.parent / "1_caffenet_train_w32_iter_24.caffemodel")
    assert not np.array_equal(changed["ip1"][0], full["ip1"][0])
    log = (solver.parent / "train.log").read_text()
    assert "Learning Rate Policy: onecycle" in log
    assert "other augmentation" not in (resumed.parent / "train.log").read_text()
    # resuming with other options than the snapshot's run says so in the log
    shutil.copy(solver.parent / "train.json", other.parent)
    train(other, snapshot=solver.parent / "1_caffenet_train_w32_iter_12.solverstate", max_iter=13,
          progress=False, augmentation={"mixup_alpha": 0.0})
    assert "resuming with other augmentation" in (other.parent / "train.log").read_text()
    assert math.isfinite(result.last_loss)


def test_render_writes_the_extensions_only_when_asked(tmp_path, runner, cli):
    from lymph_cv.formats.caffe.prototxt import read_solver
    from netutil import rendered

    plain = rendered(tmp_path / "plain")
    assert "augmentation_param" not in plain.solver.read_text()
    result = runner.invoke(cli, ["render", str(plain.solver.parent.parent), "--mixup", "--rotate90",
                                 "--label-smoothing", "0.1", "--set", "lr_policy=onecycle",
                                 "--set", "solver_type=AdamW"])
    assert result.exit_code == 0, result.output
    solver = read_solver(plain.solver)
    assert solver.lr_policy == "onecycle" and solver.type == "AdamW" and solver.momentum == pytest.approx(0.9)
    assert solver.augmentation_param.mixup_alpha == pytest.approx(0.4)
    assert solver.augmentation_param.rotate90 and not solver.augmentation_param.vertical_flip
    record = json.loads((plain.solver.parent / "render.json").read_text())
    assert record["mixup_alpha"] == 0.4 and record["label_smoothing"] == 0.1 and record["rotate90"] is True
    assert record["lr_policy"] == "onecycle"
    with pytest.raises(ConfigError, match="AdamW has no V1"):
        rendered(tmp_path / "v1", legacy_v1=True, overrides={"solver_type": "AdamW"})
    result = runner.invoke(cli, ["render", str(plain.solver.parent.parent), "--label-smoothing", "1"])
    assert result.exit_code == 2 and "--label-smoothing" in result.output


def test_symmetries_are_the_eight_views_of_the_square():
    from lymph_cv.net.augment import symmetries

    image = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)
    views = symmetries(image)
    assert len(views) == 8 and torch.equal(views[0], image)
    assert len({tuple(v.reshape(-1).tolist()) for v in views}) == 8
    assert torch.equal(views[1], image.flip(3)) and torch.equal(views[2], torch.rot90(image, 1, dims=(2, 3)))
