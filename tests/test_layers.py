"""Post-2015 layer types against float64 numpy references, forward and backward (Caffe's semantics)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lymph_cv.errors import ConfigError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.prototxt import parse_net_text
from lymph_cv.net.build import build_net
from lymph_cv.net.solver import learnables_of, make_solver

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
TOL = dict(rtol=1e-5, atol=1e-5)


def _net(inputs, layers, phase=TEST):
    """A net of ``layers`` (prototxt text) over declared inputs name → shape."""
    text = 'name: "t"\n' + "".join(
        f'input: "{name}" input_shape {{ {" ".join(f"dim: {d}" for d in shape)} }}\n'
        for name, shape in inputs.items()) + layers
    return build_net(parse_net_text(text), phase)


def _run(net, arrays, top, seed=0):
    """Forward ``arrays`` (float64 numpy) and backward a random upstream gradient of ``top``.

    Returns (top value, upstream dy, gradient per input, gradient per learnable blob) as float64.
    """
    inputs = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in arrays.items()}
    blobs = net.forward(inputs)
    y = blobs[top]
    dy = np.random.default_rng(seed).standard_normal(tuple(y.shape))
    (y * torch.tensor(dy, dtype=torch.float32)).sum().backward()
    grads = {k: t.grad.double().numpy() if t.grad is not None else None for k, t in inputs.items()}
    params = {f"{e.layer}[{e.index}]": (e.param.grad.double().numpy() if e.param.grad is not None else None)
              for e in net.learnable}
    return y.detach().double().numpy(), dy, grads, params


def _rand(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def _set(net, layer, index, values):
    with torch.no_grad():
        net.layer(layer).blobs[index].copy_(torch.tensor(np.asarray(values), dtype=torch.float32))


# ----------------------------------------------------------------------------- BatchNorm


BN = 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }\n'
WORKED = np.array([[[[1, 2]], [[0, 0]]], [[[3, 6]], [[4, 8]]]], dtype=np.float64)  # N=2 C=2 H=1 W=2


def test_batchnorm_worked_example_train_blobs_and_test():
    net = _net({"x": (2, 2, 1, 2)}, BN, TRAIN)
    y, *_ = _run(net, {"x": WORKED}, "x")
    np.testing.assert_allclose(y[:, 0].ravel(), [-1.069043, -0.534522, 0, 1.603565], atol=1e-5)
    blobs = [b.detach().numpy() for b in net.layer("bn").blobs]
    np.testing.assert_allclose(blobs[0], [3, 3], atol=1e-6)
    np.testing.assert_allclose(blobs[1], [4.666667, 14.666667], atol=1e-5)
    np.testing.assert_allclose(blobs[2], [1])
    net.forward({"x": torch.tensor(WORKED, dtype=torch.float32)})  # a forward-only call updates too
    blobs = [b.detach().numpy() for b in net.layer("bn").blobs]
    np.testing.assert_allclose(blobs[0], [5.997, 5.997], atol=1e-5)
    np.testing.assert_allclose(blobs[1], [9.328667, 29.318668], atol=1e-4)
    np.testing.assert_allclose(blobs[2], [1.999], atol=1e-6)
    # A TEST net from the first forward's statistics (mean 3, var 4.666667).
    test = _net({"x": (2, 2, 1, 2)}, BN, TEST)
    for i, v in enumerate(([3, 3], [4.666667, 14.666667], [1])):
        _set(test, "bn", i, v)
    y, *_ = _run(test, {"x": WORKED}, "x")
    np.testing.assert_allclose(y[:, 0].ravel(), [-0.925819, -0.462909, 0, 1.388729], atol=1e-5)
    fresh = _net({"x": (2, 2, 1, 2)}, BN, TEST)  # s = 0: mean and variance taken as 0
    y, *_ = _run(fresh, {"x": WORKED}, "x")
    np.testing.assert_allclose(y, WORKED * 316.2278, rtol=1e-5)


def test_batchnorm_backward_batch_and_global_modes():
    x = _rand(4, 3, 5, 5) * 2 + 1
    eps = 1e-5
    net = _net({"x": x.shape}, 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }', TRAIN)
    y, dy, grads, _ = _run(net, {"x": x}, "y")
    mu = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    np.testing.assert_allclose(y, xhat, **TOL)
    m = x.size / x.shape[1]
    dx = (dy - dy.mean(axis=(0, 2, 3), keepdims=True)
          - xhat * (dy * xhat).mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(var + eps)
    np.testing.assert_allclose(grads["x"], dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.layer("bn").blobs[1].detach().numpy(), var.ravel() * m / (m - 1), rtol=1e-5)
    # Global statistics (use_global_stats forced in TRAIN): dx = dy / sqrt(var + eps).
    glob = _net({"x": x.shape}, 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                                'batch_norm_param { use_global_stats: true eps: 0.001 } }', TRAIN)
    stats = [np.array([0.5, -1.0, 2.0]) * 2, np.array([1.0, 4.0, 0.25]) * 2, [2.0]]
    for i, v in enumerate(stats):
        _set(glob, "bn", i, v)
    y, dy, grads, _ = _run(glob, {"x": x}, "y")
    mean, var = stats[0][None, :, None, None] / 2, stats[1][None, :, None, None] / 2
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), **TOL)
    np.testing.assert_allclose(grads["x"], dy / np.sqrt(var + 1e-3), **TOL)
    assert [b.detach().numpy().tolist() for b in glob.layer("bn").blobs][2] == [2.0]  # no update


def test_batchnorm_blobs_over_iterations_and_never_learned():
    """Moving averages over several SGD iterations equal the closed form; the solver leaves them alone."""
    text = ('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { '
            'moving_average_fraction: 0.9 } }\n'
            'layer { name: "sc" type: "Scale" bottom: "y" top: "y" scale_param { bias_term: true } }\n'
            'layer { name: "loss" type: "EuclideanLossless" bottom: "y" top: "y" }\n')
    net = _net({"x": (3, 2, 2, 2)}, text.split("layer { name: \"loss\"")[0], TRAIN)
    specs = net.layer("bn").param.param
    assert [s.lr_mult for s in specs] == [0, 0, 0]
    assert [e.lr_mult for e in net.learnable] == [0, 0, 0, 1, 1]
    solver = make_solver(caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", momentum=0.9,
                                                   weight_decay=0.1, type="SGD"), learnables_of(net))
    lam, s, b0, b1 = 0.9, 0.0, np.zeros(2), np.zeros(2)
    for it in range(4):
        x = _rand(3, 2, 2, 2, seed=it) * (it + 1)
        blobs = net.forward({"x": torch.tensor(x, dtype=torch.float32)})
        (blobs["y"] ** 2).sum().backward()
        solver.apply_update()
        solver.zero_grad()
        m = x.size / 2
        s, b0 = lam * s + 1, lam * b0 + x.mean(axis=(0, 2, 3))
        b1 = lam * b1 + x.var(axis=(0, 2, 3)) * m / (m - 1)
    got = [b.detach().numpy() for b in net.layer("bn").blobs]
    np.testing.assert_allclose(got[0], b0, rtol=1e-5)
    np.testing.assert_allclose(got[1], b1, rtol=1e-5)
    np.testing.assert_allclose(got[2], [s], rtol=1e-6)
    exported = net.export_weights().layer[0]
    assert [p.lr_mult for p in exported.param] == [0, 0, 0] and len(exported.blobs) == 3


def test_batchnorm_refuses_learned_statistics():
    with pytest.raises(ConfigError, match="Cannot configure batch normalization statistics"):
        _net({"x": (2, 2, 2, 2)}, 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" '
                                  'param { lr_mult: 1 } }')


# ----------------------------------------------------------------------------- Scale, Bias


def test_scale_learned_with_bias_and_axes():
    x = _rand(2, 3, 4, 5)
    net = _net({"x": x.shape}, 'layer { name: "s" type: "Scale" bottom: "x" top: "y" '
                               'scale_param { axis: 1 num_axes: 2 bias_term: true } }')
    layer = net.layer("s")
    assert [tuple(b.shape) for b in layer.blobs] == [(3, 4), (3, 4)]
    net.init_params()
    assert layer.blobs[0].detach().numpy().tolist() == np.ones((3, 4)).tolist()  # default filler 1
    s, b = _rand(3, 4, seed=2), _rand(3, 4, seed=3)
    _set(net, "s", 0, s)
    _set(net, "s", 1, b)
    y, dy, grads, params = _run(net, {"x": x}, "y")
    np.testing.assert_allclose(y, x * s[None, :, :, None] + b[None, :, :, None], **TOL)
    np.testing.assert_allclose(grads["x"], dy * s[None, :, :, None], **TOL)
    np.testing.assert_allclose(params["s[0]"], (dy * x).sum(axis=(0, 3)), **TOL)
    np.testing.assert_allclose(params["s[1]"], dy.sum(axis=(0, 3)), **TOL)


def test_scale_two_bottoms_and_scalar():
    x, s = _rand(2, 3, 4), _rand(3, 4, seed=4)
    net = _net({"x": x.shape, "s": s.shape}, 'layer { name: "s" type: "Scale" bottom: "x" bottom: "s" top: "y" }')
    assert len(net.layer("s").blobs) == 0
    y, dy, grads, _ = _run(net, {"x": x, "s": s}, "y")
    np.testing.assert_allclose(y, x * s[None], **TOL)
    np.testing.assert_allclose(grads["s"], (dy * x).sum(axis=0), **TOL)
    scalar = _net({"x": x.shape}, 'layer { name: "s" type: "Scale" bottom: "x" top: "y" '
                                  'scale_param { num_axes: 0 filler { type: "constant" value: 2.5 } } }')
    scalar.init_params()
    y, dy, _, params = _run(scalar, {"x": x}, "y")
    np.testing.assert_allclose(y, 2.5 * x, **TOL)
    np.testing.assert_allclose(params["s[0]"], (dy * x).sum(), rtol=1e-5)
    with pytest.raises(ConfigError, match="must equal bottom"):
        _net({"x": (2, 3, 4), "s": (4,)}, 'layer { name: "s" type: "Scale" bottom: "x" bottom: "s" top: "y" }')


def test_bias_learned_and_two_bottoms():
    x, b = _rand(2, 3, 4, 4), _rand(3, seed=5)
    net = _net({"x": x.shape}, 'layer { name: "b" type: "Bias" bottom: "x" top: "y" }')
    _set(net, "b", 0, b)
    y, dy, grads, params = _run(net, {"x": x}, "y")
    np.testing.assert_allclose(y, x + b[None, :, None, None], **TOL)
    np.testing.assert_allclose(grads["x"], dy, **TOL)
    np.testing.assert_allclose(params["b[0]"], dy.sum(axis=(0, 2, 3)), **TOL)
    two = _net({"x": x.shape, "b": (3, 4)},
               'layer { name: "b" type: "Bias" bottom: "x" bottom: "b" top: "y" }')
    b2 = _rand(3, 4, seed=6)
    y, dy, grads, _ = _run(two, {"x": x, "b": b2}, "y")
    np.testing.assert_allclose(y, x + b2[None, :, :, None], **TOL)
    np.testing.assert_allclose(grads["b"], dy.sum(axis=(0, 3)), **TOL)


# ----------------------------------------------------------------------------- Eltwise, Concat, Split


def _eltwise(op, extra=""):
    return _net({"a": (2, 3), "b": (2, 3), "c": (2, 3)},
                f'layer {{ name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" '
                f'eltwise_param {{ operation: {op} {extra} }} }}')


def test_eltwise_sum_with_coefficients_and_prod():
    a, b, c = _rand(2, 3, seed=7), _rand(2, 3, seed=8), _rand(2, 3, seed=9)
    y, dy, grads, _ = _run(_eltwise("SUM", "coeff: 1 coeff: -2 coeff: 0.5"), {"a": a, "b": b, "c": c}, "y")
    np.testing.assert_allclose(y, a - 2 * b + 0.5 * c, **TOL)
    for name, coeff in (("a", 1), ("b", -2), ("c", 0.5)):
        np.testing.assert_allclose(grads[name], coeff * dy, **TOL)
    for stable in ("true", "false"):
        y, dy, grads, _ = _run(_eltwise("PROD", f"stable_prod_grad: {stable}"), {"a": a, "b": b, "c": c}, "y")
        np.testing.assert_allclose(y, a * b * c, **TOL)
        np.testing.assert_allclose(grads["a"], dy * b * c, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grads["c"], dy * a * b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="only takes coefficients for summation"):
        _eltwise("PROD", "coeff: 1 coeff: 1 coeff: 1")


def test_eltwise_max_ties_follow_caffe_cpu():
    a = np.array([[1.0, 2.0, 5.0], [3.0, 0.0, 1.0]])
    b = np.array([[1.0, 1.0, 5.0], [3.0, 0.0, 1.0]])
    c = np.array([[0.0, 2.0, 5.0], [3.0, 4.0, 1.0]])
    y, dy, grads, _ = _run(_eltwise("MAX"), {"a": a, "b": b, "c": c}, "y")
    # Caffe's loop: b wins a tie with a; c must be strictly greater than the running max.
    winner = np.zeros_like(a, dtype=int)
    for idx in np.ndindex(a.shape):
        w = 0 if a[idx] > b[idx] else 1
        best = max(a[idx], b[idx])
        if c[idx] > best:
            w = 2
        winner[idx] = w
    np.testing.assert_allclose(y, np.maximum(np.maximum(a, b), c))
    for k, name in enumerate("abc"):
        np.testing.assert_allclose(grads[name], np.where(winner == k, dy, 0.0), **TOL)
    assert winner.tolist() == [[1, 0, 1], [1, 2, 1]]


def test_concat_and_split_gradients():
    a, b = _rand(2, 3, 4, seed=10), _rand(2, 5, 4, seed=11)
    net = _net({"a": a.shape, "b": b.shape}, 'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" }')
    assert net.blob_shapes["y"] == (2, 8, 4)
    y, dy, grads, _ = _run(net, {"a": a, "b": b}, "y")
    np.testing.assert_allclose(y, np.concatenate([a, b], axis=1), **TOL)
    np.testing.assert_allclose(grads["a"], dy[:, :3], **TOL)
    np.testing.assert_allclose(grads["b"], dy[:, 3:], **TOL)
    legacy = _net({"a": (2, 3), "b": (4, 3)}, 'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" '
                                              'concat_param { concat_dim: 0 } }')
    assert legacy.blob_shapes["y"] == (6, 3)
    with pytest.raises(ConfigError, match="not both"):
        _net({"a": (2, 3)}, 'layer { name: "c" type: "Concat" bottom: "a" top: "y" concat_param { axis: 1 concat_dim: 1 } }')
    x = _rand(2, 3, seed=12)
    split = _net({"x": x.shape}, 'layer { name: "s" type: "Split" bottom: "x" top: "p" top: "q" }\n'
                                 'layer { name: "e" type: "Eltwise" bottom: "p" bottom: "q" top: "y" '
                                 'eltwise_param { coeff: 2 coeff: 3 } }')
    y, dy, grads, _ = _run(split, {"x": x}, "y")
    np.testing.assert_allclose(y, 5 * x, **TOL)
    np.testing.assert_allclose(grads["x"], 5 * dy, **TOL)  # the tops' gradients summed


# ----------------------------------------------------------------------------- Flatten, Reshape


def test_flatten_and_reshape():
    x = _rand(2, 3, 4, 5)
    flat = _net({"x": x.shape}, 'layer { name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { end_axis: 2 } }')
    assert flat.blob_shapes["y"] == (2, 12, 5)
    reshape = _net({"x": x.shape}, 'layer { name: "r" type: "Reshape" bottom: "x" top: "y" '
                                   'reshape_param { shape { dim: 0 dim: -1 dim: 10 } } }')
    assert reshape.blob_shapes["y"] == (2, 6, 10)
    for net, shape in ((flat, (2, 12, 5)), (reshape, (2, 6, 10))):
        y, dy, grads, _ = _run(net, {"x": x}, "y")
        np.testing.assert_allclose(y, x.reshape(shape), **TOL)
        np.testing.assert_allclose(grads["x"], dy.reshape(x.shape), **TOL)
    part = _net({"x": x.shape}, 'layer { name: "r" type: "Reshape" bottom: "x" top: "y" '
                                'reshape_param { axis: 1 num_axes: 1 shape { dim: 3 dim: 1 } } }')
    assert part.blob_shapes["y"] == (2, 3, 1, 4, 5)
    with pytest.raises(ConfigError, match="changes the count"):
        _net({"x": x.shape}, 'layer { name: "r" type: "Reshape" bottom: "x" top: "y" '
                             'reshape_param { shape { dim: 7 } } }')


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize("type_name, extra, ref, dref", [
    ("Sigmoid", "", lambda x: 0.5 * np.tanh(0.5 * x) + 0.5, lambda x, y: y * (1 - y)),
    ("TanH", "", np.tanh, lambda x, y: 1 - y ** 2),
    ("ELU", "elu_param { alpha: 0.7 }", lambda x: np.maximum(x, 0) + 0.7 * (np.exp(np.minimum(x, 0)) - 1),
     lambda x, y: np.where(x > 0, 1.0, y + 0.7)),
])
def test_activations(type_name, extra, ref, dref):
    x = _rand(3, 4, 2, 2) * 2
    x[0, 0, 0, 0] = 0.0
    net = _net({"x": x.shape}, f'layer {{ name: "a" type: "{type_name}" bottom: "x" top: "y" {extra} }}')
    y, dy, grads, _ = _run(net, {"x": x}, "y")
    np.testing.assert_allclose(y, ref(x), **TOL)
    np.testing.assert_allclose(grads["x"], dy * dref(x, ref(x)), **TOL)


def test_prelu_per_channel_and_shared():
    x = _rand(2, 3, 4, 4)
    x[0, :, 0, 0] = 0.0
    net = _net({"x": x.shape}, 'layer { name: "p" type: "PReLU" bottom: "x" top: "y" }')
    net.init_params()
    np.testing.assert_allclose(net.layer("p").blobs[0].detach().numpy(), [0.25] * 3)
    a = np.array([0.1, -0.5, 2.0])
    _set(net, "p", 0, a)
    y, dy, grads, params = _run(net, {"x": x}, "y")
    ac = a[None, :, None, None]
    np.testing.assert_allclose(y, np.maximum(x, 0) + ac * np.minimum(x, 0), **TOL)
    np.testing.assert_allclose(grads["x"], dy * np.where(x > 0, 1.0, ac), **TOL)
    np.testing.assert_allclose(params["p[0]"], (dy * x * (x <= 0)).sum(axis=(0, 2, 3)), **TOL)
    assert net.learnable[0].decay_mult == 1  # Caffe weight-decays the slopes
    shared = _net({"x": x.shape}, 'layer { name: "p" type: "PReLU" bottom: "x" top: "y" '
                                  'prelu_param { channel_shared: true } }')
    assert tuple(shared.layer("p").blobs[0].shape) == ()
    _set(shared, "p", 0, 0.3)
    y, dy, grads, params = _run(shared, {"x": x}, "y")
    np.testing.assert_allclose(y, np.maximum(x, 0) + 0.3 * np.minimum(x, 0), **TOL)
    np.testing.assert_allclose(params["p[0]"], (dy * x * (x <= 0)).sum(), rtol=1e-5)


# ----------------------------------------------------------------------------- Pooling, Convolution


def test_global_pooling():
    x = _rand(2, 3, 5, 7)
    for method, ref in (("AVE", x.mean(axis=(2, 3), keepdims=True)), ("MAX", x.max(axis=(2, 3), keepdims=True))):
        net = _net({"x": x.shape}, f'layer {{ name: "p" type: "Pooling" bottom: "x" top: "y" '
                                   f'pooling_param {{ pool: {method} global_pooling: true }} }}')
        y, dy, grads, _ = _run(net, {"x": x}, "y")
        np.testing.assert_allclose(y, ref, **TOL)
        if method == "AVE":
            np.testing.assert_allclose(grads["x"], np.broadcast_to(dy / 35, x.shape), **TOL)
    with pytest.raises(ConfigError, match="only pad = 0 and stride = 1"):
        _net({"x": x.shape}, 'layer { name: "p" type: "Pooling" bottom: "x" top: "y" '
                             'pooling_param { global_pooling: true stride: 2 } }')


def _np_conv(x, w, b, stride, pad, dilation, group):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - (dilation * (kh - 1) + 1)) // stride + 1
    ow = (wd + 2 * pad - (dilation * (kw - 1) + 1)) // stride + 1
    y = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dilation: i * dilation + stride * (oh - 1) + 1: stride,
                           j * dilation: j * dilation + stride * (ow - 1) + 1: stride]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return y + b[None, :, None, None]


def test_convolution_group_and_dilation_forward_backward():
    x = _rand(2, 4, 9, 9)
    net = _net({"x": x.shape}, 'layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { '
                               'num_output: 6 kernel_size: 3 pad: 2 stride: 2 dilation: 2 group: 2 } }')
    w, b = _rand(6, 2, 3, 3, seed=13), _rand(6, seed=14)
    _set(net, "c", 0, w)
    _set(net, "c", 1, b)
    ref = _np_conv(x, w, b, 2, 2, 2, 2)
    assert net.blob_shapes["y"] == ref.shape
    y, dy, grads, params = _run(net, {"x": x}, "y")
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    # Backward by the linearity of convolution: d<dy, conv(x)>/dw_k = <dy, conv(x; e_k) - b>.
    dw = np.zeros_like(w)
    for k in np.ndindex(w.shape):
        e = np.zeros_like(w)
        e[k] = 1
        dw[k] = (dy * (_np_conv(x, e, np.zeros(6), 2, 2, 2, 2))).sum()
    np.testing.assert_allclose(params["c[0]"], dw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(params["c[1]"], dy.sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    probe = _rand(*x.shape, seed=15)  # <dx, probe> = <dy, conv(probe) - b>
    np.testing.assert_allclose((grads["x"] * probe).sum(), (dy * (_np_conv(probe, w, b, 2, 2, 2, 2)
                                                                   - b[None, :, None, None])).sum(), rtol=1e-4)
