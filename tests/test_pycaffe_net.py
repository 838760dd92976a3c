"""pycaffe as Caffe's own Python tests use it: Net backward/diffs/ranges, NetState, DummyData, Python
layers, NetSpec, coord_map, io, `import caffe` through `lymph-cv pycaffe-path` (issue 19)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

import lymph_cv.pycaffe as caffe
from lymph_cv.formats.caffe.prototxt import parse_net_text
from lymph_cv.pycaffe import layers as L
from lymph_cv.pycaffe import params as P
from lymph_cv.pycaffe.coord_map import coord_map_from_to, crop

DUMMY_NET = """name: 'testnet' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { num: 5 channels: 2 height: 3 width: 4  num: 5 channels: 1 height: 1 width: 1
    data_filler { type: 'gaussian' std: 1 } data_filler { type: 'constant' } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 4 kernel_size: 2 pad: 1
    weight_filler { type: 'gaussian' std: 1 } bias_filler { type: 'constant' value: 2 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip_blob'
  inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 0.5 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip_blob' bottom: 'label' top: 'loss' }
"""

# conv feeds two heads (Caffe would insert a Split), relu works in place, the second loss weighs 0.5
FAN_OUT_NET = """name: 'fan' force_backward: true
input: 'data' input_shape { dim: 4 dim: 2 dim: 5 dim: 5 }
input: 'label' input_shape { dim: 4 }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: 'gaussian' std: 0.5 }
    bias_filler { type: 'constant' value: 0.1 } } }
layer { type: 'ReLU' name: 'relu' bottom: 'conv' top: 'conv' }
layer { type: 'InnerProduct' name: 'a' bottom: 'conv' top: 'a'
  inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 0.5 } } }
layer { type: 'InnerProduct' name: 'b' bottom: 'conv' top: 'b'
  inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 0.5 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss_a' bottom: 'a' bottom: 'label' top: 'loss_a' }
layer { type: 'SoftmaxWithLoss' name: 'loss_b' bottom: 'b' bottom: 'label' top: 'loss_b' loss_weight: 0.5 }
"""

PYTHON_LAYERS = '''
import caffe_like_base


class Scale(caffe_like_base.Base):
    def setup(self, bottom, top):
        self.value = float(self.param_str or 10)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.value * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = self.value * top[0].diff


class Learn(caffe_like_base.Base):
    def setup(self, bottom, top):
        self.blobs.add_blob(2)
        self.blobs[0].data[...] = [3, 4]

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * self.blobs[0].data[0]

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] += (top[0].diff * bottom[0].data).sum()
        bottom[0].diff[...] = top[0].diff * self.blobs[0].data[0]


class Broken(caffe_like_base.Base):
    def setup(self, bottom, top):
        raise RuntimeError("broken on purpose")
'''


def _file(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def dummy(tmp_path):
    caffe.set_random_seed(3)
    net = caffe.Net(_file(tmp_path, DUMMY_NET), caffe.TRAIN)
    net.blobs["label"].data[...] = (np.arange(5) % 3).reshape(5, 1, 1, 1)
    return net


def test_dummy_data_net_attributes(dummy):
    assert dummy.inputs == [] and dummy.outputs == ["loss"]
    assert dummy._layer_names == ["data", "conv", "ip", "loss"] and list(dummy.layer_dict) == dummy._layer_names
    assert [layer.type for layer in dummy.layers] == ["DummyData", "Convolution", "InnerProduct", "SoftmaxWithLoss"]
    assert dummy.top_names == OrderedDict([("data", ["data", "label"]), ("conv", ["conv"]), ("ip", ["ip_blob"]),
                                           ("loss", ["loss"])])
    assert dummy.bottom_names["loss"] == ["ip_blob", "label"] and dummy.bottom_names["data"] == []
    assert dummy.blob_loss_weights["loss"] == 1.0 and dummy.blob_loss_weights["conv"] == 0.0
    assert dummy.blobs["loss"].diff == 1.0  # Caffe sets a loss top's diff to its weight at setup
    np.testing.assert_array_equal(dummy.params["conv"][1].data, 2.0)
    first = dummy.blobs["data"].data.copy()
    dummy.forward()
    assert not np.array_equal(first, dummy.blobs["data"].data)  # gaussian: drawn anew each forward
    np.testing.assert_array_equal(dummy.blobs["label"].data.ravel(), np.arange(5) % 3)  # constant: the user's values stay


def test_forward_and_backward_over_one_layer_match_numpy(dummy):
    conv, ip = dummy.blobs["conv"], dummy.blobs["ip_blob"]
    rng = np.random.default_rng(0)
    conv.data[...] = rng.uniform(size=conv.shape)
    out = dummy.forward(start="ip", end="ip")
    weight, bias = dummy.params["ip"][0].data, dummy.params["ip"][1].data
    np.testing.assert_allclose(out["ip_blob"], conv.data.reshape(5, -1) @ weight.T + bias, rtol=1e-5, atol=1e-6)
    top_diff = rng.uniform(size=ip.shape).astype(np.float32)
    ip.diff[...] = top_diff
    dummy.clear_param_diffs()
    grads = dummy.backward(start="ip", end="ip")
    assert "conv" in grads
    np.testing.assert_allclose(conv.diff, (top_diff @ weight).reshape(conv.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dummy.params["ip"][0].diff, top_diff.T @ conv.data.reshape(5, -1), rtol=1e-5)
    np.testing.assert_allclose(dummy.params["ip"][1].diff, top_diff.sum(0), rtol=1e-5)


def test_param_diffs_accumulate_until_cleared(dummy):
    dummy.forward()
    dummy.backward()
    diff = dummy.params["conv"][0].diff
    once = diff.copy()
    assert np.abs(once).max() > 0
    dummy.backward()
    np.testing.assert_allclose(diff, 2 * once, rtol=1e-5)  # the view we hold sees the accumulation
    dummy.clear_param_diffs()
    assert not diff.any()


def test_backward_sums_fan_out_and_handles_in_place_like_autograd(tmp_path):
    net = caffe.Net(_file(tmp_path, FAN_OUT_NET), caffe.TRAIN)
    rng = np.random.default_rng(1)
    data = rng.normal(size=(4, 2, 5, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 1], np.float32)
    out = net.forward(data=data, label=labels)
    grads = net.backward(diffs=["conv"])
    mine = {name: [blob.diff.copy() for blob in blobs] for name, blobs in net.params.items()}
    # the same net as one torch graph, accumulating into the (cleared) same parameter diffs
    net.clear_param_diffs()
    torch_net = net.torch_net
    x = torch.tensor(data, requires_grad=True)
    blobs = torch_net({"data": x, "label": torch.tensor(labels)})
    torch_net.loss(blobs).backward()
    np.testing.assert_allclose(out["loss_a"], blobs["loss_a"].detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(grads["data"], x.grad.numpy(), rtol=1e-4, atol=1e-6)
    for name in ("conv", "a", "b"):
        for diff, blob in zip(mine[name], net.params[name]):
            assert np.abs(diff).max() > 0
            np.testing.assert_allclose(diff, blob.diff, rtol=1e-4, atol=1e-6)


def test_levels_stages_and_phases_follow_caffe(tmp_path):
    text = """layer { name: 'data' type: 'DummyData' top: 'data' dummy_data_param { shape { dim: 1 dim: 4 } } }
layer { name: 'low' type: 'InnerProduct' bottom: 'data' top: 'low' include { max_level: 0 }
  inner_product_param { num_output: 1 } }
layer { name: 'high' type: 'InnerProduct' bottom: 'data' top: 'high' include { min_level: 1 }
  inner_product_param { num_output: 1 } }
layer { name: 'both' type: 'InnerProduct' bottom: 'data' top: 'both' include { stage: 'a' stage: 'b' }
  inner_product_param { num_output: 1 } }
layer { name: 'train' type: 'InnerProduct' bottom: 'data' top: 'train' include { phase: TRAIN }
  inner_product_param { num_output: 1 } }
"""
    path = _file(tmp_path, text)
    assert list(caffe.Net(path, caffe.TEST).blobs) == ["data", "low"]
    assert list(caffe.Net(path, caffe.TEST, level=1, stages=["a", "b"]).blobs) == ["data", "high", "both"]
    assert list(caffe.Net(path, caffe.TRAIN, stages=["a"]).blobs) == ["data", "low", "train"]


def test_save_formats_share_and_memory(dummy, tmp_path):
    model, h5 = tmp_path / "w.caffemodel", tmp_path / "w.h5"
    dummy.save(str(model))
    dummy.save_hdf5(str(h5))
    net_file = _file(tmp_path, DUMMY_NET, "again.prototxt")
    for loaded in (caffe.Net(net_file, str(model), caffe.TRAIN), caffe.Net(net_file, caffe.TRAIN, weights=str(model))):
        for name, blobs in dummy.params.items():
            for a, b in zip(blobs, loaded.params[name]):
                np.testing.assert_array_equal(a.data, b.data)
    other = caffe.Net(net_file, caffe.TEST)
    other.load_hdf5(str(h5))
    np.testing.assert_array_equal(other.params["ip"][0].data, dummy.params["ip"][0].data)
    shared = caffe.Net(net_file, caffe.TRAIN)
    shared.share_with(dummy)
    dummy.params["ip"][1].data[...] = 7
    np.testing.assert_array_equal(shared.params["ip"][1].data, 7)
    kept = [blob.data for blob in dummy.blobs.values()] + [p.diff for ps in dummy.params.values() for p in ps]
    del dummy, shared
    assert all(np.isfinite(array.sum()) for array in kept)  # views outlive the nets


def test_python_layers(tmp_path, monkeypatch):
    (tmp_path / "caffe_like_base.py").write_text("import lymph_cv.pycaffe as caffe\nBase = caffe.Layer\n")
    (tmp_path / "my_layers.py").write_text(PYTHON_LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = """name: 'py' force_backward: true input: 'data' input_shape { dim: 2 dim: 3 }
layer { type: 'Python' name: 'ten' bottom: 'data' top: 'ten' python_param { module: 'my_layers' layer: 'Scale' } }
layer { type: 'Python' name: 'two' bottom: 'ten' top: 'two'
  python_param { module: 'my_layers' layer: 'Scale' param_str: '2' } }
layer { type: 'Python' name: 'learn' bottom: 'two' top: 'out' python_param { module: 'my_layers' layer: 'Learn' } }
"""
    net = caffe.Net(_file(tmp_path, text), caffe.TRAIN)
    out = net.forward(data=np.full((2, 3), 1.5, np.float32))
    np.testing.assert_array_equal(out["out"], 1.5 * 10 * 2 * 3)
    net.blobs["out"].diff[...] = 1
    grads = net.backward()
    np.testing.assert_array_equal(grads["data"], 10 * 2 * 3)
    learn = net.layers[net._layer_names.index("learn")]
    assert learn.type == "Python" and learn.blobs[0].diff[0] == 6 * 30.0 and learn.blobs[0].data[1] == 4
    assert list(net.params) == ["learn"]
    net.save(str(tmp_path / "py.caffemodel"))
    learn.blobs[0].data[0] = -1
    net.copy_from(str(tmp_path / "py.caffemodel"))
    assert learn.blobs[0].data[0] == 3  # saved and loaded like any layer's weights, never refilled
    net.blobs["data"].reshape(4, 5)
    net.forward()
    assert all(blob.shape == (4, 5) for blob in net.blobs.values())
    broken = text.replace("layer: 'Learn'", "layer: 'Broken'")
    with pytest.raises(RuntimeError, match="broken on purpose"):
        caffe.Net(_file(tmp_path, broken, "broken.prototxt"), caffe.TEST)


def test_net_spec_writes_prototxt_our_parser_and_engine_read(tmp_path):
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[4, 1, 12, 12]), dict(dim=[4])], ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=6, weight_filler=dict(type="xavier"),
                            param=[dict(lr_mult=1), dict(lr_mult=2)])
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.relu1 = L.ReLU(n.pool1, in_place=True)
    n.ip1 = L.InnerProduct(n.relu1, num_output=3, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip1, n.label)
    n.silence = L.Silence(L.DummyData(shape=dict(dim=3)), ntop=0)
    proto = n.to_proto()
    text = str(proto)
    parsed = parse_net_text(text)
    assert [layer.name for layer in parsed.layer] == ["data", "conv1", "pool1", "relu1", "ip1", "loss",
                                                      "DummyData1", "silence"]
    assert list(parsed.layer[3].top) == ["pool1"] == list(parsed.layer[3].bottom)
    assert parsed.layer[1].convolution_param.kernel_size == [3] and parsed.layer[1].param[1].lr_mult == 2
    net = caffe.Net(_file(tmp_path, text), caffe.TRAIN)
    assert net.outputs == ["loss"] and len(net.layers) == 8
    assert np.isfinite(net.forward()["loss"])
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$"):
        L.Silence(L.DummyData(ntop=2), ntop=0)
    assert str(caffe.to_proto(L.ReLU(L.Input(shape=dict(dim=[1, 2]))))).count("layer {") == 2


def test_coord_map_and_crop():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 64, 64]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=3, pad=1)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=4, stride=4)
    n.up = L.Deconvolution(n.pool, num_output=2, kernel_size=8, stride=4, pad=0)
    axis, a, b = coord_map_from_to(n.up, n.data)
    assert axis == 1 and a == 1 and b == -2  # up's pixel x sits at data's x − 2: crop 2 off
    cropped = crop(n.up, n.data)
    assert cropped.fn.type_name == "Crop" and cropped.fn.params["crop_param"] == {"axis": 2, "offset": [2]}
    n.ip = L.InnerProduct(n.up, num_output=1)
    with pytest.raises(RuntimeError):
        coord_map_from_to(n.ip, n.data)


def test_io_blob_vectors_and_shape_errors():
    blob = caffe.io.caffe_pb2.BlobProto()
    blob.data.extend([1.0, 2.0])
    with pytest.raises(ValueError, match="shape dims"):
        caffe.io.blobproto_to_array(blob)
    scalar = caffe.io.caffe_pb2.BlobProto()
    scalar.data.append(5.0)
    assert caffe.io.blobproto_to_array(scalar) == 5.0
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((4,), np.float32)]
    back = caffe.io.blobprotovector_str_to_arraylist(caffe.io.arraylist_to_blobprotovector_str(arrays))
    assert [a.shape for a in back] == [(2, 3), (4,)] and np.array_equal(back[0], arrays[0])
    assert {"Data", "DummyData", "Python", "Silence", "Input"} <= set(caffe.layer_type_list())
    assert caffe.solver_count() >= 1 and 0 <= caffe.solver_rank() < caffe.solver_count() and not caffe.has_nccl()


def test_import_caffe_through_pycaffe_path(tmp_path, runner, cli):
    result = runner.invoke(cli, ["pycaffe-path"])
    assert result.exit_code == 0, result.stderr
    folder = result.stdout.strip()
    assert os.path.isfile(os.path.join(folder, "caffe", "__init__.py"))
    script = tmp_path / "legacy.py"
    script.write_text("import caffe, caffe.io\nfrom caffe.proto import caffe_pb2\nfrom caffe import layers as L\n"
                      "import caffe.net_spec, caffe.coord_map\n"
                      "assert caffe.io.caffe_pb2 is caffe_pb2 and caffe.NetSpec is caffe.net_spec.NetSpec\n"
                      "print(caffe.TRAIN, caffe.TEST, type(caffe.SGDSolver).__name__, L.ReLU.__name__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder] + sys.path)}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", "1", "type", "make"]


def test_reshape_forward_backward_all_and_propagate_down(tmp_path):
    text = FAN_OUT_NET.replace("bottom: 'b' bottom: 'label' top: 'loss_b'",
                               "bottom: 'b' bottom: 'label' top: 'loss_b' propagate_down: false propagate_down: false")
    net = caffe.Net(_file(tmp_path, text), caffe.TRAIN)
    rng = np.random.default_rng(2)
    data = rng.normal(size=(6, 2, 5, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0, 2], np.float32)
    outs, diffs = net.forward_backward_all(data=data, label=labels)
    assert outs["loss_a"].shape == (2,) and diffs["data"].shape == (6, 2, 5, 5)  # 2 batches of 4, padding cut
    assert np.abs(net.blobs["a"].diff).max() > 0 and not net.blobs["b"].diff.any()  # loss_b sends nothing down
    net.blobs["data"].reshape(2, 2, 5, 5)
    net.blobs["label"].reshape(2)
    net.reshape()
    assert net.blobs["conv"].shape == (2, 3, 3, 3) and net.blobs["a"].shape == (2, 3)



def test_host_copies_for_device_weights_sync_around_each_computation(dummy):
    """What CUDA nets do (their weights live on the device), run here on CPU parameters."""
    from lymph_cv.net.blobs import TensorBlob

    weight = TensorBlob(dummy.params["ip"][0].param, mirrored=True)
    bias = TensorBlob(dummy.params["ip"][1].param, mirrored=True)
    assert weight.data is not dummy.params["ip"][0].data and np.array_equal(weight.data, dummy.params["ip"][0].data)
    weight.data[...] = 0  # only the host copy so far
    assert dummy.params["ip"][0].data.any()
    bias.data[...] = [1, 2, 3]
    out = dummy.forward(end="ip")  # pushed before the layers run
    np.testing.assert_array_equal(out["ip_blob"], np.tile([1.0, 2.0, 3.0], (5, 1)))
    assert not dummy.params["ip"][0].data.any()
    dummy.backward()
    assert np.abs(weight.diff).max() > 0  # pulled after
    np.testing.assert_array_equal(weight.diff, dummy.params["ip"][0].diff)
    dummy.clear_param_diffs()
    assert not weight.diff.any()
