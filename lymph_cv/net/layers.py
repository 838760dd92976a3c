"""Caffe layer types as torch modules, behind a registry (type string → layer class).

A layer class is built as ``cls(param, bottom_shapes, ctx)`` from its ``LayerParameter``, the
shapes of its bottom blobs and a :class:`BuildContext`; it exposes ``top_shapes`` (one tuple per
top), ``blobs`` (a ``ParameterList`` of its learnable blobs, Caffe's order: weights then bias),
``fillers`` (one ``FillerParameter`` or ``None`` per blob) and ``forward(*bottoms) -> list`` of tops.
Register a new type with ``@register("TypeName")``.

Where torch's defaults differ from Caffe's, Caffe wins: pooling output sizes round up (with the
last-window-starts-inside rule), AVE pooling divides by the window clipped to the padded image,
dropout is inverted and identity outside TRAIN, and the loss is Caffe's clamped log-likelihood.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.errors import ConfigError, InputError, UnsupportedError

Shape = Tuple[int, ...]

#: Smallest normal float32, Caffe's floor for probabilities inside log().
FLT_MIN = 1.1754943508222875e-38

#: Accuracy tie rules: "higher_index" = 2015 Caffe (partial sort of (score, index) pairs, so a
#: tie with a higher class index beats the label); "wrong" = Caffe since 2017 (any tie is wrong).
ACCURACY_TIES = ("higher_index", "wrong")


@dataclass
class BuildContext:
    """What layers need to know besides their own parameters."""

    phase: int = caffe_pb2.TEST
    accuracy_ties: str = "higher_index"
    #: data-layer top name → shape, filled by the net builder before Data/Input layers are made.
    input_shapes: Dict[str, Shape] = field(default_factory=dict)


#: Caffe type string → layer class.
LAYERS: Dict[str, Type["Layer"]] = {}


def register(type_name: str) -> Callable[[Type["Layer"]], Type["Layer"]]:
    """Class decorator adding a layer class to :data:`LAYERS` under Caffe's type string."""

    def decorate(cls: Type["Layer"]) -> Type["Layer"]:
        LAYERS[type_name] = cls
        cls.type_name = type_name
        return cls

    return decorate


def supported_types() -> List[str]:
    """The layer type strings the port can build, sorted."""
    return sorted(LAYERS)


def layer_class(param: caffe_pb2.LayerParameter) -> Type["Layer"]:
    """The registered class for ``param.type``; :class:`UnsupportedError` listing the known ones."""
    cls = LAYERS.get(param.type)
    if cls is None:
        raise UnsupportedError(f"layer {param.name!r}: unsupported layer type {param.type!r}",
                               valid=supported_types())
    return cls


class Layer(nn.Module):
    """Base class: one Caffe layer. Subclasses set ``top_shapes`` and add blobs in ``__init__``."""

    type_name = ""
    #: Data-like layers have no bottoms; their tops are the net's inputs.
    is_input = False
    #: Loss layers get a default loss weight of 1 on their first top.
    is_loss = False

    def __init__(self, param: caffe_pb2.LayerParameter, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        super().__init__()
        self.param = param
        self.name = param.name
        self.phase = ctx.phase
        self.blobs = nn.ParameterList()
        self.fillers: List[Optional[caffe_pb2.FillerParameter]] = []
        self.top_shapes: List[Shape] = []
        self._check_counts(bottom_shapes)

    # Subclasses override to state how many bottoms/tops they take (min, max).
    bottoms_range: Tuple[int, int] = (1, 1)
    tops_range: Tuple[int, int] = (1, 1)

    def _check_counts(self, bottom_shapes: Sequence[Shape]) -> None:
        for what, count, (low, high) in (("bottom", len(self.param.bottom), self.bottoms_range),
                                         ("top", len(self.param.top), self.tops_range)):
            if not low <= count <= high:
                expected = str(low) if low == high else f"{low} to {high}"
                raise ConfigError(f"layer {self.name!r} ({self.type_name}) takes {expected} {what}(s), got {count}")

    def add_blob(self, shape: Shape, filler: Optional[caffe_pb2.FillerParameter]) -> None:
        """Add a learnable blob (zeros until the net's ``init_params``)."""
        self.blobs.append(nn.Parameter(torch.zeros(shape, dtype=torch.float32)))
        self.fillers.append(filler)

    def unsupported(self, what: str, valid: Sequence[str]) -> UnsupportedError:
        return UnsupportedError(f"layer {self.name!r} ({self.type_name}): {what}", valid=valid)


def _filler_or_none(message, field_name: str) -> Optional[caffe_pb2.FillerParameter]:
    return getattr(message, field_name) if message.HasField(field_name) else None


def _pair(repeated, h_value: Optional[int], w_value: Optional[int], default: Optional[int], what: str,
          layer: Layer) -> Tuple[int, int]:
    """Caffe's 2-D spatial parameter: explicit _h/_w, else the repeated (1 or 2 values), else default."""
    if h_value is not None or w_value is not None:
        if h_value is None or w_value is None:
            raise ConfigError(f"layer {layer.name!r}: {what}_h and {what}_w must be given together")
        if len(repeated):
            raise ConfigError(f"layer {layer.name!r}: give either {what} or {what}_h/{what}_w, not both")
        return int(h_value), int(w_value)
    values = list(repeated)
    if not values:
        if default is None:
            raise ConfigError(f"layer {layer.name!r}: {what} is required")
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise layer.unsupported(f"{len(values)}-D {what} (only 2-D spatial convolution)", ["1 or 2 values"])


def _opt(message, field_name: str) -> Optional[int]:
    return getattr(message, field_name) if message.HasField(field_name) else None


# --------------------------------------------------------------------------------------------
# Inputs


@register("Data")
class DataLayer(Layer):
    """DB-backed input; batches are fed by the data layer reader (``lymph_cv.net.datalayer``)."""

    is_input = True
    bottoms_range = (0, 0)
    tops_range = (1, 2)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        for top in param.top:
            if top not in ctx.input_shapes:
                raise ConfigError(f"layer {self.name!r}: shape of input blob {top!r} unknown")
            self.top_shapes.append(tuple(ctx.input_shapes[top]))


@register("Input")
class InputLayer(Layer):
    """Declared input blobs (``input_param.shape``), like a deploy net's ``input``/``input_dim``."""

    is_input = True
    bottoms_range = (0, 0)
    tops_range = (1, 1 << 16)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        shapes = [tuple(int(d) for d in s.dim) for s in param.input_param.shape]
        if len(shapes) not in (1, len(param.top)):
            raise ConfigError(f"layer {self.name!r}: give one input shape or one per top")
        for i, top in enumerate(param.top):
            self.top_shapes.append(ctx.input_shapes.get(top, shapes[0] if len(shapes) == 1 else shapes[i]))


# --------------------------------------------------------------------------------------------
# Vision


@register("Convolution")
class ConvolutionLayer(Layer):
    """2-D cross-correlation; weight (out, in/group, kh, kw), bias (out)."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.convolution_param
        if p.axis != 1:
            raise self.unsupported(f"axis {p.axis}", ["1"])
        (shape,) = bottom_shapes
        if len(shape) != 4:
            raise self.unsupported(f"{len(shape)}-D input {shape}", ["N x C x H x W"])
        if not p.HasField("num_output") or p.num_output == 0:
            raise ConfigError(f"layer {self.name!r}: convolution_param.num_output is required")
        self.kernel = _pair(p.kernel_size, _opt(p, "kernel_h"), _opt(p, "kernel_w"), None, "kernel", self)
        self.stride = _pair(p.stride, _opt(p, "stride_h"), _opt(p, "stride_w"), 1, "stride", self)
        pad_h = p.pad_h if p.HasField("pad_h") else None
        pad_w = p.pad_w if p.HasField("pad_w") else None
        self.pad = _pair(p.pad, pad_h, pad_w, 0, "pad", self)
        self.dilation = _pair(p.dilation, None, None, 1, "dilation", self)
        self.group = int(p.group)
        n, c, h, w = shape
        if self.group < 1 or c % self.group or p.num_output % self.group:
            raise ConfigError(f"layer {self.name!r}: group {self.group} must divide input channels {c} "
                              f"and num_output {p.num_output}")
        out = []
        for size, k, s, pd, d in zip((h, w), self.kernel, self.stride, self.pad, self.dilation):
            extent = d * (k - 1) + 1
            o = (size + 2 * pd - extent) // s + 1
            if o < 1:
                raise ConfigError(f"layer {self.name!r}: kernel {self.kernel} does not fit input {shape}")
            out.append(o)
        self.top_shapes.append((n, int(p.num_output), out[0], out[1]))
        self.add_blob((int(p.num_output), c // self.group) + self.kernel, _filler_or_none(p, "weight_filler"))
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            self.add_blob((int(p.num_output),), _filler_or_none(p, "bias_filler"))

    def forward(self, x):
        bias = self.blobs[1] if self.bias_term else None
        return [F.conv2d(x, self.blobs[0], bias, self.stride, self.pad, self.dilation, self.group)]


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool = True) -> int:
    """Caffe's pooling output size: rounds up by default; the last window must start inside image+pad."""
    span = size + 2 * pad - kernel
    pooled = (-(-span // stride) if ceil else span // stride) + 1
    if pad and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


@register("Pooling")
class PoolingLayer(Layer):
    """MAX / AVE pooling with Caffe's output size and AVE divisors (= torch ceil_mode, count_include_pad)."""

    METHODS = ("MAX", "AVE")

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.pooling_param
        method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
        if method not in self.METHODS:
            raise self.unsupported(f"pool method {method}", self.METHODS)
        self.method = method
        (shape,) = bottom_shapes
        if len(shape) != 4:
            raise self.unsupported(f"{len(shape)}-D input {shape}", ["N x C x H x W"])
        n, c, h, w = shape
        if p.global_pooling:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
                raise ConfigError(f"layer {self.name!r}: global_pooling takes no kernel size")
            self.kernel = (h, w)
        else:
            self.kernel = _pair([p.kernel_size] if p.HasField("kernel_size") else [],
                                _opt(p, "kernel_h"), _opt(p, "kernel_w"), None, "kernel_size", self)
        self.stride = (1, 1) if p.global_pooling else _pair(
            [p.stride], _opt(p, "stride_h"), _opt(p, "stride_w"), 1, "stride", self)
        if p.HasField("pad_h") or p.HasField("pad_w"):
            self.pad = (int(p.pad_h), int(p.pad_w))
        else:
            self.pad = (int(p.pad), int(p.pad))
        if p.global_pooling and any(self.pad):
            raise ConfigError(f"layer {self.name!r}: global pooling takes no padding")
        for k, pd in zip(self.kernel, self.pad):
            # torch's pooling kernels accept pad <= kernel/2; Caffe only needs pad < kernel.
            if 2 * pd > k:
                raise self.unsupported(f"pad {self.pad} larger than half the kernel {self.kernel}",
                                       ["pad <= kernel/2"])
        self.ceil = p.round_mode == caffe_pb2.PoolingParameter.CEIL
        out = [pooled_size(size, k, s, pd, self.ceil)
               for size, k, s, pd in zip((h, w), self.kernel, self.stride, self.pad)]
        self.top_shapes.append((n, c, out[0], out[1]))

    def forward(self, x):
        if self.method == "MAX":
            y = F.max_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil)
        else:
            y = F.avg_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil,
                             count_include_pad=True)
        return [y]


@register("LRN")
class LRNLayer(Layer):
    """Local response normalisation, ACROSS_CHANNELS or WITHIN_CHANNEL."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.lrn_param
        if p.local_size % 2 == 0:
            raise ConfigError(f"layer {self.name!r}: LRN local_size must be odd, got {p.local_size}")
        self.size, self.alpha, self.beta, self.k = int(p.local_size), p.alpha, p.beta, p.k
        self.across = p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS
        (shape,) = bottom_shapes
        if len(shape) != 4:
            raise self.unsupported(f"{len(shape)}-D input {shape}", ["N x C x H x W"])
        self.top_shapes.append(tuple(shape))

    def forward(self, x):
        if self.across:
            # torch: x / (k + alpha/n * sum of squares over n zero-padded channels)^beta — Caffe's formula.
            return [F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)]
        half = (self.size - 1) // 2
        mean_sq = F.avg_pool2d(x * x, self.size, 1, half, count_include_pad=True)
        return [x * (1 + self.alpha * mean_sq).pow(-self.beta)]


# --------------------------------------------------------------------------------------------
# Neurons and fully connected


@register("ReLU")
class ReLULayer(Layer):
    """max(x, 0) + negative_slope * min(x, 0); in place is fine (the top replaces the bottom)."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.slope = float(param.relu_param.negative_slope)
        self.top_shapes.append(tuple(bottom_shapes[0]))

    def forward(self, x):
        return [F.leaky_relu(x, self.slope) if self.slope else F.relu(x)]


@register("Dropout")
class DropoutLayer(Layer):
    """Inverted dropout (scaled by 1/(1-p) in TRAIN), identity in TEST."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.ratio = float(param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"layer {self.name!r}: dropout_ratio must be in [0, 1), got {self.ratio}")
        self.top_shapes.append(tuple(bottom_shapes[0]))

    def forward(self, x):
        if self.phase != caffe_pb2.TRAIN or self.ratio == 0.0:
            return [x]
        return [F.dropout(x, self.ratio, training=True)]


def _canonical_axis(axis: int, ndim: int, layer: Layer) -> int:
    if not -ndim <= axis < ndim:
        raise ConfigError(f"layer {layer.name!r}: axis {axis} out of range for a {ndim}-D blob")
    return axis % ndim


@register("InnerProduct")
class InnerProductLayer(Layer):
    """y = flatten(x, axis) · Wᵀ + b; W is (num_output, K), or (K, num_output) with transpose."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.inner_product_param
        (shape,) = bottom_shapes
        if not p.HasField("num_output") or p.num_output == 0:
            raise ConfigError(f"layer {self.name!r}: inner_product_param.num_output is required")
        self.axis = _canonical_axis(p.axis, len(shape), self)
        k = math.prod(shape[self.axis:])
        self.transpose = bool(p.transpose)
        self.num_output = int(p.num_output)
        self.top_shapes.append(tuple(shape[:self.axis]) + (self.num_output,))
        weight_shape = (k, self.num_output) if self.transpose else (self.num_output, k)
        self.add_blob(weight_shape, _filler_or_none(p, "weight_filler"))
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            self.add_blob((self.num_output,), _filler_or_none(p, "bias_filler"))

    def forward(self, x):
        flat = x.reshape(x.shape[:self.axis] + (-1,))
        weight = self.blobs[0].t() if self.transpose else self.blobs[0]
        return [F.linear(flat, weight, self.blobs[1] if self.bias_term else None)]


@register("Softmax")
class SoftmaxLayer(Layer):
    """Softmax over ``softmax_param.axis`` (default the channel axis)."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.axis = _canonical_axis(param.softmax_param.axis, len(bottom_shapes[0]), self)
        self.top_shapes.append(tuple(bottom_shapes[0]))

    def forward(self, x):
        return [torch.softmax(x, dim=self.axis)]


# --------------------------------------------------------------------------------------------
# Losses and metrics


def _soft_targets(scores: torch.Tensor, labels: torch.Tensor, axis: int) -> Optional[torch.Tensor]:
    """(M, C) target distributions when ``labels`` has the scores' own shape (soft targets, which
    lymph_cv's mixup and label smoothing feed; not a Caffe feature), else None."""
    if labels.dim() < 2 or tuple(labels.shape) != tuple(scores.shape) or scores.shape[axis] < 2:
        return None
    return labels.movedim(axis, -1).reshape(-1, scores.shape[axis])


def _scores_and_labels(scores: torch.Tensor, labels: torch.Tensor, axis: int, ignore_label: Optional[int]):
    """(M, C) scores with the class axis last, (M,) integer labels (ignored ones replaced by 0, a
    valid index) and the (M,) mask of labels that count; M = outer·inner positions.  Soft targets
    count as their most probable class."""
    classes = scores.shape[axis]
    moved = scores.movedim(axis, -1).reshape(-1, classes)
    soft = _soft_targets(scores, labels, axis)
    flat = soft.argmax(dim=1) if soft is not None else labels.reshape(-1)
    if flat.numel() != moved.shape[0]:
        raise ConfigError(f"label count {flat.numel()} does not match {moved.shape[0]} predictions")
    target = flat.to(torch.long)
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_label is None else target != ignore_label
    target = torch.where(valid, target, torch.zeros_like(target))
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
        raise InputError(f"labels must be in 0..{classes - 1} for {classes} classes, "
                         f"got {int(target.min())}..{int(target.max())}")
    return moved, target, valid


@register("SoftmaxWithLoss")
class SoftmaxWithLossLayer(Layer):
    """Mean of −log(max(p[label], FLT_MIN)) with Caffe's normalization modes and ignore_label.

    A label blob shaped like the scores holds soft targets t (lymph_cv's mixup and label smoothing):
    the loss is then Σ_c −t_c·log(max(p_c, FLT_MIN)) per position, every position valid."""

    is_loss = True
    bottoms_range = (2, 2)
    tops_range = (1, 2)
    NORMALIZATIONS = ("FULL", "VALID", "BATCH_SIZE", "NONE")

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.axis = _canonical_axis(param.softmax_param.axis, len(bottom_shapes[0]), self)
        lp = param.loss_param
        if lp.HasField("normalization"):
            self.normalization = caffe_pb2.LossParameter.NormalizationMode.Name(lp.normalization)
        elif lp.HasField("normalize"):
            self.normalization = "VALID" if lp.normalize else "BATCH_SIZE"
        else:
            self.normalization = "VALID"
        self.ignore_label = lp.ignore_label if lp.HasField("ignore_label") else None
        self.top_shapes.append(())
        if len(param.top) > 1:
            self.top_shapes.append(tuple(bottom_shapes[0]))

    def forward(self, scores, labels):
        soft = _soft_targets(scores, labels, self.axis)
        if soft is not None:
            flat = scores.movedim(self.axis, -1).reshape(-1, scores.shape[self.axis])
            nll = -torch.log_softmax(flat, dim=1)
            valid = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
        else:
            flat, safe_target, valid = _scores_and_labels(scores, labels, self.axis, self.ignore_label)
            nll = -torch.log_softmax(flat, dim=1).gather(1, safe_target[:, None])[:, 0]
        # Caffe clamps p at FLT_MIN in the value but its gradient is p − onehot unclamped.
        clamped = nll.detach().clamp(max=-math.log(FLT_MIN))
        nll = nll + (clamped - nll.detach())
        if soft is not None:
            nll = (nll * soft.to(nll.dtype)).sum(dim=1)
        total = (nll * valid).sum()
        outer = math.prod(scores.shape[:self.axis])
        if self.normalization == "FULL":
            norm = float(valid.numel())
        elif self.normalization == "VALID":
            norm = float(valid.sum().item())
        elif self.normalization == "BATCH_SIZE":
            norm = float(outer)
        else:
            norm = 1.0
        tops = [total / max(1.0, norm)]
        if len(self.param.top) > 1:
            tops.append(torch.softmax(scores, dim=self.axis))
        return tops


@register("Accuracy")
class AccuracyLayer(Layer):
    """Top-k accuracy; ties follow ``BuildContext.accuracy_ties`` (tutorial era: higher index wins)."""

    bottoms_range = (2, 2)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if ctx.accuracy_ties not in ACCURACY_TIES:
            raise ConfigError(f"accuracy tie rule {ctx.accuracy_ties!r}", valid=ACCURACY_TIES)
        self.ties = ctx.accuracy_ties
        ap = param.accuracy_param
        self.top_k = int(ap.top_k)
        self.axis = _canonical_axis(ap.axis, len(bottom_shapes[0]), self)
        classes = bottom_shapes[0][self.axis]
        if self.top_k > classes:
            raise ConfigError(f"layer {self.name!r}: top_k {self.top_k} exceeds the {classes} classes")
        self.ignore_label = ap.ignore_label if ap.HasField("ignore_label") else None
        self.top_shapes.append(())

    @torch.no_grad()
    def forward(self, scores, labels):
        flat, safe_target, valid = _scores_and_labels(scores, labels, self.axis, self.ignore_label)
        own = flat.gather(1, safe_target[:, None])
        index = torch.arange(flat.shape[1], device=flat.device)[None, :]
        if self.ties == "higher_index":
            ahead = (flat > own) | ((flat == own) & (index > safe_target[:, None]))
        else:
            ahead = (flat >= own) & (index != safe_target[:, None])
        correct = (ahead.sum(dim=1) < self.top_k) & valid
        count = int(valid.sum().item())
        value = correct.sum().to(torch.float32) / count if count else torch.zeros((), device=flat.device)
        return [value.to(torch.float32)]
