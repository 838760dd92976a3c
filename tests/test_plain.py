"""The numpy float32 deploy-net forward (lymph_cv.net.plain) against the torch CaffeNet's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lymph_cv.core.devices import cpu_has_bfloat16
from lymph_cv.errors import EvaluationError, FormatError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.model import read_caffemodel
from lymph_cv.formats.caffe.prototxt import parse_net_text, read_net_prototxt
from lymph_cv.net import amxforward
from lymph_cv.net.build import build_net
from lymph_cv.net.plain import MICRO_BATCH, PlainNet, UnsupportedNet

from test_evaluate import _render_deploy, published  # noqa: F401  (the module's fixture)

#: Probabilities agree to float rounding (different summation orders).
PROB_TOLERANCE = 1e-5


def _torch_forward(net, x, names):
    with torch.inference_mode():
        found = net.forward({net.input_blobs[0]: torch.from_numpy(x)})
    return {name: found[name].float().contiguous().numpy() for name in names}


def _pair(text, seed=0):
    """(torch net with seeded random weights, the PlainNet built from its exported weights)."""
    net_param = parse_net_text(text)
    net = build_net(net_param, caffe_pb2.TEST)
    net.init_params(torch.Generator().manual_seed(seed))
    net.eval()
    return net, PlainNet.build(net_param, net.export_weights(legacy_dims=seed % 2 == 0), "deploy", "model")


def test_the_published_fold_1_model_agrees_with_torch(reference, tmp_path):
    deploy = _render_deploy(tmp_path)
    weights = read_caffemodel(reference / "1_caffenet_train_w32_iter_600000.caffemodel")
    net_param = read_net_prototxt(deploy)
    plain = PlainNet.build(net_param, weights, deploy, "fold-1")
    net = build_net(net_param, caffe_pb2.TEST)
    net.load_weights(weights)
    net.eval()
    assert plain.input == "data" and plain.output == "prob" and plain.input_shape[1:] == (3, 32, 32)
    assert [layer.name for layer in plain.layers][:3] == ["conv1", "pool1", "relu1"]
    crops = np.random.default_rng(0).uniform(-120, 120, (64, 3, 32, 32)).astype(np.float32)
    ours = plain.forward({"data": crops}, blobs=("ip1",))
    theirs = _torch_forward(net, crops, ("prob", "ip1"))
    assert ours["prob"].dtype == np.float32 and ours["prob"].shape == (64, 3)
    assert np.abs(ours["prob"] - theirs["prob"]).max() <= PROB_TOLERANCE
    assert np.allclose(ours["ip1"], theirs["ip1"], rtol=1e-4, atol=1e-3)
    assert (ours["prob"].argmax(1) == theirs["prob"].argmax(1)).all()
    # forward(start=K) from the blobs live there gives the same output (the AMX engine's float32 tail)
    start = next(i for i, layer in enumerate(plain.layers) if layer.type == "InnerProduct")
    live = plain.forward({"data": crops}, blobs=(plain.layers[start].bottoms[0],))
    tail = plain.forward({plain.layers[start].bottoms[0]: live[plain.layers[start].bottoms[0]]}, start=start)
    assert np.array_equal(tail["prob"], ours["prob"])


def _conv(name, bottom, top, outputs, extra=""):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" '
            f'convolution_param {{ num_output: {outputs} {extra} weight_filler {{ type: "gaussian" std: 0.2 }} '
            f'bias_filler {{ type: "gaussian" std: 0.5 }} }} }}\n')


def _layer(name, kind, bottom, top, params=""):
    return f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{top}" {params} }}\n'


def _ip(name, bottom, top, outputs, extra=""):
    return _layer(name, "InnerProduct", bottom, top, f'inner_product_param {{ num_output: {outputs} {extra} '
                  f'weight_filler {{ type: "gaussian" std: 0.1 }} bias_filler {{ type: "gaussian" std: 0.3 }} }}')


NETS = {
    # declared input_dim, pads, strides, ceil MAX, leaky ReLU in place, AVE with pad, Dropout, IP, Softmax
    "cifar-like": ('input: "data" input_dim: 4 input_dim: 3 input_dim: 14 input_dim: 12\n'
                   + _conv("c1", "data", "c1", 5, "kernel_size: 3 pad: 1 stride: 1")
                   + _layer("p1", "Pooling", "c1", "p1", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
                   + _layer("r1", "ReLU", "p1", "p1", "relu_param { negative_slope: 0.1 }")
                   + _conv("c2", "p1", "c2", 4, "kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 1 stride_h: 2 stride_w: 1")
                   + _layer("r2", "ReLU", "c2", "c2")
                   + _layer("p2", "Pooling", "c2", "p2", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }")
                   + _layer("d", "Dropout", "p2", "p2", "dropout_param { dropout_ratio: 0.5 }")
                   + _ip("ip1", "p2", "ip1", 7)
                   + _layer("r3", "ReLU", "ip1", "r3")
                   + _ip("ip2", "r3", "ip2", 3, "transpose: true")
                   + _layer("prob", "Softmax", "ip2", "prob")),
    # Input layer, FLOOR rounding, AVE without pad (ceil), global pooling, IP on axis 2, Softmax axis 1
    "input-layer": ('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 3 dim: 2 dim: 9 dim: 10 } } }\n'
                    + _conv("c1", "data", "c1", 6, "kernel_size: 2 stride: 2 bias_term: false")
                    + _layer("p1", "Pooling", "c1", "p1", "pooling_param { pool: AVE kernel_size: 2 stride: 2 }")
                    + _layer("p2", "Pooling", "c1", "p2", "pooling_param { pool: MAX kernel_size: 3 stride: 2 "
                             "pad: 1 round_mode: FLOOR }")
                    + _layer("g", "Pooling", "p2", "g", "pooling_param { pool: AVE global_pooling: true }")
                    + _ip("ip", "p1", "ip", 4, "axis: 2 bias_term: false")
                    + _layer("prob", "Softmax", "ip", "prob", "softmax_param { axis: 1 }")),
    # input_shape, a leaky ReLU not in place, a Dropout not in place, Softmax on a 4-D blob
    "input-shape": ('input: "x" input_shape { dim: 2 dim: 4 dim: 7 dim: 7 }\n'
                    + _conv("c1", "x", "c1", 3, "kernel_size: 3 kernel_size: 1 pad: 1 pad: 0 stride: 2")
                    + _layer("r", "ReLU", "c1", "r", "relu_param { negative_slope: -0.5 }")
                    + _layer("d", "Dropout", "r", "d")
                    + _layer("r2", "ReLU", "r", "r")
                    + _layer("prob", "Softmax", "d", "prob")),
    # Softmax across the batch: never split into micro-batches
    "softmax-batch": ('input: "data" input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5\n'
                      + _conv("c1", "data", "c1", 2, "kernel_size: 3")
                      + _layer("prob", "Softmax", "c1", "prob", "softmax_param { axis: 0 }")),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_random_nets_agree_with_torch(name):
    net, plain = _pair(NETS[name], seed=len(name))
    shape = plain.input_shape
    # more crops than a micro-batch (lymph_cv.net.plain.MICRO_BATCH)
    x = np.random.default_rng(1).normal(0, 2, (MICRO_BATCH + 6,) + tuple(shape[1:])).astype(np.float32)
    kept = x.copy()
    blobs = [b for b in net.blob_shapes if b not in net.input_blobs and b in plain.blob_shapes]
    ours = plain.forward({plain.input: x}, blobs=blobs)
    theirs = _torch_forward(net, x, blobs)
    assert np.array_equal(x, kept)  # in-place layers never write into the caller's array
    assert ours[plain.output].shape == theirs[plain.output].shape
    assert np.abs(ours["prob"] - theirs["prob"]).max() <= PROB_TOLERANCE
    for blob in blobs:
        assert ours[blob].shape == theirs[blob].shape, blob
        assert np.allclose(ours[blob], theirs[blob], rtol=1e-5, atol=1e-5), blob


@pytest.mark.parametrize("change", [
    'convolution_param { num_output: 4 kernel_size: 3 group: 2 }',
    'convolution_param { num_output: 4 kernel_size: 3 dilation: 2 }',
])
def test_grouped_or_dilated_convolutions_are_unsupported(change):
    text = ('input: "data" input_dim: 1 input_dim: 4 input_dim: 8 input_dim: 8\n'
            f'layer {{ name: "c" type: "Convolution" bottom: "data" top: "c" {change} }}')
    with pytest.raises(UnsupportedNet, match="layer 'c'"):
        PlainNet.parse(parse_net_text(text))


@pytest.mark.parametrize("kind", ["BatchNorm", "Scale", "LRN", "Sigmoid", "Flatten"])
def test_other_layer_types_are_unsupported(kind):
    text = ('input: "data" input_dim: 1 input_dim: 4 input_dim: 8 input_dim: 8\n'
            + _layer("x", kind, "data", "x"))
    with pytest.raises(UnsupportedNet, match=f"type '{kind}'"):
        PlainNet.parse(parse_net_text(text))


def test_a_model_that_does_not_fit_raises_the_classifiers_errors():
    text = NETS["cifar-like"]
    net, _ = _pair(text)
    weights = net.export_weights()
    mismatch = "model m.caffemodel does not fit deploy net d.prototxt"
    partial = caffe_pb2.NetParameter()
    partial.CopyFrom(weights)
    del partial.layer[-2]  # ip2's blobs
    with pytest.raises(EvaluationError, match=f"^{mismatch}: no weights for layer\\(s\\) ip2$"):
        PlainNet.build(parse_net_text(text), partial, "d.prototxt", "m.caffemodel")
    for changed in (text.replace("num_output: 7", "num_output: 8"),
                    text.replace("num_output: 7", "num_output: 7 bias_term: false")):
        with pytest.raises(FormatError) as torchs:  # what CaffeNet.load_weights says
            build_net(parse_net_text(changed), caffe_pb2.TEST).load_weights(weights, "m.caffemodel")
        assert "layer 'ip1'" in torchs.value.detail
        with pytest.raises(EvaluationError) as ours:
            PlainNet.build(parse_net_text(changed), weights, "d.prototxt", "m.caffemodel")
        assert str(ours.value) == f"{mismatch}: {torchs.value.detail}"


# ----------------------------------------------------------------------------- the torch-free evaluate path
#: Whether the native engine runs bfloat16 here (AMX, a built lymph_cv.net.amxconv), and float32
#: (AVX-512 or AVX2): the wiring below is then tested on it; elsewhere the same classifiers must take
#: the torch backend.
NATIVE = amxforward.available()
NATIVE_F32 = amxforward.available_float32()
#: The native bfloat16 path's largest probability move (lymph_cv.stages.evaluate.BF16_WORST_DEVIATION).
BF16_DEVIATION = 0.065


def test_the_cpu_runs_natively_where_the_engine_does_and_the_rest_on_torch(published):  # noqa: F811
    from lymph_cv.stages.evaluate import WindowClassifier

    low = WindowClassifier(published["deploy"], published["model"], "cpu", "bfloat16")
    assert low.backend == ("native" if NATIVE else "torch") and low.crop == 32 and low.n_classes == 3
    assert (low.net is None) == NATIVE
    native = WindowClassifier(published["deploy"], published["model"], "cpu", "float32")
    assert native.backend == ("native" if NATIVE_F32 else "torch") and (native.net is None) == NATIVE_F32
    for precision in ("float32", "bfloat16"):
        assert WindowClassifier(published["deploy"], published["model"], "cpu", precision, "torch").backend == "torch"
    exact = WindowClassifier(published["deploy"], published["model"], backend="torch")
    crops = np.random.default_rng(2).uniform(-100, 100, (20, 3, 32, 32)).astype(np.float32)
    probs = native.predict(crops)
    assert probs.shape == (20, 3) and np.abs(probs - exact.predict(crops)).max() <= PROB_TOLERANCE
    assert np.array_equal(low.predict(crops, precision="float32"), probs) or not NATIVE  # one float32 engine
    assert np.abs(low.predict(crops) - probs).max() <= BF16_DEVIATION
    theirs = exact.forward(crops, blobs=("ip1", "conv1"))
    for classifier in (native, low):
        features = classifier.forward(crops, blobs=("ip1", "conv1"), precision="float32")
        for name in ("ip1", "conv1"):
            assert np.allclose(features[name], theirs[name], rtol=1e-4, atol=1e-3), name


@pytest.mark.parametrize("batch_size", [10, 320])
def test_rechecks_carry_float32(published, batch_size):  # noqa: F811
    """margin_bound 2: every window rechecked in float32, also a single-window batch: float32's
    votes and probabilities, whatever bfloat16 said."""
    from lymph_cv.formats.caffe.blob import read_mean
    from lymph_cv.stages.evaluate import ParentEntry, Rechecks, WindowClassifier, evaluate_images

    mean = read_mean(published["mean"])
    entry = ParentEntry(1, "x", published["images"] / published["names"][0], 0)
    low = WindowClassifier(published["deploy"], published["model"], "cpu", "bfloat16")
    rechecks = Rechecks()
    ours = evaluate_images(low, [entry], mean, progress=False, batch_size=batch_size, margin_bound=2.0,
                           rechecks=rechecks)[0]
    assert rechecks.rechecked == rechecks.windows == 12
    exact = evaluate_images(WindowClassifier(published["deploy"], published["model"], "cpu", "float32"), [entry], mean,
                            progress=False)[0]
    assert np.abs(ours.probs - exact.probs).max() <= PROB_TOLERANCE and ours.votes.tolist() == exact.votes.tolist()
    raw = evaluate_images(low, [entry], mean, progress=False, margin_bound=0.0)[0]
    assert 0 < np.abs(raw.probs - exact.probs).max() <= BF16_DEVIATION  # bfloat16's own values, not rechecked


def test_a_net_plain_does_not_run_falls_back_to_torch(published, tmp_path):  # noqa: F811
    from lymph_cv.stages.evaluate import WindowClassifier

    text = published["deploy"].read_text()
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(text.replace('type: "ReLU"', 'type: "TanH"', 1))
    assert "TanH" in deploy.read_text()
    assert WindowClassifier(deploy, published["model"], "cpu", "bfloat16").backend == "torch"


def test_a_model_that_does_not_fit_says_so_natively_too(published, tmp_path):  # noqa: F811
    from lymph_cv.stages.evaluate import WindowClassifier

    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(published["deploy"].read_text().replace("num_output: 64", "num_output: 65", 1))
    messages = []
    for precision in ("float32", "bfloat16"):
        with pytest.raises(EvaluationError) as raised:
            WindowClassifier(deploy, published["model"], "cpu", precision)
        messages.append(str(raised.value))
    assert messages[0] == messages[1] and "does not fit deploy net" in messages[0]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_evaluate_on_the_cpu_never_imports_torch(published, runner, cli, tmp_path, monkeypatch, precision):  # noqa: F811
    """`lymph-cv evaluate --precision P --device cpu` in a fresh process: no torch in sys.modules at
    exit (where the native engine runs P), and the votes of the torch path in the same precision."""
    import json
    import os
    import subprocess
    import sys

    from test_evaluate import _published_args

    args = _published_args(published, tmp_path / "native", **{"--precision": precision, "--device": "cpu"})
    code = ("import sys\nfrom lymph_cv.cli import main\n"
            f"try:\n    main({[*args, '--skip-missing']!r})\nexcept SystemExit as exc:\n    status = exc.code\n"
            "else:\n    status = 0\n"
            "print('TORCH_LOADED=' + str('torch' in sys.modules))\nsys.exit(status)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parent.parent),
                                                                   os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    # bfloat16 without bfloat16 arithmetic runs float32 (lymph_cv.stages.evaluate.evaluate_fold)
    native = NATIVE if precision == "bfloat16" and cpu_has_bfloat16() else NATIVE_F32
    assert f"TORCH_LOADED={not native}" in done.stdout  # without the engine: torch's
    monkeypatch.setenv("LYMPH_CV_NATIVE", "0")  # the torch path (a real amxforward stays off too)
    torchs = runner.invoke(cli, _published_args(published, tmp_path / "torch", **{"--precision": precision})
                           + ["--skip-missing"])
    assert torchs.exit_code == 0, torchs.stderr
    records = [json.loads((tmp_path / name / "eval" / "fold_1" / "metrics.json").read_text())
               for name in ("native", "torch")]
    assert records[0]["confusion"] == records[1]["confusion"]
    rows = [(tmp_path / name / "eval" / "fold_1" / "images.csv").read_text().splitlines() for name in ("native", "torch")]
    votes = [[line.split(",")[:5 + 2 * len(records[0]["classes"])] for line in lines] for lines in rows]
    assert votes[0] == votes[1] and len(votes[0]) == 4  # decisions, windows, votes and vote fractions
