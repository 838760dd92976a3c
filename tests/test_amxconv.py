"""The native convolution prefix (lymph_cv.net.amxconv, lymph_cv.net.amxforward): bfloat16 on AMX
against an exact bfloat16 emulation and against float32; float32 on AVX-512 and on AVX2 against
float64 and PlainNet, and the two float32 kernels bit for bit against each other."""
from __future__ import annotations

import numpy as np
import pytest

from lymph_cv.core.native import NATIVE_ENV
from lymph_cv.formats.caffe.model import read_caffemodel
from lymph_cv.formats.caffe.prototxt import read_net_prototxt
from lymph_cv.net import amxforward
from lymph_cv.net.amxforward import AMXForward, prefix_ops
from lymph_cv.net.plain import PlainNet, UnsupportedNet
from lymph_cv.net.netspec import pooled_size

from test_evaluate import _render_deploy
from test_plain import _conv, _ip, _layer, _pair

#: The native module where it is built (``make native`` runs before the tests).
amxconv = amxforward.native_module()


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 → nearest-even bfloat16, as float32 (finite inputs)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def _conv_ref(x, w, b, pad, stride, relu):
    """Caffe's convolution of N×C×H×W in float64."""
    n, c, h, width = x.shape
    o, _, kh, kw = w.shape
    padded = np.zeros((n, c, h + 2 * pad, width + 2 * pad))
    padded[:, :, pad:pad + h, pad:pad + width] = x
    oh, ow = (h + 2 * pad - kh) // stride + 1, (width + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for ky in range(kh):
        for kx in range(kw):
            patch = padded[:, :, ky:ky + (oh - 1) * stride + 1:stride, kx:kx + (ow - 1) * stride + 1:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx].astype(np.float64))
    out += b[None, :, None, None]
    return np.maximum(out, 0) if relu else out


def _pool_ref(x, kind, k, s, p, relu):
    """Caffe's MAX (window cut at the image) or AVE (divisor cut at the padded image) pooling."""
    n, c, h, w = x.shape
    oh, ow = pooled_size(h, k, s, p), pooled_size(w, k, s, p)
    out = np.zeros((n, c, oh, ow))
    for y in range(oh):
        for x0 in range(ow):
            top, left = y * s - p, x0 * s - p
            size = (min(top + k, h + p) - top) * (min(left + k, w + p) - left)
            window = x[:, :, max(top, 0):min(top + k, h), max(left, 0):min(left + k, w)].astype(np.float64)
            out[:, :, y, x0] = window.max(axis=(2, 3)) if kind == 1 else window.sum(axis=(2, 3)) / size
    return np.maximum(out, 0) if relu else out


def _run(ops, x, f32=False, fallback=False):
    last = ops[-1]
    out = np.empty((x.shape[0], last[7], last[8], last[6]), np.float32)
    amxconv.run(amxconv.program(ops, f32, fallback), np.ascontiguousarray(x, np.float32), x.shape[0], out, 2)
    return out.transpose(0, 3, 1, 2)


#: Where the CPU has AVX-512, the float32 tests run its kernels and, forced, the AVX2 ones.
F32_KERNELS = [False, True]
#: Where it has AMX, the bfloat16 tests run its kernels and, forced, the AVX512-BF16 ones.
BF16_KERNELS = [False, True]


def _have(f32=False, fallback=False) -> bool:
    if amxconv is None:
        return False
    if f32:
        return bool(amxconv.available_f32())
    return bool(amxconv.available_dpbf16() if fallback else amxconv.available())


def _assert_refused(ops, f32, fallback=False):
    """Where the CPU (or the build) lacks it, a program is refused, not run wrong."""
    if f32 or not fallback:
        assert not (amxforward.available_float32() if f32 else amxforward.available())
    if amxconv is not None:
        with pytest.raises(RuntimeError, match="AVX" if f32 or fallback else "AMX"):
            amxconv.program(ops, f32, fallback)


# (c, h, w, pad, oc, kernel, stride, relu): a first layer's stacked input rows (short kernel rows),
# direct rows (an odd number of them), blocks along the padded width, 1×1, strides, channel counts
# that are no multiple of 16 (masked stores), 1-5 channel blocks
CONVS = [(3, 32, 32, 2, 32, 5, 1, 0), (3, 9, 40, 1, 20, 3, 1, 1), (32, 16, 16, 2, 32, 5, 1, 1),
         (32, 8, 8, 2, 64, 5, 1, 1), (20, 7, 9, 1, 40, 3, 1, 0), (40, 5, 6, 0, 70, 1, 1, 1),
         (4, 11, 13, 1, 16, 3, 2, 1), (16, 6, 6, 0, 8, 3, 1, 0), (7, 5, 33, 0, 5, 2, 1, 1),
         (8, 7, 16, 1, 32, 3, 1, 1)]


@pytest.mark.parametrize("fallback", BF16_KERNELS)
@pytest.mark.parametrize("c,h,w,pad,oc,k,stride,relu", CONVS)
def test_a_bfloat16_convolution_rounds_as_its_emulation(c, h, w, pad, oc, k, stride, relu, fallback):
    rng = np.random.default_rng(c * 100 + oc)
    x = rng.normal(0, 30, (5, c, h, w)).astype(np.float32)
    weights = rng.normal(0, 0.2, (oc, c, k, k)).astype(np.float32)
    bias = rng.normal(0, 1, oc).astype(np.float32)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    op = (0, relu, c, h, w, pad, oc, oh, ow, k, k, stride, stride, 0, 0, weights, bias)
    if not _have(fallback=fallback):
        _assert_refused([op], False, fallback)
        return
    ours = _run([op], x, fallback=fallback)
    # bfloat16 inputs and weights, exact products, the sum in float64 then rounded to bfloat16
    exact = _conv_ref(_bf16(x), _bf16(weights), bias, pad, stride, relu)
    expected = _bf16(exact.astype(np.float32))
    scale = _conv_ref(np.abs(_bf16(x)), np.abs(_bf16(weights)), np.zeros(oc), pad, stride, False)
    # AMX and VDPBF16PS sum in float32 in their own order: at most one bfloat16 step from the emulation
    assert np.all(np.abs(ours - expected) <= np.abs(expected) * 2.0 ** -7 + scale * 1e-6)
    assert np.mean(ours == expected) > 0.97
    assert not relu or ours.min() >= 0


@pytest.mark.parametrize("fallback", BF16_KERNELS)
def test_a_later_convolution_with_short_kernel_rows_takes_im2col(fallback):
    """After a pooling (so not the first layer, whose input is stacked instead): 3 channels, 5×5."""
    rng = np.random.default_rng(7)
    x = _bf16(rng.normal(0, 30, (4, 3, 20, 21)).astype(np.float32))
    weights = rng.normal(0, 0.2, (24, 3, 5, 5)).astype(np.float32)
    bias = rng.normal(0, 1, 24).astype(np.float32)
    pool = (1, 0, 3, 20, 21, 0, 3, 10, 11, 2, 2, 2, 2, 0, 0, None, None)  # exact: a maximum of bfloat16s
    conv = (0, 1, 3, 10, 11, 2, 24, 10, 11, 5, 5, 1, 1, 0, 0, weights, bias)
    if not _have(fallback=fallback):
        _assert_refused([pool, conv], False, fallback)
        return
    ours = _run([pool, conv], x, fallback=fallback)
    pooled = _pool_ref(x, 1, 2, 2, 0, False).astype(np.float32)
    expected = _bf16(_conv_ref(pooled, _bf16(weights), bias, 2, 1, True).astype(np.float32))
    scale = _conv_ref(np.abs(pooled), np.abs(_bf16(weights)), np.zeros(24), 2, 1, False)
    assert np.all(np.abs(ours - expected) <= np.abs(expected) * 2.0 ** -7 + scale * 1e-6)


@pytest.mark.parametrize("avx2", F32_KERNELS)
@pytest.mark.parametrize("c,h,w,pad,oc,k,stride,relu", CONVS)
def test_a_float32_convolution_is_float32s(c, h, w, pad, oc, k, stride, relu, avx2):
    rng = np.random.default_rng(c * 100 + oc + 1)
    x = rng.normal(0, 30, (3, c, h, w)).astype(np.float32)
    weights = rng.normal(0, 0.2, (oc, c, k, k)).astype(np.float32)
    bias = rng.normal(0, 1, oc).astype(np.float32)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    op = (0, relu, c, h, w, pad, oc, oh, ow, k, k, stride, stride, 0, 0, weights, bias)
    if not _have(f32=True):
        _assert_refused([op], True)
        return
    ours = _run([op], x, f32=True, fallback=avx2)
    exact = _conv_ref(x, weights, bias, pad, stride, relu)
    scale = _conv_ref(np.abs(x), np.abs(weights), np.zeros(oc), pad, stride, False)
    assert np.all(np.abs(ours - exact) <= scale * 2e-6 + 1e-6)


def test_the_float32_kernels_give_the_same_bits():
    """AVX-512 and AVX2 sum every output in the same order: a whole prefix gives equal bits (where
    the CPU has AVX-512; elsewhere the default kernels are the AVX2 ones)."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 30, (7, 3, 20, 19)).astype(np.float32)
    w1, b1 = rng.normal(0, 0.2, (20, 3, 5, 5)).astype(np.float32), rng.normal(0, 1, 20).astype(np.float32)
    w2, b2 = rng.normal(0, 0.1, (24, 20, 3, 3)).astype(np.float32), rng.normal(0, 1, 24).astype(np.float32)
    ops = [(0, 1, 3, 20, 19, 2, 20, 20, 19, 5, 5, 1, 1, 0, 0, w1, b1),
           (1, 0, 20, 20, 19, 0, 20, 10, 9, 3, 3, 2, 2, 0, 0, None, None),
           (0, 1, 20, 10, 9, 1, 24, 10, 9, 3, 3, 1, 1, 0, 0, w2, b2),
           (2, 0, 24, 10, 9, 0, 24, 5, 5, 3, 3, 2, 2, 0, 0, None, None)]
    if not _have(f32=True):
        _assert_refused(ops, True)
        return
    assert amxconv.f32_kernels() in ("avx512", "avx2")
    assert np.array_equal(_run(ops, x, f32=True), _run(ops, x, f32=True, fallback=True))


@pytest.mark.parametrize("f32", [False, True])
def test_the_thread_count_changes_no_bits(f32):
    """Threads take a batch's crops a chunk at a time from one counter: any count, any remainder,
    the same output for every crop."""
    rng = np.random.default_rng(11)
    x = rng.normal(0, 30, (37, 3, 12, 12)).astype(np.float32)
    w1, b1 = rng.normal(0, 0.2, (16, 3, 5, 5)).astype(np.float32), rng.normal(0, 1, 16).astype(np.float32)
    ops = [(0, 1, 3, 12, 12, 2, 16, 12, 12, 5, 5, 1, 1, 0, 0, w1, b1),
           (1, 0, 16, 12, 12, 0, 16, 6, 6, 3, 3, 2, 2, 0, 0, None, None)]
    if not _have(f32):
        _assert_refused(ops, f32)
        return
    program = amxconv.program(ops, f32)
    outs = []
    for threads in (1, 2, 3, 8):
        out = np.full((len(x), 6, 6, 16), np.nan, np.float32)
        amxconv.run(program, x, len(x), out, threads)
        outs.append(out)
    assert not np.isnan(outs[0]).any()
    for out in outs[1:]:
        assert np.array_equal(out, outs[0])


# (c, h, w, kind, kernel, stride, pad, relu): MAX with ReLU (int16), MAX alone, AVE with and without pad
POOLS = [(32, 32, 32, 1, 3, 2, 0, 1), (21, 9, 11, 1, 3, 2, 1, 0), (32, 16, 16, 2, 3, 2, 0, 0),
         (40, 7, 7, 2, 3, 2, 1, 1), (70, 5, 6, 1, 2, 2, 0, 0)]


@pytest.mark.parametrize("f32,fallback", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("c,h,w,kind,k,s,p,relu", POOLS)
def test_poolings_are_caffes(c, h, w, kind, k, s, p, relu, f32, fallback):
    x = np.random.default_rng(c + h).normal(0, 5, (4, c, h, w)).astype(np.float32)
    x = x if f32 else _bf16(x)
    oh, ow = pooled_size(h, k, s, p), pooled_size(w, k, s, p)
    op = (kind, relu, c, h, w, 0, c, oh, ow, k, k, s, s, p, p, None, None)
    if not _have(f32, fallback):
        _assert_refused([op], f32, fallback)
        return
    ours = _run([op], x, f32, fallback)
    exact = _pool_ref(x, kind, k, s, p, relu)
    if kind == 1:  # a maximum is one of the values: exact
        assert np.array_equal(ours, exact.astype(np.float32))
    else:
        expected = exact.astype(np.float32) if f32 else _bf16(exact.astype(np.float32))
        assert np.all(np.abs(ours - expected) <= np.abs(expected) * (1e-6 if f32 else 2.0 ** -7) + 1e-6)


#: Nets whose whole spatial part runs natively: every convolution/pooling path above, chained.
NATIVE_NETS = {
    "mixed": ('input: "data" input_dim: 6 input_dim: 3 input_dim: 18 input_dim: 22\n'
              + _conv("c1", "data", "c1", 20, "kernel_size: 5 pad: 2")
              + _layer("p1", "Pooling", "c1", "p1", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
              + _layer("r1", "ReLU", "p1", "p1")
              + _conv("c2", "p1", "c2", 40, "kernel_size: 3 pad: 1")
              + _layer("r2", "ReLU", "c2", "r2")
              + _layer("p2", "Pooling", "r2", "p2", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }")
              + _conv("c3", "p2", "c3", 70, "kernel_size: 1")
              + _layer("p3", "Pooling", "c3", "p3", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
              + _ip("ip", "p3", "ip", 3)
              + _layer("prob", "Softmax", "ip", "prob")),
    "strided": ('input: "data" input_dim: 5 input_dim: 4 input_dim: 23 input_dim: 17\n'
                + _conv("c1", "data", "c1", 16, "kernel_size: 3 pad: 1 stride: 2")
                + _layer("r1", "ReLU", "c1", "c1")
                + _conv("c2", "c1", "c2", 8, "kernel_size: 3")
                + _ip("ip", "c2", "ip", 4)
                + _layer("prob", "Softmax", "ip", "prob")),
}


@pytest.mark.parametrize("name", sorted(NATIVE_NETS))
def test_native_nets_agree_with_float32(name):
    _, plain = _pair(NATIVE_NETS[name], seed=len(name))
    x = np.random.default_rng(2).normal(0, 20, (plain.input_shape[0],) + tuple(plain.input_shape[1:])).astype(np.float32)
    exact = plain.forward({plain.input: x}, blobs=(plain.layers[-3].tops[0],))
    if not _have(f32=True):
        with pytest.raises(UnsupportedNet):
            AMXForward(plain)
        return
    forward = AMXForward(plain, threads=2)
    assert forward.layer_names == [layer.name for layer in plain.layers[:forward.end]]
    assert plain.layers[forward.end].type == "InnerProduct"
    top = forward.top
    high = forward.forward(x, blobs=(top,), precision="float32")
    assert np.allclose(high[top], exact[top], rtol=1e-5, atol=1e-4 * np.abs(exact[top]).max())
    assert np.abs(high["prob"] - exact["prob"]).max() <= 1e-5
    if _have():
        assert forward.precisions == ("bfloat16", "float32")
        low = forward.forward(x, blobs=(top,), precision="bfloat16")
        assert np.abs(low[top] - exact[top]).max() <= 0.03 * np.abs(exact[top]).max()
        assert np.abs(low["prob"] - exact["prob"]).max() <= 0.05
        if _have(fallback=True):  # the AVX512-BF16 kernels, on the whole prefix (also where AMX runs it)
            ops, _, _ = prefix_ops(plain)
            forced = _run(ops, x, fallback=True)
            assert np.abs(forced - exact[top]).max() <= 0.03 * np.abs(exact[top]).max()
    else:  # float32 alone, and the default
        assert forward.precisions == ("float32",)
        assert np.array_equal(forward.predict(x), high["prob"].reshape(len(x), -1))
        with pytest.raises(UnsupportedNet, match="bfloat16"):
            forward.predict(x, precision="bfloat16")
    assert forward.predict(x[:0]).shape == (0, plain.blob_shapes[plain.output][1])


def test_the_published_model_natively(reference, tmp_path):
    deploy = _render_deploy(tmp_path)
    model = reference / "1_caffenet_train_w32_iter_600000.caffemodel"
    plain = PlainNet.build(read_net_prototxt(deploy), read_caffemodel(model), deploy, model)
    # crops of a smooth image: the net's probabilities then stay away from 0 and 1
    rng = np.random.default_rng(5)
    base = rng.normal(0, 40, (64, 3, 4, 4)).astype(np.float32)
    crops = np.kron(base, np.ones((1, 1, 8, 8), np.float32)) + rng.normal(0, 5, (64, 3, 32, 32)).astype(np.float32)
    exact = plain.forward({"data": crops})["prob"]
    if not _have(f32=True):
        with pytest.raises(UnsupportedNet):
            AMXForward(plain)
        return
    forward = AMXForward(plain)
    assert forward.layer_names == ["conv1", "pool1", "relu1", "conv2", "relu2", "pool2", "conv3", "relu3", "pool3"]
    assert np.abs(forward.predict(crops, precision="float32") - exact).max() <= 1e-5
    if _have():
        low = forward.predict(crops)
        # lymph_cv.stages.evaluate.BF16_WORST_DEVIATION: the largest move measured on full images
        assert np.abs(low - exact).max() <= 0.065
        assert not np.array_equal(low, exact)


def test_prefix_rules():
    # a leaky ReLU ends the prefix; a ReLU folds into the layer before it
    _, plain = _pair('input: "data" input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8\n'
                     + _conv("c1", "data", "c1", 4, "kernel_size: 3")
                     + _layer("r1", "ReLU", "c1", "c1")
                     + _layer("r2", "ReLU", "c1", "c1", "relu_param { negative_slope: 0.1 }")
                     + _ip("ip", "c1", "ip", 2))
    ops, end, top = prefix_ops(plain)
    assert (len(ops), end, top, ops[0][1]) == (1, 2, "c1", 1)
    # a later layer reading a blob inside the prefix: not native
    _, plain = _pair('input: "data" input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8\n'
                     + _conv("c1", "data", "c1", 4, "kernel_size: 3")
                     + _layer("p1", "Pooling", "c1", "p1", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
                     + _ip("ip", "c1", "ip", 2))
    with pytest.raises(UnsupportedNet, match="c1"):
        prefix_ops(plain)
    # no convolution first: nothing for the native prefix
    _, plain = _pair('input: "data" input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8\n' + _ip("ip", "data", "ip", 2))
    with pytest.raises(UnsupportedNet, match="no convolution"):
        prefix_ops(plain)


def test_inconsistent_programs_are_refused():
    weights, bias = np.zeros((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)
    conv = (0, 0, 3, 8, 8, 1, 4, 8, 8, 3, 3, 1, 1, 0, 0, weights, bias)
    if not _have():
        _assert_refused([conv], False)
        return
    with pytest.raises(ValueError, match="geometry"):
        amxconv.program([conv[:7] + (9,) + conv[8:]])  # 9 output rows from 8 padded by 1, kernel 3
    with pytest.raises(ValueError, match="weight or bias"):
        amxconv.program([conv[:15] + (weights[:2], bias)])
    pool = (1, 0, 5, 8, 8, 0, 5, 4, 4, 2, 2, 2, 2, 0, 0, None, None)
    with pytest.raises(ValueError, match="geometry"):
        amxconv.program([conv, pool])  # 5 channels after a 4-channel convolution
    program = amxconv.program([conv])
    with pytest.raises(ValueError, match="buffer sizes"):
        amxconv.run(program, np.zeros(10, np.float32), 1, np.zeros(4 * 64, np.float32), 1)


def test_native_off_means_not_available(monkeypatch):
    monkeypatch.setenv(NATIVE_ENV, "0")
    assert not amxforward.available() and not amxforward.available_float32()
    assert amxforward.native_module() is None
