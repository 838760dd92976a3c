"""The PyTorch port: shapes, Caffe's pooling/loss/accuracy semantics, fillers, weights I/O."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from numpy.lib.stride_tricks import sliding_window_view

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import read_mean
from lymph_cv.formats.caffe.model import read_caffemodel
from lymph_cv.formats.caffe.prototxt import parse_net_text, read_net_prototxt
from lymph_cv.errors import ConfigError, FormatError, InputError, UnsupportedError
from lymph_cv.net.build import build_net
from lymph_cv.net.fillers import fill
from lymph_cv.net.layers import pooled_size, supported_types
from netutil import CLASSES, rendered

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
INPUT_SHAPES = {"data": (4, 3, 32, 32), "label": (4,)}


# ----------------------------------------------------------------------------- numpy references


def np_pool(x, kernel, stride, pad, method):
    """Caffe's pooling loops (pooling_layer.cpp) in float64, ceil output size."""
    n, c, height, width = x.shape
    out_h, out_w = (pooled_size(s, kernel, stride, pad) for s in (height, width))
    out = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            h0, w0 = i * stride - pad, j * stride - pad
            h1, w1 = min(h0 + kernel, height + pad), min(w0 + kernel, width + pad)
            pool_size = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, height), min(w1, width)
            window = x[:, :, h0:h1, w0:w1]
            if method == "MAX":
                out[:, :, i, j] = window.max(axis=(2, 3))
            else:
                out[:, :, i, j] = window.sum(axis=(2, 3)) / pool_size
    return out


def np_conv(x, weight, bias, pad):
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(padded, weight.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", windows, weight) + bias[None, :, None, None]


def np_deploy_forward(x, params, dropout):
    """The tutorial's 32w deploy net in float64 numpy (ReLU after pool1, as published)."""
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    p = {name: [np.asarray(b, np.float64) for b in blobs] for name, blobs in params.items()}
    conv1 = np_conv(x, p["conv1"][0], p["conv1"][1].ravel(), 2)
    pool1 = relu(np_pool(conv1, 3, 2, 0, "MAX"))
    pool2 = np_pool(relu(np_conv(pool1, p["conv2"][0], p["conv2"][1].ravel(), 2)), 3, 2, 0, "AVE")
    pool3 = np_pool(relu(np_conv(pool2, p["conv3"][0], p["conv3"][1].ravel(), 2)), 3, 2, 0, "AVE")
    ip1 = pool3.reshape(len(x), -1) @ p["ip1"][0].reshape(64, -1).T + p["ip1"][1].ravel()
    if dropout:
        ip1 = relu(ip1)
    ip2 = ip1 @ p["ip2"][0].reshape(CLASSES, -1).T + p["ip2"][1].ravel()
    if dropout:
        ip2 = relu(ip2)
    e = np.exp(ip2 - ip2.max(axis=1, keepdims=True))
    return ip2, e / e.sum(axis=1, keepdims=True)


def _net(text, phase=TEST, **kw):
    return build_net(parse_net_text(text), phase, **kw)


# ----------------------------------------------------------------------------- shapes and models


@pytest.mark.parametrize("legacy_v1", [False, True], ids=["v2", "v1"])
def test_layer_output_sizes_for_32x32(tmp_path, legacy_v1):
    files = rendered(tmp_path, legacy_v1=legacy_v1)
    deploy = build_net(read_net_prototxt(files.deploy), TEST)
    shapes = deploy.blob_shapes
    assert shapes["conv1"] == (10, 32, 32, 32)
    assert [shapes[name][2:] for name in ("pool1", "pool2", "pool3")] == [(16, 16), (8, 8), (4, 4)]
    assert shapes["ip1"] == (10, 64) and shapes["prob"] == (10, CLASSES)
    assert deploy.layer("ip1").blobs[0].shape == (64, 64 * 4 * 4)
    train = build_net(read_net_prototxt(files.net), TRAIN, input_shapes=INPUT_SHAPES)
    assert train.output_blobs == ["loss"] and train.loss_weights == {"loss": 1.0}
    assert [(e.layer, e.index, e.lr_mult, e.decay_mult) for e in train.learnable] == [
        (name, index, float(index + 1), 1.0) for name in ("conv1", "conv2", "conv3", "ip1", "ip2") for index in (0, 1)]
    test = build_net(read_net_prototxt(files.net), TEST, input_shapes=INPUT_SHAPES)
    assert test.output_blobs == ["accuracy", "loss"] and test.input_blobs == ["data", "label"]
    assert [layer.name for layer in test.data_layers] == ["cifar_test"]


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_published_fold1_models_match_numpy_reference(tmp_path, reference, dropout):
    files = rendered(tmp_path, dropout=dropout)
    net = build_net(read_net_prototxt(files.deploy), TEST)
    suffix = "_dropout" if dropout else ""
    model = read_caffemodel(reference / f"1_caffenet_train_w32{suffix}_iter_600000.caffemodel")
    assert net.load_weights(model) == ["conv1", "conv2", "conv3", "ip1", "ip2"]
    mean = read_mean(reference / "DB_train_w32_1.binaryproto")
    rng = np.random.default_rng(1)
    patches = rng.integers(0, 256, size=(10, 3, 36, 36)).astype(np.float32)
    x = (patches - mean)[:, :, 2:34, 2:34]  # Caffe's TEST transform: centre crop of (x - mean)
    blobs = net({"data": torch.from_numpy(np.ascontiguousarray(x))})
    params = {layer.name: [b.detach().numpy() for b in layer.blobs] for layer in net.layers if len(layer.blobs)}
    ip2, prob = np_deploy_forward(x.astype(np.float64), params, dropout)
    scale = np.abs(ip2).max()
    np.testing.assert_allclose(blobs["ip2"].detach().numpy(), ip2, rtol=0, atol=1e-5 * max(1.0, scale))
    np.testing.assert_allclose(blobs["prob"].detach().numpy(), prob, rtol=0, atol=1e-5)


def test_load_weights_checks_shapes_and_export_roundtrips(tmp_path, reference):
    files = rendered(tmp_path, overrides={"num_classes": "2"})
    net = build_net(read_net_prototxt(files.deploy), TEST)
    model = read_caffemodel(reference / "1_caffenet_train_w32_iter_600000.caffemodel")
    with pytest.raises(FormatError, match=r"layer 'ip2' blob 0: the model has shape \(1, 1, 3, 64\), "
                                          r"the net expects \(2, 64\)"):
        net.load_weights(model)
    net.init_params(torch.Generator().manual_seed(3))
    exported = net.export_weights()
    conv1 = [layer for layer in exported.layer if layer.name == "conv1"][0]
    assert [(b.num, b.channels, b.height, b.width) for b in conv1.blobs] == [(32, 3, 5, 5), (1, 1, 1, 32)]
    assert not conv1.blobs[0].HasField("shape")
    modern = net.export_weights(legacy_dims=False)
    assert list(modern.layer[0].blobs[1].shape.dim) == [32]
    again = build_net(read_net_prototxt(files.deploy), TEST)
    reparsed = caffe_pb2.NetParameter.FromString(exported.SerializeToString())
    again.load_weights(reparsed)
    for a, b in zip(net.learnable, again.learnable):
        assert torch.equal(a.param, b.param)


def test_export_records_loss_weight_and_layer_params(tmp_path):
    files = rendered(tmp_path)
    net = build_net(read_net_prototxt(files.net), TRAIN, input_shapes=INPUT_SHAPES)
    exported = net.export_weights()
    assert [layer.name for layer in exported.layer][0] == "cifar_train"
    loss = exported.layer[-1]
    assert loss.type == "SoftmaxWithLoss" and list(loss.loss_weight) == [1.0]
    assert exported.layer[0].transform_param.mirror and not len(exported.layer[0].blobs)


def test_share_weights_and_dropout_phases(tmp_path):
    files = rendered(tmp_path, dropout=True)
    param = read_net_prototxt(files.net)
    train = build_net(param, TRAIN, input_shapes=INPUT_SHAPES)
    test = build_net(param, TEST, input_shapes=INPUT_SHAPES)
    train.init_params(torch.Generator().manual_seed(0))
    test.share_weights_from(train)
    assert all(a.param is b.param for a, b in zip(train.learnable, test.learnable))
    inputs = {"data": torch.randn(4, 3, 32, 32) * 50, "label": torch.tensor([0.0, 1, 2, 1])}
    once, twice = test(inputs), test(inputs)
    assert torch.equal(once["ip2"], twice["ip2"])  # dropout is the identity in TEST
    drop = train.layer("drop4")
    x = torch.ones(1000, 64)
    y = drop(x)[0]
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0} and 0.4 < (y > 0).float().mean() < 0.6


def test_data_layer_shape_from_database(tmp_path):
    from trainutil import make_dataset

    make_dataset(tmp_path, n_train=4, n_test=4)
    fold = tmp_path / "1"
    fold.mkdir()
    text = (f'name: "n" layer {{ name: "d" type: "Data" top: "data" top: "label" '
            f'transform_param {{ crop_size: 8 }} data_param {{ source: "../DB_train_1" batch_size: 5 }} }}')
    net = _net(text, TRAIN, base_dir=fold)
    assert net.blob_shapes == {"data": (5, 3, 8, 8), "label": (5,)}
    with pytest.raises(ConfigError, match="data source not found"):
        _net(text.replace("DB_train_1", "DB_missing"), TRAIN, base_dir=fold)


# ----------------------------------------------------------------------------- layer semantics

POOL_NET = """name: "p" input: "data" input_dim: 2 input_dim: 3 input_dim: {size} input_dim: {size}
layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"
  pooling_param {{ pool: {method} kernel_size: {kernel} stride: {stride} pad: {pad} }} }}"""


@pytest.mark.parametrize("size, kernel, stride, pad", [(32, 3, 2, 0), (7, 3, 2, 0), (8, 3, 2, 0), (6, 3, 2, 1),
                                                       (5, 2, 2, 1), (9, 4, 3, 2)])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_matches_caffe_loops(size, kernel, stride, pad, method):
    net = _net(POOL_NET.format(size=size, kernel=kernel, stride=stride, pad=pad, method=method))
    x = np.random.default_rng(size).normal(size=(2, 3, size, size))
    out = net({"data": torch.from_numpy(x.astype(np.float32))})["pool"].numpy()
    expected = np_pool(x, kernel, stride, pad, method)
    assert net.blob_shapes["pool"] == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_ave_pool_border_divisors():
    net = _net(POOL_NET.format(size=32, kernel=3, stride=2, pad=0, method="AVE"))
    out = net({"data": torch.ones(2, 3, 32, 32)})["pool"][0, 0]
    assert out.shape == (16, 16) and torch.allclose(out, torch.ones(16, 16))  # in-image divisors
    x = torch.zeros(1, 3, 32, 32)
    x[..., 31, 31] = 36.0
    corner = net({"data": torch.cat([x, x])})["pool"][0, 0, 15, 15]
    assert corner.item() == pytest.approx(36.0 / 4)  # 2x2 corner window, not 3x3
    assert pooled_size(5, 2, 2, 1) == 3  # the last window must start inside image + pad


def test_softmax_loss_and_accuracy_semantics():
    text = """name: "l" input: "s" input_dim: 4 input_dim: 3 input_dim: 1 input_dim: 1
    input: "y" input_dim: 4 input_dim: 1 input_dim: 1 input_dim: 1
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "y" top: "loss" }
    layer { name: "acc" type: "Accuracy" bottom: "s" bottom: "y" top: "acc" }
    layer { name: "acc2" type: "Accuracy" bottom: "s" bottom: "y" top: "acc2" accuracy_param { top_k: 2 } }
    layer { name: "ign" type: "SoftmaxWithLoss" bottom: "s" bottom: "y" top: "ign" loss_weight: 0.5
            loss_param { ignore_label: 2 normalization: BATCH_SIZE } }"""
    scores = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 0.0], [5.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).reshape(4, 3, 1, 1)
    labels = torch.tensor([2.0, 0.0, 1.0, 2.0]).reshape(4, 1, 1, 1)
    s = scores.reshape(4, 3).double()
    log_p = s - torch.logsumexp(s, dim=1, keepdim=True)
    nll = -log_p[torch.arange(4), labels.reshape(4).long()]
    for ties, accuracy in (("higher_index", 2 / 4), ("wrong", 1 / 4)):
        net = _net(text, accuracy_ties=ties)
        out = net({"s": scores, "y": labels})
        assert out["loss"].item() == pytest.approx(nll.mean().item(), rel=1e-6)
        # sample 1 ties class 0 with class 1; sample 3 ties all three classes
        assert out["acc"].item() == pytest.approx(accuracy)
        assert out["ign"].item() == pytest.approx((nll[1] + nll[2]).item() / 4, rel=1e-6)
    assert net.loss_weights == {"loss": 1.0, "ign": 0.5} and net.output_blobs == ["acc", "acc2", "ign", "loss"]
    assert out["acc2"].item() == pytest.approx(2 / 4)
    with pytest.raises(InputError, match=r"labels must be in 0..2 for 3 classes, got 1..3"):
        net({"s": scores, "y": labels + 1})


def test_lrn_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 7, 5, 5))
    base = 'name: "n" input: "x" input_dim: 2 input_dim: 7 input_dim: 5 input_dim: 5 '
    across = _net(base + 'layer { name: "a" type: "LRN" bottom: "x" top: "a" '
                  'lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 k: 2 } }')
    within = _net(base + 'layer { name: "w" type: "LRN" bottom: "x" top: "w" '
                  'lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 norm_region: WITHIN_CHANNEL } }')
    padded = np.pad(x ** 2, ((0, 0), (2, 2), (0, 0), (0, 0)))
    scale = 2 + 0.1 / 5 * sliding_window_view(padded, 5, axis=1).sum(-1)
    got = across({"x": torch.from_numpy(x.astype(np.float32))})["a"].numpy()
    np.testing.assert_allclose(got, x * scale ** -0.75, rtol=1e-5, atol=1e-6)
    mean_sq = np_pool(np.pad(x ** 2, ((0, 0), (0, 0), (1, 1), (1, 1))), 3, 1, 0, "AVE")
    got = within({"x": torch.from_numpy(x.astype(np.float32))})["w"].numpy()
    np.testing.assert_allclose(got, x * (1 + 0.1 * mean_sq) ** -0.75, rtol=1e-5, atol=1e-6)


def test_inner_product_axis_and_transpose():
    text = """name: "n" input: "x" input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 5
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
            inner_product_param { num_output: 6 axis: 2 transpose: true bias_term: false } }"""
    net = _net(text)
    net.init_params(torch.Generator().manual_seed(0))
    weight = net.layer("ip").blobs[0]
    assert weight.shape == (20, 6) and len(net.layer("ip").blobs) == 1
    x = torch.randn(2, 3, 4, 5)
    y = net({"x": x})["y"]
    assert y.shape == (2, 3, 6)
    assert torch.allclose(y, x.reshape(2, 3, 20) @ weight, atol=1e-6)


# ----------------------------------------------------------------------------- fillers


def _filler(text):
    return text_format.Parse(text, caffe_pb2.FillerParameter())


def test_filler_statistics():
    gen = torch.Generator().manual_seed(0)
    t = torch.empty(200, 50, 3, 3)  # fan_in 450, fan_out 1800
    fill(t, _filler('type: "gaussian" std: 0.01 mean: 0.5'), gen)
    assert t.mean().item() == pytest.approx(0.5, abs=1e-3) and t.std().item() == pytest.approx(0.01, rel=0.02)
    fill(t, _filler('type: "xavier"'), gen)
    bound = math.sqrt(3 / 450)
    assert t.abs().max().item() <= bound and t.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    fill(t, _filler('type: "msra" variance_norm: FAN_OUT'), gen)
    assert t.std().item() == pytest.approx(math.sqrt(2 / 1800), rel=0.02)
    fill(t, _filler('type: "xavier" variance_norm: AVERAGE'), gen)
    assert t.abs().max().item() <= math.sqrt(3 / 1125)
    fill(t, _filler('type: "uniform" min: -2 max: 3'), gen)
    assert -2 <= t.min().item() < -1.9 and 2.9 < t.max().item() <= 3
    fill(t, _filler('type: "gaussian" sparse: 50'), gen)
    assert (t != 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    fill(t, _filler('type: "constant" value: 0.2'), gen)
    assert torch.all(t == 0.2)
    fill(t, None, gen)
    assert torch.all(t == 0)
    with pytest.raises(UnsupportedError, match="valid: bilinear, constant, gaussian"):
        fill(t, _filler('type: "orthogonal"'), gen)


def test_init_params_deterministic_and_published_fillers(tmp_path):
    files = rendered(tmp_path)
    param = read_net_prototxt(files.net)
    nets = [build_net(param, TRAIN, input_shapes=INPUT_SHAPES) for _ in range(2)]
    for net in nets:
        net.init_params(torch.Generator().manual_seed(7))
    assert all(torch.equal(a.param, b.param) for a, b in zip(*(n.learnable for n in nets)))
    stds = {e.layer: e.param.std().item() for e in nets[0].learnable if e.index == 0}
    assert stds["conv1"] == pytest.approx(1e-4, rel=0.1) and stds["ip1"] == pytest.approx(0.1, rel=0.05)
    assert all(torch.all(e.param == 0) for e in nets[0].learnable if e.index == 1)


# ----------------------------------------------------------------------------- errors


def test_unknown_or_unsupported_layers_list_valid_values():
    base = 'name: "n" input: "x" input_dim: 1 input_dim: 1 input_dim: 8 input_dim: 8 '
    with pytest.raises(UnsupportedError) as info:
        _net(base + 'layer { name: "q" type: "Deconvolution" bottom: "x" top: "y" }')
    message = str(info.value)
    assert "unsupported layer type 'Deconvolution'" in message
    assert f"valid: {', '.join(supported_types())})" in message
    assert {"Accuracy", "Convolution", "Data", "InnerProduct", "Input", "Pooling", "SoftmaxWithLoss"} <= set(supported_types())
    with pytest.raises(UnsupportedError, match="pool method STOCHASTIC.*valid: MAX, AVE"):
        _net(base + 'layer { name: "p" type: "Pooling" bottom: "x" top: "y" '
                    'pooling_param { pool: STOCHASTIC kernel_size: 2 } }')
    with pytest.raises(ConfigError, match="unknown bottom blob 'nope'"):
        _net(base + 'layer { name: "r" type: "ReLU" bottom: "nope" top: "y" }')
    with pytest.raises(ConfigError, match="missing input blob"):
        _net(base + 'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }')({})


def test_input_layer_and_v1_caffemodel(tmp_path):
    files = rendered(tmp_path)
    deploy = read_net_prototxt(files.deploy)
    modern = caffe_pb2.NetParameter()
    modern.CopyFrom(deploy)
    for field in ("input", "input_dim"):
        modern.ClearField(field)
    data = caffe_pb2.LayerParameter(name="data", type="Input", top=["data"])
    data.input_param.shape.add().dim.extend([2, 3, 32, 32])
    del modern.layer[:]
    modern.layer.extend([data] + list(deploy.layer))
    net = build_net(modern, TEST)
    assert net.input_blobs == ["data"] and net.blob_shapes["pool3"] == (2, 64, 4, 4)
    source = build_net(deploy, TEST)
    source.init_params(torch.Generator().manual_seed(1))
    v1 = caffe_pb2.NetParameter()
    for layer in source.export_weights().layer:
        v1.layers.add(name=layer.name, blobs=layer.blobs)
    net.load_weights(caffe_pb2.NetParameter.FromString(v1.SerializeToString()))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net({"data": x})["prob"], source({"data": x})["prob"])


def test_grouped_dilated_convolution_matches_numpy():
    text = """name: "n" input: "x" input_dim: 2 input_dim: 4 input_dim: 9 input_dim: 9
    layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 6
            kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 2 group: 2 weight_filler { type: "xavier" }
            bias_filler { type: "uniform" } } }"""
    net = _net(text)
    net.init_params(torch.Generator().manual_seed(0))
    weight, bias = (b.detach().numpy().astype(np.float64) for b in net.layer("c").blobs)
    assert weight.shape == (6, 2, 3, 2)
    x = np.random.default_rng(0).normal(size=(2, 4, 9, 9))
    dilated = np.zeros((6, 2, 5, 3))
    dilated[:, :, ::2, ::2] = weight
    halves = [np_conv(x[:, 2 * g:2 * g + 2], dilated[3 * g:3 * g + 3], bias[3 * g:3 * g + 3], 1)[:, :, ::2, ::2]
              for g in range(2)]
    out = net({"x": torch.from_numpy(x.astype(np.float32))})["y"].detach().numpy()
    assert net.blob_shapes["y"] == (2, 6, 4, 5)
    np.testing.assert_allclose(out, np.concatenate(halves, axis=1), rtol=1e-5, atol=1e-5)


def test_conv_relu_post_op_is_bitwise_the_layers(tmp_path, reference):
    """Without autograd a ReLU in place on a convolution's top is oneDNN's post-op of it: the same
    bits as the two layers (channels-last or not, 1x1 kernels, batches below the fused minimum)."""
    from lymph_cv.net.fuse import MIN_FUSED_BATCH

    text = """name: "n" input: "x" input_dim: 16 input_dim: 3 input_dim: 12 input_dim: 12
    layer { name: "a" type: "Convolution" bottom: "x" top: "a" convolution_param { num_output: 8 kernel_size: 5
            pad: 2 weight_filler { type: "xavier" } bias_filler { type: "uniform" } } }
    layer { name: "ra" type: "ReLU" bottom: "a" top: "a" }
    layer { name: "b" type: "Convolution" bottom: "a" top: "b" convolution_param { num_output: 4 kernel_size: 1
            bias_term: false weight_filler { type: "xavier" } } }
    layer { name: "rb" type: "ReLU" bottom: "b" top: "b" }
    layer { name: "c" type: "Convolution" bottom: "b" top: "c" convolution_param { num_output: 4 kernel_size: 3
            weight_filler { type: "xavier" } } }
    layer { name: "rc" type: "ReLU" bottom: "c" top: "r" }"""
    net = _net(text)
    assert net._relus == {0: 1, 2: 3}  # not the ReLU that writes another blob
    net.init_params(torch.Generator().manual_seed(0))
    published = build_net(read_net_prototxt(rendered(tmp_path).deploy), TEST)
    published.load_weights(read_caffemodel(reference / "1_caffenet_train_w32_iter_600000.caffemodel"))
    assert sorted(published._relus) == [3, 6]  # conv2 and conv3; relu1 follows pool1
    generator = torch.Generator().manual_seed(1)
    for model, name, blob, shape, scale in ((net, "x", "r", (3, 12, 12), 1.0), (published, "data", "prob", (3, 32, 32), 60.0)):
        for batch in (MIN_FUSED_BATCH - 1, MIN_FUSED_BATCH, 40):
            for channels_last in (True, False):
                x = torch.randn((batch,) + shape, generator=generator) * scale
                model.channels_last = channels_last
                with torch.inference_mode():
                    model.fuse_layers = True
                    fused = model({name: x})
                    model.fuse_layers = False
                    plain = model({name: x})
                assert torch.equal(fused[blob], plain[blob]), (blob, batch, channels_last)
    x = torch.randn((MIN_FUSED_BATCH, 3, 12, 12), generator=generator)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: F.conv2d's way
        net.fuse_layers = True
        fused = net({"x": x})["r"]
        net.fuse_layers = False
        assert fused.dtype == torch.bfloat16 and torch.equal(fused, net({"x": x})["r"])


@pytest.mark.parametrize("mode, divisor", [("FULL", 8), ("VALID", 6), ("BATCH_SIZE", 2), ("NONE", 1)])
def test_softmax_loss_normalization_over_positions(mode, divisor):
    text = f"""name: "l" input: "s" input_dim: 2 input_dim: 3 input_dim: 2 input_dim: 2
    input: "y" input_dim: 2 input_dim: 1 input_dim: 2 input_dim: 2
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "y" top: "loss" top: "prob"
            loss_param {{ ignore_label: 1 normalization: {mode} }} }}"""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 3, 2, 2))
    labels = np.array([0, 1, 2, 2, 1, 0, 0, 2], dtype=np.float64).reshape(2, 1, 2, 2)
    out = _net(text)({"s": torch.from_numpy(scores.astype(np.float32)),
                      "y": torch.from_numpy(labels.astype(np.float32))})
    p = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    picked = np.take_along_axis(p, labels.astype(int), axis=1)
    expected = -np.log(picked[labels != 1]).sum() / divisor
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(out["prob"].numpy(), p, rtol=1e-5)


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_export_reproduces_published_caffemodel_bytes(tmp_path, reference, dropout):
    """Our V1 template + the published weights, snapshotted, is the published file byte for byte
    (once the data layers carry the author's absolute paths)."""
    files = rendered(tmp_path, dropout=dropout, legacy_v1=True)
    param = read_net_prototxt(files.net)
    author = "/home/axj232/code/lymphoma/"
    for layer in param.layer:
        if layer.type == "Data":
            layer.data_param.source = author + layer.data_param.source.removeprefix("../")
            layer.transform_param.mean_file = author + layer.transform_param.mean_file.removeprefix("../")
    published = reference / f"1_caffenet_train_w32{'_dropout' if dropout else ''}_iter_600000.caffemodel"
    net = build_net(param, TRAIN, input_shapes=INPUT_SHAPES)
    net.load_weights(read_caffemodel(published))
    assert net.export_weights().SerializeToString() == published.read_bytes()
