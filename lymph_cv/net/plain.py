"""A plain deploy net's float32 forward pass in numpy, without torch (:class:`PlainNet`).

Importing torch alone costs about 3 s of a 2-core host's start-up; evaluating the tutorial's
CIFAR10_quick-style deploy net (Convolution, Pooling MAX/AVE, ReLU, InnerProduct, Softmax, Dropout,
declared or Input-layer inputs) needs none of it.  The semantics are lymph_cv.net.layers' (Caffe's):
pooling sizes round up (or down with ``round_mode: FLOOR``) with the last-window-starts-inside rule,
AVE divides by the window clipped to the padded image, Dropout is the identity (TEST), in-place tops
hold the final value.  Anything else (groups, dilation, BatchNorm, Scale, …) raises
:class:`UnsupportedNet`, and the caller builds the torch net instead.

Convolutions are im2col (a strided view, copied in chunks of crops so the column buffer stays under
:data:`IM2COL_BYTES`) times the weights in one BLAS matmul; 4-D blobs live channels-last in memory
(each array is an N×C×H×W view of N×H×W×C storage), so the columns are copied in contiguous runs.
Poolings reduce rows, then columns, over the slices inside the image (no padded copy).  A batch runs
through all the layers :data:`MICRO_BATCH` crops at a time, so each layer reads blobs still in cache.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lymph_cv.errors import ConfigError, FormatError, LymphCVError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import blob_shape, blob_to_array, shape_compatible
from lymph_cv.formats.caffe.prototxt import filter_net
from lymph_cv.net.netspec import Shape, declared_inputs, fit_weights, pooled_size

PathLike = Union[str, os.PathLike]

#: The layer types :class:`PlainNet` runs.
PLAIN_TYPES = ("Input", "Convolution", "Pooling", "ReLU", "InnerProduct", "Softmax", "Dropout")
#: Upper bound of one convolution's column buffer: crops are taken in chunks that fit, so the columns
#: are still in cache when the matmul reads them (2 MB measured best: 2.5x the rate of 32 MB).
IM2COL_BYTES = 2 << 20
FLOAT = np.float32
#: Crops per pass through all the layers: a few crops' blobs stay in the cores' caches from one layer
#: to the next (a batch of 320 crops' conv1 output alone is 42 MB).
MICRO_BATCH = 64


class UnsupportedNet(LymphCVError):
    """The net holds a layer type or option :class:`PlainNet` does not run (use the torch net)."""


@dataclass
class PlainLayer:
    """One layer: its names, type, parsed parameters and learnable blobs (Caffe's shapes, float32)."""

    name: str
    type: str
    bottoms: List[str]
    tops: List[str]
    #: kernel/stride/pad (pairs), method, ceil, slope, axis, transpose, bias_term, num_output, …
    params: Dict[str, object] = field(default_factory=dict)
    blobs: List[np.ndarray] = field(default_factory=list)
    #: Blob shapes the layer expects (Caffe's), filled at build.
    blob_shapes: List[Shape] = field(default_factory=list)


def _pair(values: Sequence[int], h: Optional[int], w: Optional[int], default: Optional[int], what: str,
          layer: str) -> Tuple[int, int]:
    """Caffe's 2-D spatial parameter (explicit _h/_w, else 1 or 2 repeated values, else default);
    anything the torch layers would refuse is UnsupportedNet (they then say why)."""
    if h is not None or w is not None:
        if h is None or w is None or len(values):
            raise UnsupportedNet(f"layer {layer!r}: {what} given inconsistently")
        return int(h), int(w)
    values = [int(v) for v in values]
    if not values:
        if default is None:
            raise UnsupportedNet(f"layer {layer!r}: {what} missing")
        return default, default
    if len(values) > 2:
        raise UnsupportedNet(f"layer {layer!r}: {len(values)}-D {what}")
    return (values[0], values[-1])


def _opt(message, name: str) -> Optional[int]:
    return getattr(message, name) if message.HasField(name) else None


def _axis(axis: int, ndim: int, layer: str) -> int:
    if not -ndim <= axis < ndim:
        raise UnsupportedNet(f"layer {layer!r}: axis {axis} out of range for a {ndim}-D blob")
    return axis % ndim


def _spatial(shape: Shape, layer: PlainLayer) -> Tuple[int, int, int, int]:
    if len(shape) != 4:
        raise UnsupportedNet(f"layer {layer.name!r} ({layer.type}): {len(shape)}-D input {shape}")
    return tuple(int(d) for d in shape)


def _convolution(param: caffe_pb2.LayerParameter, layer: PlainLayer, shape: Shape) -> Shape:
    p = param.convolution_param
    n, c, h, w = _spatial(shape, layer)
    if p.axis != 1 or int(p.group) != 1 or not p.num_output:
        raise UnsupportedNet(f"layer {layer.name!r}: convolution axis {p.axis}, group {p.group}, "
                             f"num_output {p.num_output} (plain: axis 1, group 1)")
    if any(int(d) != 1 for d in p.dilation):
        raise UnsupportedNet(f"layer {layer.name!r}: dilation {list(p.dilation)}")
    kernel = _pair(p.kernel_size, _opt(p, "kernel_h"), _opt(p, "kernel_w"), None, "kernel", layer.name)
    stride = _pair(p.stride, _opt(p, "stride_h"), _opt(p, "stride_w"), 1, "stride", layer.name)
    pad = _pair(p.pad, _opt(p, "pad_h"), _opt(p, "pad_w"), 0, "pad", layer.name)
    out = [(size + 2 * pd - k) // s + 1 for size, k, s, pd in zip((h, w), kernel, stride, pad)]
    if min(out) < 1 or min(stride) < 1:
        raise UnsupportedNet(f"layer {layer.name!r}: kernel {kernel} does not fit input {shape}")
    outputs = int(p.num_output)
    layer.params.update(kernel=kernel, stride=stride, pad=pad, bias_term=bool(p.bias_term), num_output=outputs)
    layer.blob_shapes = [(outputs, c) + kernel] + ([(outputs,)] if p.bias_term else [])
    return (n, outputs, out[0], out[1])


def _pooling(param: caffe_pb2.LayerParameter, layer: PlainLayer, shape: Shape) -> Shape:
    p = param.pooling_param
    method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
    if method not in ("MAX", "AVE"):
        raise UnsupportedNet(f"layer {layer.name!r}: pool method {method}")
    n, c, h, w = _spatial(shape, layer)
    if p.global_pooling:
        if (p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w") or p.pad or p.pad_h
                or p.pad_w or p.stride != 1 or _opt(p, "stride_h") not in (None, 1) or _opt(p, "stride_w") not in (None, 1)):
            raise UnsupportedNet(f"layer {layer.name!r}: global_pooling with a kernel, pad or stride")
        kernel, stride, pad = (h, w), (1, 1), (0, 0)
    else:
        kernel = _pair([p.kernel_size] if p.HasField("kernel_size") else [], _opt(p, "kernel_h"), _opt(p, "kernel_w"),
                       None, "kernel_size", layer.name)
        stride = _pair([p.stride], _opt(p, "stride_h"), _opt(p, "stride_w"), 1, "stride", layer.name)
        pad = (int(p.pad_h), int(p.pad_w)) if p.HasField("pad_h") or p.HasField("pad_w") else (int(p.pad), int(p.pad))
    if any(2 * pd > k for k, pd in zip(kernel, pad)) or min(stride) < 1 or min(kernel) < 1:
        raise UnsupportedNet(f"layer {layer.name!r}: pad {pad}, kernel {kernel}, stride {stride}")
    ceil = p.round_mode == caffe_pb2.PoolingParameter.CEIL
    out = [pooled_size(size, k, s, pd, ceil) for size, k, s, pd in zip((h, w), kernel, stride, pad)]
    if min(out) < 1:
        raise UnsupportedNet(f"layer {layer.name!r}: kernel {kernel} does not fit input {shape}")
    layer.params.update(method=method, kernel=kernel, stride=stride, pad=pad, ceil=ceil)
    return (n, c, out[0], out[1])


def _inner_product(param: caffe_pb2.LayerParameter, layer: PlainLayer, shape: Shape) -> Shape:
    p = param.inner_product_param
    if not p.num_output:
        raise UnsupportedNet(f"layer {layer.name!r}: inner_product_param.num_output missing")
    axis = _axis(p.axis, len(shape), layer.name)
    k, outputs = math.prod(shape[axis:]), int(p.num_output)
    layer.params.update(axis=axis, transpose=bool(p.transpose), bias_term=bool(p.bias_term), num_output=outputs)
    layer.blob_shapes = [(k, outputs) if p.transpose else (outputs, k)] + ([(outputs,)] if p.bias_term else [])
    return tuple(shape[:axis]) + (outputs,)


def _same(param: caffe_pb2.LayerParameter, layer: PlainLayer, shape: Shape) -> Shape:
    if layer.type == "ReLU":
        layer.params["slope"] = float(param.relu_param.negative_slope)
    elif layer.type == "Softmax":
        layer.params["axis"] = _axis(param.softmax_param.axis, len(shape), layer.name)
    elif not 0.0 <= param.dropout_param.dropout_ratio < 1.0:
        raise UnsupportedNet(f"layer {layer.name!r}: dropout_ratio {param.dropout_param.dropout_ratio}")
    return tuple(shape)


#: type → parser (LayerParameter, PlainLayer, bottom shape) → top shape; it fills the layer's params.
_PARSERS = {"Convolution": _convolution, "Pooling": _pooling, "InnerProduct": _inner_product,
            "ReLU": _same, "Softmax": _same, "Dropout": _same}


# ----------------------------------------------------------------------------- computation
def _nhwc(x: np.ndarray) -> np.ndarray:
    """An N×C×H×W array as N×H×W×C (a view: free when the memory is channels-last)."""
    return x.transpose(0, 2, 3, 1)


def _convolve(layer: PlainLayer, x: np.ndarray) -> np.ndarray:
    """Caffe's convolution (cross-correlation) of an N×C×H×W ``x``, channels-last in memory out."""
    (kh, kw), (sh, sw), (ph, pw) = layer.params["kernel"], layer.params["stride"], layer.params["pad"]
    weights = layer.params["matrix"]  # (kh·kw·C, O), rows in the columns' order
    n, c, h, w = x.shape
    out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    source = _nhwc(x)
    if ph or pw:
        padded = np.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=FLOAT)
        padded[:, ph:ph + h, pw:pw + w] = source
        source = padded
    windows = np.lib.stride_tricks.sliding_window_view(source, (kh, kw), axis=(1, 2))
    windows = windows[:, : (out_h - 1) * sh + 1 : sh, : (out_w - 1) * sw + 1 : sw]  # (n, oh, ow, C, kh, kw)
    windows = windows.transpose(0, 1, 2, 4, 5, 3)
    per_crop = out_h * out_w * kh * kw * c
    chunk = max(1, min(n, IM2COL_BYTES // (per_crop * FLOAT().itemsize)))
    outputs = weights.shape[1]
    out = np.empty((n, out_h, out_w, outputs), dtype=FLOAT)
    flat = out.reshape(n * out_h * out_w, outputs)
    columns = np.empty((chunk, out_h, out_w, kh, kw, c), dtype=FLOAT)
    rows = out_h * out_w
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        np.copyto(columns[:count], windows[start:start + count])
        np.matmul(columns[:count].reshape(count * rows, -1), weights, out=flat[start * rows:(start + count) * rows])
    if layer.params["bias_term"]:
        flat += layer.blobs[1]
    return out.transpose(0, 3, 1, 2)


def _pool_axis(source: np.ndarray, axis: int, kernel: int, stride: int, pad: int, count: int,
               maximum: bool) -> np.ndarray:
    """MAX or sum over windows along one spatial ``axis`` of an N×H×W×C array: ``count`` outputs,
    each over the window's rows inside the image (pad rows never win a MAX and add 0 to a sum)."""
    size = source.shape[axis]
    shape = list(source.shape)
    shape[axis] = count
    out = np.full(shape, -np.inf if maximum else 0.0, dtype=FLOAT)
    for offset in range(kernel):
        # outputs i whose window row i·stride − pad + offset lies in [0, size)
        first = max(0, -(-(pad - offset) // stride))
        last = min(count, (size - 1 + pad - offset) // stride + 1)
        if last <= first:
            continue
        start = first * stride - pad + offset
        rows = [slice(None)] * source.ndim
        rows[axis] = slice(start, start + (last - first - 1) * stride + 1, stride)
        target = [slice(None)] * source.ndim
        target[axis] = slice(first, last)
        view = out[tuple(target)]
        if maximum:
            np.maximum(view, source[tuple(rows)], out=view)
        else:
            view += source[tuple(rows)]
    return out


def _pool(layer: PlainLayer, x: np.ndarray) -> np.ndarray:
    """MAX or AVE pooling with Caffe's sizes and divisors, rows then columns (the window is a
    rectangle); channels-last in memory out."""
    (kh, kw), (sh, sw), (ph, pw) = layer.params["kernel"], layer.params["stride"], layer.params["pad"]
    n, c, h, w = x.shape
    ceil = layer.params["ceil"]
    out_h, out_w = pooled_size(h, kh, sh, ph, ceil), pooled_size(w, kw, sw, pw, ceil)
    maximum = layer.params["method"] == "MAX"
    rows = _pool_axis(_nhwc(x), 1, kh, sh, ph, out_h, maximum)
    out = _pool_axis(rows, 2, kw, sw, pw, out_w, maximum)
    if not maximum:
        # Caffe's divisor: the window clipped to the padded image (pad cells count, beyond them not).
        ends_h = np.minimum(np.arange(out_h) * sh - ph + kh, h + ph) - (np.arange(out_h) * sh - ph)
        ends_w = np.minimum(np.arange(out_w) * sw - pw + kw, w + pw) - (np.arange(out_w) * sw - pw)
        out /= (ends_h[:, None] * ends_w[None, :]).astype(FLOAT)[None, :, :, None]
    return out.transpose(0, 3, 1, 2)


def _relu(layer: PlainLayer, x: np.ndarray, owned: bool) -> np.ndarray:
    slope = layer.params["slope"]
    if not slope:
        return np.maximum(x, 0, out=x if owned else None)
    return np.where(x > 0, x, x * FLOAT(slope)).astype(FLOAT, copy=False)


def _inner(layer: PlainLayer, x: np.ndarray) -> np.ndarray:
    axis = layer.params["axis"]
    lead = x.shape[:axis]
    if axis == 1 and x.ndim == 4 and _nhwc(x).flags.c_contiguous:
        # channels-last memory: the weights' columns permuted once instead of the blob every call
        flat = _nhwc(x).reshape(x.shape[0], -1)
        weights = layer.params["nhwc_matrix"]
    else:
        flat = np.ascontiguousarray(x).reshape(lead + (-1,))
        weights = layer.params["matrix"]
    y = flat @ weights
    if layer.params["bias_term"]:
        y += layer.blobs[1]
    return y


def _softmax(layer: PlainLayer, x: np.ndarray) -> np.ndarray:
    axis = layer.params["axis"]
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


class PlainNet:
    """A deploy net's TEST-phase forward pass in float32 numpy (module docstring).

    ``layers`` (:class:`PlainLayer`, net order, inputs aside), ``blob_shapes`` (name → shape with the
    declared batch), ``inputs``/``input`` (the input blobs / the first), ``outputs``/``output`` (blobs
    produced and never consumed, sorted as Caffe's set orders them / the first), ``input_shape``."""

    def __init__(self, name: str, layers: List[PlainLayer], blob_shapes: Dict[str, Shape], inputs: List[str],
                 outputs: List[str]):
        self.name, self.layers, self.blob_shapes = name, layers, blob_shapes
        self.inputs, self.outputs = inputs, outputs
        self.input = inputs[0] if inputs else None
        self.output = outputs[0] if outputs else None
        self.input_shape = blob_shapes[self.input] if self.input else None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def parse(cls, net_param: caffe_pb2.NetParameter) -> "PlainNet":
        """The layers of ``net_param``'s TEST phase, without weights; UnsupportedNet for anything
        beyond :data:`PLAIN_TYPES` and their plain options."""
        try:
            net_param = filter_net(net_param, caffe_pb2.TEST)
            declared = declared_inputs(net_param)
        except LymphCVError as exc:
            raise UnsupportedNet(f"net {net_param.name!r}: {exc.detail}") from exc
        blob_shapes: Dict[str, Shape] = {name: tuple(int(d) for d in shape) for name, shape in declared}
        inputs = [name for name, _ in declared]
        layers: List[PlainLayer] = []
        seen = set()
        for param in net_param.layer:
            if param.type not in PLAIN_TYPES:
                raise UnsupportedNet(f"layer {param.name!r}: type {param.type!r} (plain: {', '.join(PLAIN_TYPES)})")
            if param.name in seen or any(spec.name for spec in param.param):
                raise UnsupportedNet(f"layer {param.name!r}: duplicate name or shared parameters")
            seen.add(param.name)
            if param.type == "Input":
                shapes = [tuple(int(d) for d in s.dim) for s in param.input_param.shape]
                if len(param.bottom) or not len(param.top) or len(shapes) not in (1, len(param.top)):
                    raise UnsupportedNet(f"layer {param.name!r}: an Input layer with {len(shapes)} shapes")
                for index, top in enumerate(param.top):
                    blob_shapes[top] = shapes[0] if len(shapes) == 1 else shapes[index]
                    inputs.append(top)
                continue
            if len(param.bottom) != 1 or len(param.top) != 1 or param.bottom[0] not in blob_shapes:
                raise UnsupportedNet(f"layer {param.name!r}: takes one known bottom and one top")
            layer = PlainLayer(param.name, param.type, list(param.bottom), list(param.top))
            blob_shapes[layer.tops[0]] = _PARSERS[param.type](param, layer, blob_shapes[layer.bottoms[0]])
            layers.append(layer)
        available = set(inputs)
        for param in net_param.layer:
            available.difference_update(param.bottom)
            available.update(param.top)
        return cls(net_param.name, layers, blob_shapes, inputs, sorted(available))

    def load_weights(self, source: caffe_pb2.NetParameter, path: Optional[PathLike] = None) -> List[str]:
        """Copy blobs by layer name, as :meth:`lymph_cv.net.build.CaffeNet.load_weights` does (same
        FormatError messages); returns the layers with blobs copied."""
        by_name = {layer.name: layer for layer in self.layers}
        copied = []
        for src in (list(source.layer) if len(source.layer) else list(source.layers)):
            target = by_name.get(src.name)
            if target is None:
                continue
            if len(src.blobs) != len(target.blob_shapes):
                raise FormatError(f"layer {src.name!r}: the model has {len(src.blobs)} blobs, "
                                  f"the net expects {len(target.blob_shapes)}", path)
            arrays = []
            for index, (blob, shape) in enumerate(zip(src.blobs, target.blob_shapes)):
                if not shape_compatible(blob, shape):
                    raise FormatError(f"layer {src.name!r} blob {index}: the model has shape "
                                      f"{blob_shape(blob)}, the net expects {shape}", path)
                try:
                    arrays.append(np.ascontiguousarray(blob_to_array(blob).reshape(shape), dtype=FLOAT))
                except LymphCVError as exc:
                    raise FormatError(f"layer {src.name!r} blob {index}: {exc.detail}", path) from exc
            target.blobs = arrays
            self._prepare(target)
            if arrays:
                copied.append(src.name)
        return copied

    def _prepare(self, layer: PlainLayer) -> None:
        """The weight matrices the forward multiplies by, laid out once."""
        if layer.type == "Convolution":
            weight = layer.blobs[0]  # (O, C, kh, kw) → rows (kh, kw, C), the columns' order
            layer.params["matrix"] = np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0]))
        elif layer.type == "InnerProduct":
            weight = layer.blobs[0] if layer.params["transpose"] else layer.blobs[0].T  # (K, O)
            layer.params["matrix"] = np.ascontiguousarray(weight)
            shape = self.blob_shapes[layer.bottoms[0]]
            if layer.params["axis"] == 1 and len(shape) == 4:
                _, c, h, w = shape
                layer.params["nhwc_matrix"] = np.ascontiguousarray(
                    weight.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(c * h * w, -1))

    @classmethod
    def build(cls, net_param: caffe_pb2.NetParameter, weights: caffe_pb2.NetParameter,
              deploy: Optional[PathLike] = None, model: Optional[PathLike] = None) -> "PlainNet":
        """:meth:`parse` then the weights of ``weights`` (a caffemodel's NetParameter); a model that
        does not fit raises the EvaluationError lymph_cv.stages.evaluate.WindowClassifier raises."""
        net = cls.parse(net_param)
        fit_weights(net.load_weights, weights, [layer.name for layer in net.layers if layer.blob_shapes], model, deploy)
        return net

    # -- computation -------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, np.ndarray], start: int = 0, blobs: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        """Run ``layers[start:]`` on ``inputs`` (the input blobs, or with ``start`` every blob those
        layers read); returns the first output and the named ``blobs`` as float32 arrays (4-D ones
        N×C×H×W views of channels-last memory)."""
        if start == 0:
            missing = [name for name in self.inputs if name not in inputs]
            if missing:
                raise ConfigError(f"net {self.name!r}: missing input blob(s) {', '.join(missing)}", valid=self.inputs)
        values: Dict[str, np.ndarray] = {name: np.asarray(value, dtype=FLOAT) for name, value in inputs.items()}
        wanted = [self.output, *blobs]
        sizes = {len(v) if v.ndim else 0 for v in values.values()}
        if len(sizes) == 1 and self._micro_batched(start) and sizes.pop() > MICRO_BATCH:
            size = len(next(iter(values.values())))
            parts = [self._forward({k: v[i:i + MICRO_BATCH] for k, v in values.items()}, start, wanted)
                     for i in range(0, size, MICRO_BATCH)]
            return {name: np.concatenate([part[name] for part in parts]) for name in wanted}
        return self._forward(values, start, wanted)

    def _micro_batched(self, start: int) -> bool:
        """Whether layers[start:] run in micro-batches: they hold a convolution (whose blobs are what
        outgrows the caches; a tail of inner products is faster in one pass) and compute each batch
        item on its own (no InnerProduct or Softmax over axis 0: micro-batches give the batch's values)."""
        layers = self.layers[start:]
        return (any(layer.type == "Convolution" for layer in layers)
                and all(layer.params.get("axis", 1) != 0 for layer in layers))

    def _forward(self, values: Dict[str, np.ndarray], start: int, wanted: Sequence[str]) -> Dict[str, np.ndarray]:
        owned = set()  # blobs computed here: an in-place ReLU may overwrite them, never the caller's
        for layer in self.layers[start:]:
            (bottom,), (top,) = layer.bottoms, layer.tops
            if bottom not in values:
                raise ConfigError(f"net {self.name!r}: layer {layer.name!r} reads blob {bottom!r}, not given")
            x = values[bottom]
            if layer.type == "Convolution":
                y = _convolve(layer, x)
            elif layer.type == "Pooling":
                y = _pool(layer, x)
            elif layer.type == "ReLU":
                y = _relu(layer, x, bottom in owned and bottom == top)
            elif layer.type == "InnerProduct":
                y = _inner(layer, x)
            elif layer.type == "Softmax":
                y = _softmax(layer, x)
            else:  # Dropout at TEST: the identity (a copy unless in place, as Caffe's top is its own memory)
                y = x if bottom == top else x.copy()
            values[top] = y
            if y is not x:
                owned.add(top)
        unknown = [name for name in wanted if name not in values]
        if unknown:
            raise ConfigError(f"net {self.name!r}: no blob {', '.join(unknown)}", valid=sorted(values))
        return {name: values[name] for name in wanted}
