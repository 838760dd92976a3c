"""HED stain jitter: the arithmetic, glass left alone, the data layer's seeded draws, exact resume."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from lymph_cv.errors import ConfigError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.model import net_params, read_caffemodel
from lymph_cv.formats.caffe.prototxt import parse_net_text
from lymph_cv.net.augment import STREAM_STAIN, Augmentation, stream
from lymph_cv.net.datalayer import DataLayer
from lymph_cv.net.hed import HED_FROM_RGB, RGB_FROM_HED, hed_jitter
from lymph_cv.stages.train import train
from trainutil import make_dataset, make_fold, write_db


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("hed") / "work", n_train=64, n_test=32)


def _bgr_batch(rgb_pixels):
    """(N, 3, 1, 1) BGR uint8 batch of RGB pixel values."""
    return np.asarray(rgb_pixels, np.uint8)[:, ::-1].reshape(-1, 3, 1, 1).copy()


def test_jitter_scales_and_shifts_each_stain_and_leaves_glass_alone():
    batch = _bgr_batch([[150, 90, 170], [120, 60, 140], [243, 242, 244], [255, 255, 255]])
    assert np.array_equal(hed_jitter(batch, np.random.default_rng(0), 0.0, 0.0), batch)
    rng = np.random.default_rng(3)
    out = hed_jitter(batch, rng, 0.2, 0.1)
    again = np.random.default_rng(3)
    scale, shift = again.uniform(0.8, 1.2, (4, 3)), again.uniform(-0.1, 0.1, (4, 3))
    # Tissue pixels: concentrations of the output are the input's, scaled and shifted (to rounding).
    for i in (0, 1):
        od_in = -np.log((batch[i, ::-1, 0, 0].astype(float) + 1) / 256)
        od_out = -np.log((out[i, ::-1, 0, 0].astype(float) + 1) / 256)
        expected = (od_in @ HED_FROM_RGB) * scale[i] + shift[i]
        assert np.allclose(od_out @ HED_FROM_RGB, expected, atol=0.03)
    assert np.array_equal(out[2:], batch[2:])  # glass (bright and grey) untouched
    assert np.allclose(RGB_FROM_HED @ HED_FROM_RGB, np.eye(3))


def _layer(root, augmentation, phase=caffe_pb2.TRAIN, source="DB_train_1"):
    text = (f'layer {{ name: "d" type: "Data" top: "data" top: "label" transform_param {{ mirror: true '
            f'crop_size: 8 mean_file: "DB_train_w32_1.binaryproto" }} data_param {{ source: "{root / source}" '
            f'batch_size: 16 }} }}')
    return DataLayer(parse_net_text(text).layer[0], phase, 5, lambda p: root / p, augmentation=augmentation)


def test_data_layer_jitters_the_stored_samples_before_caffes_transform(data_root, tmp_path):
    plain = _layer(data_root, None)
    jittered = _layer(data_root, Augmentation(stain_jitter=True, stain_scale_sigma=0.1))
    for batch in (0, 5):
        rows = plain.indices(batch)
        images, labels = plain.records.gather(rows)
        expected = plain.transform(hed_jitter(images, stream(5, caffe_pb2.TRAIN, batch, STREAM_STAIN), 0.1, 0.05),
                                   *plain.offsets(batch))
        got, got_labels = jittered.batch_arrays(batch)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(got, jittered.batch_arrays(batch)[0])  # a pure function of b
    assert not np.array_equal(got, plain.batch_arrays(5)[0])
    assert _layer(data_root, Augmentation(stain_jitter=True), phase=caffe_pb2.TEST).augmentation is None
    gray = write_db(tmp_path / "DB_gray", np.zeros((2, 1, 12, 12), np.uint8), [0, 1])
    text = f'layer {{ name: "d" type: "Data" top: "data" data_param {{ source: "{gray}" batch_size: 2 }} }}'
    with pytest.raises(ConfigError, match="stain jitter needs colour"):
        DataLayer(parse_net_text(text).layer[0], caffe_pb2.TRAIN, 0, lambda p: tmp_path / p,
                  augmentation=Augmentation(stain_jitter=True))
    with pytest.raises(ConfigError, match="--stain-augment-scale"):
        Augmentation(stain_jitter=True, stain_scale_sigma=1.5)


def _fold(data_root, path):
    work = path / "work"
    work.mkdir(parents=True)
    for name in ("DB_train_1", "DB_test_1", "DB_train_w32_1.binaryproto"):
        os.symlink(data_root / name, work / name)
    return make_fold(work, max_iter=8, snapshot=4, test_interval=8, display=4, test_iter=2,
                     solver_extra="augmentation_param { stain_jitter: true stain_shift_sigma: 0.1 }\n")


def _weights(path):
    return {name: [a.copy() for a in arrays] for name, arrays in net_params(read_caffemodel(path)).items()}


def test_resume_with_stain_jitter_equals_the_uninterrupted_run(data_root, tmp_path):
    solver = _fold(data_root, tmp_path / "a")
    train(solver, progress=False)
    record = json.loads((solver.parent / "train.json").read_text())["augmentation"]
    assert record["stain_jitter"] is True and record["stain_shift_sigma"] == pytest.approx(0.1)
    full = _weights(solver.parent / "1_caffenet_train_w32_iter_8.caffemodel")
    resumed = _fold(data_root, tmp_path / "b")
    for suffix in ("caffemodel", "solverstate"):
        shutil.copy(solver.parent / f"1_caffenet_train_w32_iter_4.{suffix}", resumed.parent)
    train(resumed, snapshot=resumed.parent / "1_caffenet_train_w32_iter_4.solverstate", progress=False)
    again = _weights(resumed.parent / "1_caffenet_train_w32_iter_8.caffemodel")
    for name in full:
        for a, b in zip(full[name], again[name]):
            np.testing.assert_array_equal(a, b)
    plain = _fold(data_root, tmp_path / "c")
    train(plain, progress=False, augmentation={"stain_jitter": False})
    assert not np.array_equal(_weights(plain.parent / "1_caffenet_train_w32_iter_8.caffemodel")["ip1"][0],
                              full["ip1"][0])


def test_render_and_train_options(tmp_path, runner, cli):
    from lymph_cv.formats.caffe.prototxt import read_solver
    from netutil import rendered

    plain = rendered(tmp_path / "plain")
    result = runner.invoke(cli, ["render", str(plain.solver.parent.parent), "--stain-augment",
                                 "--stain-augment-shift", "0.02"])
    assert result.exit_code == 0, result.output
    param = read_solver(plain.solver).augmentation_param
    assert param.stain_jitter and param.stain_shift_sigma == pytest.approx(0.02)
    assert param.stain_scale_sigma == pytest.approx(0.05)
    result = runner.invoke(cli, ["render", str(plain.solver.parent.parent), "--stain-augment-scale", "0.1"])
    assert result.exit_code == 2 and "need --stain-augment" in result.output + result.stderr
