"""A built Caffe net (:class:`~lymph_cv.net.build.CaffeNet`) with its weights → an ONNX model.

Written from our net description, not traced: each layer's resolved parameters (kernel, stride,
pad, Caffe's rounding) become ONNX nodes through a registry, Caffe type → converter.  The batch
dimension is symbolic (``N``); the other input dimensions are the deploy net's.  Caffe's
semantics that ONNX lacks are spelled out:

* pooling rounds up and clips the last window at image + pad, and AVE divides by the window's
  part inside image + pad: an explicit ``Pad`` (−∞ for MAX, 0 for AVE), then the pool without
  padding (``count_include_pad=0``), then a ``Slice`` where Caffe drops a window starting in the pad;
* WITHIN_CHANNEL LRN is built from ``AveragePool``/``Pow``; BatchNorm's statistics are divided by
  its weight-sum blob; Scale/Bias blobs are reshaped to broadcast from their axis;
* in-place layers (ReLU, Dropout) get fresh value names (ONNX is single-assignment); the net's
  outputs keep their Caffe blob names.

:func:`verify` runs the export in onnxruntime on the same input as our forward pass.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from lymph_cv.errors import ConfigError, EvaluationError, LymphCVError, UnsupportedError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.model import read_caffemodel
from lymph_cv.formats.caffe.prototxt import read_net_prototxt
from lymph_cv.net.build import CaffeNet, build_net
from lymph_cv.net.layers import Layer, pooled_size

PathLike = Union[str, os.PathLike]

#: Softmax over one axis (not the coerced 2-D of older opsets) needs opset 13.
MIN_OPSET = 13
DEFAULT_OPSET = 17
#: The symbolic batch dimension.
BATCH = "N"
#: The exporter's name in the model's producer field.
PRODUCER = "lymph_cv"


def _onnx():
    try:
        import onnx
    except ImportError:  # an optional extra
        raise UnsupportedError("ONNX export needs the onnx package: pip install 'lymph_cv[onnx]'") from None
    return onnx


@dataclass
class _Graph:
    """Nodes and initializers being built, and the Caffe blob → current ONNX value mapping."""

    onnx: object
    shapes: Dict[str, tuple]  # Caffe blob → shape at build time (in-place layers keep it)
    top_hints: List[str] = field(default_factory=list)  # the value names wanted for the layer's tops
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    values: Dict[str, str] = field(default_factory=dict)
    used: set = field(default_factory=set)

    def name(self, wanted: str) -> str:
        """A value name not used yet, ``wanted`` if possible."""
        candidate, count = wanted, 1
        while candidate in self.used:
            count += 1
            candidate = f"{wanted}_{count}"
        self.used.add(candidate)
        return candidate

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str, **attributes) -> str:
        output = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [output], name=output, **attributes))
        return output


#: Caffe type → converter(graph, layer, input value names, top hint) → output value names.
Converter = Callable[[_Graph, Layer, List[str], str], List[str]]
CONVERTERS: Dict[str, Converter] = {}


def converts(*type_names: str) -> Callable[[Converter], Converter]:
    """Register a converter for Caffe layer types."""

    def decorate(function: Converter) -> Converter:
        for type_name in type_names:
            CONVERTERS[type_name] = function
        return function

    return decorate


def _weights(layer: Layer) -> List[np.ndarray]:
    return [blob.detach().cpu().numpy().astype(np.float32) for blob in layer.blobs]


@converts("Convolution")
def _convolution(g: _Graph, layer, inputs, hint):
    blobs = _weights(layer)
    names = [g.const(f"{layer.name}_W", blobs[0])] + ([g.const(f"{layer.name}_b", blobs[1])] if layer.bias_term else [])
    return [g.node("Conv", inputs + names, hint, kernel_shape=list(layer.kernel), strides=list(layer.stride),
                   pads=list(layer.pad) * 2, dilations=list(layer.dilation), group=layer.group)]


@converts("Pooling")
def _pooling(g: _Graph, layer, inputs, hint):
    (value,) = inputs
    shape = layer.top_shapes[0]
    if layer.param.pooling_param.global_pooling:
        op = "GlobalMaxPool" if layer.method == "MAX" else "GlobalAveragePool"
        return [g.node(op, [value], hint)]
    if any(layer.pad):
        ph, pw = layer.pad
        pads = g.const(f"{layer.name}_pads", np.array([0, 0, ph, pw, 0, 0, ph, pw], dtype=np.int64))
        fill = g.const(f"{layer.name}_fill", np.array(-np.inf if layer.method == "MAX" else 0.0, dtype=np.float32))
        value = g.node("Pad", [value, pads, fill], f"{layer.name}_padded", mode="constant")
    attributes = dict(kernel_shape=list(layer.kernel), strides=list(layer.stride), ceil_mode=int(layer.ceil))
    if layer.method == "AVE":
        attributes["count_include_pad"] = 0
    op = "MaxPool" if layer.method == "MAX" else "AveragePool"
    # What the pool gives on the padded input; Caffe drops a last window that starts in the pad.
    padded = [size + 2 * pad for size, pad in zip(g.shapes[layer.param.bottom[0]][2:], layer.pad)]
    onnx_hw = [pooled_size(size, k, s, 0, layer.ceil) for size, k, s in zip(padded, layer.kernel, layer.stride)]
    if onnx_hw == list(shape[2:]):
        return [g.node(op, [value], hint, **attributes)]
    pooled = g.node(op, [value], f"{layer.name}_pooled", **attributes)
    starts = g.const(f"{layer.name}_starts", np.array([0, 0], dtype=np.int64))
    ends = g.const(f"{layer.name}_ends", np.array(shape[2:], dtype=np.int64))
    axes = g.const(f"{layer.name}_axes", np.array([2, 3], dtype=np.int64))
    return [g.node("Slice", [pooled, starts, ends, axes], hint)]


@converts("LRN")
def _lrn(g: _Graph, layer, inputs, hint):
    (value,) = inputs
    if layer.across:
        return [g.node("LRN", [value], hint, size=layer.size, alpha=float(layer.alpha), beta=float(layer.beta),
                       bias=float(layer.k))]
    half = (layer.size - 1) // 2
    square = g.node("Mul", [value, value], f"{layer.name}_sq")
    mean = g.node("AveragePool", [square], f"{layer.name}_mean", kernel_shape=[layer.size] * 2, strides=[1, 1],
                  pads=[half] * 4, count_include_pad=1)
    scaled = g.node("Mul", [mean, g.const(f"{layer.name}_alpha", np.array(layer.alpha, np.float32))], f"{layer.name}_scaled")
    base = g.node("Add", [scaled, g.const(f"{layer.name}_one", np.array(1.0, np.float32))], f"{layer.name}_base")
    factor = g.node("Pow", [base, g.const(f"{layer.name}_beta", np.array(-layer.beta, np.float32))], f"{layer.name}_factor")
    return [g.node("Mul", [value, factor], hint)]


@converts("ReLU")
def _relu(g: _Graph, layer, inputs, hint):
    if layer.slope:
        return [g.node("LeakyRelu", inputs, hint, alpha=float(layer.slope))]
    return [g.node("Relu", inputs, hint)]


@converts("Dropout")
def _dropout(g: _Graph, layer, inputs, hint):
    # Deploy nets run in TEST, where Caffe's Dropout passes values through.
    return [g.node("Identity", inputs, hint)]


@converts("InnerProduct")
def _inner_product(g: _Graph, layer, inputs, hint):
    if layer.axis != 1:
        raise layer.unsupported(f"axis {layer.axis} in an ONNX export", ["1"])
    blobs = _weights(layer)
    flat = g.node("Flatten", inputs, f"{layer.name}_flat", axis=1)
    names = [flat, g.const(f"{layer.name}_W", blobs[0])]
    if layer.bias_term:
        names.append(g.const(f"{layer.name}_b", blobs[1]))
    return [g.node("Gemm", names, hint, transB=0 if layer.transpose else 1)]


@converts("Softmax")
def _softmax(g: _Graph, layer, inputs, hint):
    return [g.node("Softmax", inputs, hint, axis=layer.axis)]


@converts("BatchNorm")
def _batch_norm(g: _Graph, layer, inputs, hint):
    if not layer.use_global:
        raise layer.unsupported("batch statistics (use_global_stats false) in an ONNX export",
                                ["use_global_stats true (the TEST default)"])
    mean, var, weight = _weights(layer)
    factor = 0.0 if weight[0] == 0 else 1.0 / float(weight[0])
    channels = mean.shape[0]
    names = [g.const(f"{layer.name}_scale", np.ones(channels, np.float32)),
             g.const(f"{layer.name}_bias", np.zeros(channels, np.float32)),
             g.const(f"{layer.name}_mean", (mean * factor).astype(np.float32)),
             g.const(f"{layer.name}_var", (var * factor).astype(np.float32))]
    return [g.node("BatchNormalization", inputs + names, hint, epsilon=layer.eps)]


def _broadcastable(g: _Graph, layer, value: str, ndim: int, tail: Sequence[int], hint: str) -> str:
    """``value`` (a blob over axes [axis, axis+len(tail))) reshaped to broadcast against ``ndim`` axes."""
    shape = list(tail) + [1] * (ndim - layer.axis - len(tail))
    if layer.axis == 0 and shape:  # the operand carries the batch: leave it free
        shape[0] = -1
    return g.node("Reshape", [value, g.const(f"{hint}_shape", np.array(shape or [1], dtype=np.int64))], hint)


def _axes_operand(g: _Graph, layer, inputs, index: int, suffix: str) -> str:
    """The Scale/Bias operand: blob ``index`` (learned) or bottom[1], shaped to broadcast."""
    ndim = len(g.shapes[layer.param.bottom[0]])
    if layer.learned:
        array = _weights(layer)[index]
        shape = list(array.shape) + [1] * (ndim - layer.axis - array.ndim)
        return g.const(f"{layer.name}_{suffix}", array.reshape(shape or [1]))
    return _broadcastable(g, layer, inputs[1], ndim, layer.blob_shape, f"{layer.name}_{suffix}")


@converts("Scale")
def _scale(g: _Graph, layer, inputs, hint):
    scaled_hint = f"{layer.name}_scaled" if layer.bias_term else hint
    y = g.node("Mul", [inputs[0], _axes_operand(g, layer, inputs, 0, "s")], scaled_hint)
    if not layer.bias_term:
        return [y]
    bias = _weights(layer)[-1]
    ndim = len(g.shapes[layer.param.bottom[0]])
    shape = list(bias.shape) + [1] * (ndim - layer.axis - bias.ndim)
    return [g.node("Add", [y, g.const(f"{layer.name}_b", bias.reshape(shape or [1]))], hint)]


@converts("Bias")
def _bias(g: _Graph, layer, inputs, hint):
    return [g.node("Add", [inputs[0], _axes_operand(g, layer, inputs, 0, "b")], hint)]


@converts("Eltwise")
def _eltwise(g: _Graph, layer, inputs, hint):
    if layer.operation == "MAX":
        return [g.node("Max", inputs, hint)]
    if layer.operation == "PROD":
        return [g.node("Mul", inputs, hint)] if len(inputs) == 2 else [_chain(g, "Mul", inputs, hint)]
    terms = inputs
    if layer.coeffs is not None:
        terms = [x if c == 1 else g.node("Mul", [x, g.const(f"{layer.name}_c{i}", np.array(c, np.float32))],
                                          f"{layer.name}_t{i}")
                 for i, (x, c) in enumerate(zip(inputs, layer.coeffs))]
    return [g.node("Sum", terms, hint)]


def _chain(g: _Graph, op: str, inputs: Sequence[str], hint: str) -> str:
    value = inputs[0]
    for i, other in enumerate(inputs[1:], 1):
        value = g.node(op, [value, other], hint if i == len(inputs) - 1 else f"{hint}_{i}")
    return value


@converts("Concat")
def _concat(g: _Graph, layer, inputs, hint):
    return [g.node("Concat", inputs, hint, axis=layer.axis)]


def _reshape_to(g: _Graph, layer, value: str, top_shape: Sequence[int], hint: str) -> str:
    """Reshape to ``top_shape`` with the batch free: dim 0 is inferred (-1) from the others."""
    dims = [-1] + [int(d) for d in top_shape[1:]]
    return g.node("Reshape", [value, g.const(f"{layer.name}_shape", np.array(dims, dtype=np.int64))], hint)


@converts("Flatten", "Reshape")
def _reshape(g: _Graph, layer, inputs, hint):
    return [_reshape_to(g, layer, inputs[0], layer.top_shapes[0], hint)]


@converts("Split")
def _split(g: _Graph, layer, inputs, hint):
    return [g.node("Identity", inputs, name) for name in g.top_hints]


@converts("Sigmoid", "TanH")
def _unary(g: _Graph, layer, inputs, hint):
    return [g.node({"Sigmoid": "Sigmoid", "TanH": "Tanh"}[layer.type_name], inputs, hint)]


@converts("ELU")
def _elu(g: _Graph, layer, inputs, hint):
    return [g.node("Elu", inputs, hint, alpha=layer.alpha)]


@converts("PReLU")
def _prelu(g: _Graph, layer, inputs, hint):
    (slope,) = _weights(layer)
    ndim = len(g.shapes[layer.param.bottom[0]])
    shaped = slope.reshape([1]) if layer.shared else slope.reshape([-1] + [1] * (ndim - 2))
    return [g.node("PRelu", inputs + [g.const(f"{layer.name}_slope", shaped)], hint)]


def exportable_types() -> List[str]:
    """The Caffe layer types the exporter converts, sorted."""
    return sorted(CONVERTERS)


def to_onnx(net: CaffeNet, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
            outputs: Optional[Sequence[str]] = None):
    """The ONNX ``ModelProto`` of a built net with its current weights (a deploy net: inputs, no
    data or loss layers).  ``outputs``: the blobs to expose (default the net's outputs, e.g.
    ``prob``); a blob written in place is exposed with its final value."""
    onnx = _onnx()
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"--opset {opset}: expected {MIN_OPSET} to {onnx.defs.onnx_opset_version()} "
                          f"(this onnx package's newest)")
    g = _Graph(onnx, dict(net.blob_shapes))
    inputs = []
    for name in net.input_blobs:
        shape = list(net.blob_shapes[name])
        dims = [BATCH if (dynamic_batch and i == 0) else d for i, d in enumerate(shape)]
        inputs.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
        g.values[name] = g.name(name)
    last_writer = {}
    for index, layer in enumerate(net.layers):
        for top in layer.param.top:
            last_writer[top] = index
    for index, layer in enumerate(net.layers):
        if layer.is_input:
            continue
        converter = CONVERTERS.get(layer.type_name)
        if converter is None:
            raise UnsupportedError(f"layer {layer.name!r}: type {layer.type_name!r} has no ONNX export",
                                   valid=exportable_types())
        bottoms = [g.values[name] for name in layer.param.bottom]
        tops = list(layer.param.top)
        # The final writer of a blob names its value after it (unless an input holds the name).
        g.top_hints = [top if last_writer.get(top) == index and top not in net.input_blobs else f"{top}_{layer.name}"
                       for top in tops]
        for top, value in zip(tops, converter(g, layer, bottoms, g.top_hints[0])):
            g.values[top] = value
    exposed = []
    for name in (net.output_blobs if outputs is None else outputs):
        if name not in g.values or name in net.input_blobs:
            raise ConfigError(f"no blob {name!r} computed by net {net.name!r}", valid=sorted(set(g.values) - set(net.input_blobs)))
        shape = list(net.blob_shapes[name])
        dims = [BATCH if (dynamic_batch and i == 0) else d for i, d in enumerate(shape)]
        exposed.append(onnx.helper.make_tensor_value_info(g.values[name], onnx.TensorProto.FLOAT, dims))
    graph = onnx.helper.make_graph(g.nodes, net.name or "net", inputs, exposed, g.initializers)
    model = onnx.helper.make_model(graph, producer_name=PRODUCER,
                                   opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, _ir_version(onnx, opset))
    onnx.checker.check_model(model)
    return model


def _ir_version(onnx, opset: int) -> int:
    """The IR version that goes with ``opset`` (runtimes refuse a newer IR than they know)."""
    for entry in onnx.helper.VERSION_TABLE:  # (release, ir, opset, ...), oldest first
        if entry[2] >= opset:
            return entry[1]
    return onnx.IR_VERSION


def load_trained(deploy: PathLike, model: PathLike) -> CaffeNet:
    """The deploy net with the model's weights (every learnable layer must get some)."""
    net_param = read_net_prototxt(deploy)
    data = sorted({layer.type for layer in net_param.layer if layer.type.endswith("Data")})
    if data:
        raise ConfigError(f"expected a deploy net (input blobs, no data layers), got {', '.join(data)} layers: "
                          "a train/test net?", deploy)
    weights = read_caffemodel(model)
    net = build_net(net_param, caffe_pb2.TEST, source=deploy)
    try:
        copied = set(net.load_weights(weights, model))
    except LymphCVError as exc:
        raise EvaluationError(f"model {model} does not fit deploy net {deploy}: {exc.detail}") from exc
    missing = [name for name in net.params() if name not in copied]
    if missing:
        raise EvaluationError(f"model {model} has no weights for layer(s) {', '.join(missing)} of {deploy}")
    return net.eval()


def computed_blobs(net: CaffeNet) -> List[str]:
    """Every blob a layer computes (not the inputs), in net order."""
    return list(dict.fromkeys(top for layer in net.layers if not layer.is_input for top in layer.param.top))


@dataclass
class Check:
    """onnxruntime against our forward pass on the same input, per exposed blob."""

    max_abs_diff: float  # over every blob checked
    max_rel_diff: float  # max |difference| / max(1, max |our value|), over every blob
    blobs: Dict[str, float]  # blob → max |difference|
    batch: int


def verify(net: CaffeNet, model, batch: int = 2, seed: int = 0, scale: float = 64.0) -> Check:
    """Run ``model`` (an ONNX ModelProto, e.g. ``to_onnx(net, outputs=computed_blobs(net))``) in
    onnxruntime and ``net`` on the same seeded input (values like mean-subtracted pixels:
    normal × ``scale``); the largest differences of every blob the model exposes."""
    try:
        import onnxruntime
    except ImportError:
        raise UnsupportedError("checking the export needs onnxruntime: pip install 'lymph_cv[onnx]'") from None
    rng = np.random.default_rng(seed)
    feeds = {name: (rng.standard_normal((batch, *net.blob_shapes[name][1:])) * scale).astype(np.float32)
             for name in net.input_blobs}
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    theirs = session.run(names, feeds)
    unknown = [name for name in names if name not in net.blob_shapes]
    if unknown:  # the exporter names every exposed value after its blob
        raise EvaluationError(f"the ONNX outputs {', '.join(unknown)} are no blobs of net {net.name!r}")
    channels_last = net.channels_last
    net.channels_last = False
    try:
        with torch.inference_mode():
            ours = net.forward({k: torch.from_numpy(v) for k, v in feeds.items()})
    finally:
        net.channels_last = channels_last
    diffs, relative = {}, []
    for blob, value in zip(names, theirs):
        mine = ours[blob].float().cpu().numpy()
        if mine.shape != value.shape:
            raise EvaluationError(f"blob {blob!r}: onnxruntime gives shape {value.shape}, our net {mine.shape}")
        diffs[blob] = float(np.abs(mine - value).max()) if value.size else 0.0
        relative.append(diffs[blob] / max(1.0, float(np.abs(mine).max(initial=0.0))))
    return Check(max(diffs.values(), default=0.0), max(relative, default=0.0), diffs, batch)



def save(model, path: PathLike) -> Path:
    """Write ``model`` atomically."""
    from lymph_cv.core.fsutil import atomic_write_bytes

    atomic_write_bytes(path, model.SerializeToString())
    return Path(path)
