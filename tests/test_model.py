"""Caffemodels and solver states: real shapes, byte-identical round trips, V1 files, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import array_to_blob
from lymph_cv.formats.caffe.model import (
    history_arrays,
    net_params,
    parse_caffemodel,
    read_caffemodel,
    read_solverstate,
    set_history,
    set_net_params,
    write_caffemodel,
    write_solverstate,
)
from lymph_cv.errors import FormatError

FOLDS = range(1, 6)
VARIANTS = ("", "dropout_")
EXPECTED_SHAPES = {
    "conv1": [(32, 3, 5, 5), (32,)],
    "conv2": [(32, 32, 5, 5), (32,)],
    "conv3": [(64, 32, 5, 5), (64,)],
    "ip1": [(64, 1024), (64,)],
    "ip2": [(3, 64), (3,)],
}
PARAMETER_COUNT = 145_123  # caffe-facts §12, 3 classes


def _model(reference, fold, variant=""):
    return reference / f"{fold}_caffenet_train_w32_{variant}iter_600000.caffemodel"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fold", FOLDS)
def test_reference_models_decode_with_real_shapes(reference, fold, variant):
    params = net_params(read_caffemodel(_model(reference, fold, variant)))
    assert {name: [a.shape for a in arrays] for name, arrays in params.items()} == EXPECTED_SHAPES
    assert sum(a.size for arrays in params.values() for a in arrays) == PARAMETER_COUNT
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for arrays in params.values() for a in arrays)


def test_caffemodel_and_solverstate_round_trip_byte_identical(reference, tmp_path):
    path = _model(reference, 1)
    net = read_caffemodel(path)
    params = net_params(net)
    set_net_params(net, params)
    write_caffemodel(tmp_path / "m.caffemodel", net)
    assert (tmp_path / "m.caffemodel").read_bytes() == path.read_bytes()

    state_path = reference / "1_caffenet_train_w32_iter_600000.solverstate"
    state = read_solverstate(state_path)
    assert state.iter == 600000 and state.current_step == 5 and len(state.history) == 10
    shapes = [a.shape for arrays in params.values() for a in arrays]
    history = history_arrays(state, shapes)
    assert [h.shape for h in history] == shapes
    set_history(state, history)
    write_solverstate(tmp_path / "s.solverstate", state)
    assert (tmp_path / "s.solverstate").read_bytes() == state_path.read_bytes()


def test_changed_values_are_written_back(reference, tmp_path):
    net = read_caffemodel(_model(reference, 2))
    params = net_params(net)
    params["ip2"][0] = params["ip2"][0] * 2
    set_net_params(net, {"ip2": params["ip2"]})
    write_caffemodel(tmp_path / "m.caffemodel", net)
    again = net_params(read_caffemodel(tmp_path / "m.caffemodel"))
    np.testing.assert_array_equal(again["ip2"][0], params["ip2"][0])
    blob = read_caffemodel(tmp_path / "m.caffemodel").layer[-2].blobs[0]
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 1, 3, 64)


def test_new_blobs_follow_the_requested_convention():
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)
    for legacy in (False, True):
        net = caffe_pb2.NetParameter(name="n")
        net.layer.add(name="ip", type="InnerProduct")
        set_net_params(net, {"ip": [weight, np.zeros(3, np.float32)]}, legacy=legacy)
        blob = net.layer[0].blobs[0]
        assert blob.HasField("num") == legacy and blob.HasField("shape") != legacy
        assert [a.shape for a in net_params(net)["ip"]] == [(3, 2), (3,)]
    with pytest.raises(FormatError, match="no layer named 'other'"):
        set_net_params(net, {"other": [weight]})


def test_v1_caffemodel_is_readable(tmp_path):
    net = caffe_pb2.NetParameter(name="old")
    conv = net.layers.add(name="conv1", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    conv.blobs.append(array_to_blob(np.ones((4, 3, 2, 2), np.float32), legacy=True))
    conv.blobs.append(array_to_blob(np.ones(4, np.float32), legacy=True))
    ip = net.layers.add(name="ip1", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    ip.blobs.append(array_to_blob(np.ones((5, 48), np.float32), legacy=True))
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(net.SerializeToString())
    params = net_params(read_caffemodel(path))
    assert [a.shape for a in params["conv1"]] == [(4, 3, 2, 2), (4,)]
    assert [a.shape for a in params["ip1"]] == [(5, 48)]


def test_bad_models_are_rejected(reference, tmp_path):
    good = _model(reference, 1).read_bytes()
    cases = {
        "truncated": good[: len(good) // 3],
        "mean": (reference / "DB_train_w32_1.binaryproto").read_bytes(),
        "empty": b"",
        "noise": bytes(range(256)) * 8,
    }
    for name, data in cases.items():
        with pytest.raises(FormatError, match="expected a Caffe model"):
            parse_caffemodel(data, name)
    both = caffe_pb2.NetParameter()
    both.layer.add(name="a")
    both.layers.add(name="b")
    with pytest.raises(FormatError, match="both"):
        parse_caffemodel(both.SerializeToString())
    bad_blob = caffe_pb2.NetParameter()
    blob = bad_blob.layer.add(name="c", type="Convolution").blobs.add(num=1, channels=1, height=1, width=2)
    blob.data.append(1.0)
    with pytest.raises(FormatError, match="layer 'c' blob 0"):
        net_params(parse_caffemodel(bad_blob.SerializeToString()))
    with pytest.raises(FormatError, match="expected a Caffe solver state"):
        read_solverstate(_model(reference, 1))
    with pytest.raises(FormatError, match="no such file"):
        read_caffemodel(tmp_path / "missing.caffemodel")
