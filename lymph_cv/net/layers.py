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
from lymph_cv.net.netspec import pooled_size  # noqa: F401  (this module's API too: lymph_cv.net.bf16)

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
        if p.global_pooling and (any(self.pad) or (p.HasField("stride") and p.stride != 1)
                                 or any(p.HasField(f) and getattr(p, f) != 1 for f in ("stride_h", "stride_w"))):
            raise ConfigError(f"layer {self.name!r}: with global_pooling only pad = 0 and stride = 1")
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


# --------------------------------------------------------------------------------------------
# Layers of residual and other post-2015 nets (Caffe master; see ../shared/caffe-facts.md §13)


def _constant_filler(value: float) -> caffe_pb2.FillerParameter:
    return caffe_pb2.FillerParameter(type="constant", value=value)


def _broadcast(blob: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``blob`` (the bottom's axes axis..axis+k) viewed to broadcast over a ``ndim``-D bottom."""
    return blob.reshape((1,) * axis + tuple(blob.shape) + (1,) * (ndim - axis - blob.dim()))


class _SumOverRanks(torch.autograd.Function):
    """A tensor summed over the ranks of the default process group, and its gradient likewise
    (every rank's loss depends on every rank's tensor).  Unlike torch.distributed.nn's all_reduce it
    keeps no process group in the graph: a group a live graph held past destroy_process_group was
    torn down at interpreter exit and now and then aborted a rank there."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


@register("BatchNorm")
class BatchNormLayer(Layer):
    """Caffe's BatchNorm: normalisation only (no affine), three statistics blobs, never learned.

    Blobs: [0] Σ-weighted mean (C), [1] Σ-weighted unbiased variance (C), [2] the weight sum s (1);
    the global estimates are blob/s.  With batch statistics (``use_global_stats`` false, the
    default in TRAIN) every forward updates s ← λs+1, blob0 ← λ·blob0+μ, blob1 ← λ·blob1 +
    m/(m−1)·σ² (m values per channel), and normalises with the biased σ².
    """

    #: Caffe's refusal of learnable statistics (batch_norm_layer.cpp).
    LEARNED = "Cannot configure batch normalization statistics as layer parameters."
    BLOBS = 3

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.batch_norm_param
        (shape,) = bottom_shapes
        self.use_global = p.use_global_stats if p.HasField("use_global_stats") else ctx.phase == caffe_pb2.TEST
        self.fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        if self.eps <= 0:
            raise ConfigError(f"layer {self.name!r}: batch_norm_param.eps must be positive")
        channels = int(shape[1]) if len(shape) > 1 else 1
        if any(spec.lr_mult != 0 for spec in param.param):
            raise ConfigError(f"layer {self.name!r}: {self.LEARNED}")
        if len(param.param) > self.BLOBS:
            raise ConfigError(f"layer {self.name!r}: {len(param.param)} param specs for {self.BLOBS} blobs")
        # Caffe appends param { lr_mult: 0 } for each blob without one; snapshots carry them.
        own = caffe_pb2.LayerParameter()
        own.CopyFrom(param)
        while len(own.param) < self.BLOBS:
            own.param.add(lr_mult=0.0)
        self.param = own
        for blob_shape in ((channels,), (channels,), (1,)):
            self.add_blob(blob_shape, None)
            self.blobs[-1].requires_grad_(False)
        self.top_shapes.append(tuple(shape))
        #: synchronise the batch statistics over the ranks of a multi-process run (``--sync-bn``);
        #: Caffe keeps them per device, which is the default.
        self.sync = False

    def _synced_batch_norm(self, x):
        """Batch statistics over every rank's batch (two passes, as torch's own: the mean first)."""
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        sums = _SumOverRanks.apply(torch.cat([x.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        view = (1, -1) + (1,) * (x.dim() - 2)
        centred = x - mean.reshape(view)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / total
        y = centred / torch.sqrt(var.reshape(view) + self.eps)
        n = float(total.detach())
        correction = n / (n - 1.0) if n > 1 else 1.0
        return y, mean, var * correction

    def global_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) = blob/s, both 0 while s is 0 (computed on the device: no host sync)."""
        s = self.blobs[2]
        factor = torch.where(s == 0, torch.zeros_like(s), 1.0 / torch.where(s == 0, torch.ones_like(s), s))
        return self.blobs[0] * factor, self.blobs[1] * factor

    def forward(self, x, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        """Normalise ``x``; ``weight``/``bias`` (a following in-place Scale's γ, β) are applied in the
        same kernel when given (lymph_cv.net.fuse)."""
        shape = x.shape
        if x.dim() == 1:
            x = x.reshape(-1, 1)
        if self.use_global:
            mean, var = self.global_stats()
            y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
            return [y.reshape(shape)]
        channels = x.shape[1]
        per_channel = x.numel() // channels
        if self.sync:  # --sync-bn: the statistics of every rank's batch together
            y, mean, var = self._synced_batch_norm(x)
            if weight is not None:
                y = y * _broadcast(weight, 1, y.dim())
            if bias is not None:
                y = y + _broadcast(bias, 1, y.dim())
        elif per_channel > 1:
            # momentum 1 makes torch's running buffers exactly μ and the m/(m−1)-corrected σ².
            mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
            var = torch.ones(channels, dtype=x.dtype, device=x.device)
            y = F.batch_norm(x, mean, var, weight, bias, True, 1.0, self.eps)
        else:
            # one value per channel: σ² = 0 (Caffe's correction factor is 1 then); torch refuses m = 1.
            mean = x.detach().reshape(channels)
            var = torch.zeros_like(mean)
            y = (x - x.detach()) / math.sqrt(self.eps)
            if weight is not None:
                y = y * _broadcast(weight, 1, y.dim())
            if bias is not None:
                y = y + _broadcast(bias, 1, y.dim())
        with torch.no_grad():
            self.blobs[2].mul_(self.fraction).add_(1.0)
            self.blobs[0].mul_(self.fraction).add_(mean.detach().to(self.blobs[0].dtype))
            self.blobs[1].mul_(self.fraction).add_(var.detach().to(self.blobs[1].dtype))
        return [y.reshape(shape)]


class _AxesLayer(Layer):
    """Scale and Bias: a blob over the bottom's axes [axis, axis+num_axes), learned or bottom[1]."""

    bottoms_range = (1, 2)
    #: the LayerParameter field holding axis/num_axes/filler, and the value of an absent filler.
    param_field = ""
    default_value = 0.0

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = getattr(param, self.param_field)
        self.axis, self.blob_shape = self._axes(p, bottom_shapes)
        self.learned = len(bottom_shapes) == 1
        if self.learned:
            self.add_blob(self.blob_shape, p.filler if p.HasField("filler") else _constant_filler(self.default_value))
        self.top_shapes.append(tuple(bottom_shapes[0]))

    def _axes(self, p, bottom_shapes) -> Tuple[int, Shape]:
        """(axis, blob shape) per Caffe's scale/bias layer: the second bottom's shape must match exactly."""
        shape = tuple(bottom_shapes[0])
        if len(bottom_shapes) == 2:
            other = tuple(bottom_shapes[1])
            if not other:
                return 0, other
            axis = _canonical_axis(p.axis, len(shape), self)
            if shape[axis:axis + len(other)] != other:
                raise ConfigError(f"layer {self.name!r}: bottom[1] shape {other} must equal bottom[0] "
                                  f"shape {shape} from axis {axis}")
            return axis, other
        if p.num_axes < -1:
            raise ConfigError(f"layer {self.name!r}: num_axes must be -1 or non-negative, got {p.num_axes}")
        if p.num_axes == 0:
            return 0, ()
        axis = _canonical_axis(p.axis, len(shape), self)
        end = len(shape) if p.num_axes == -1 else axis + p.num_axes
        if end > len(shape):
            raise ConfigError(f"layer {self.name!r}: axis {axis} + num_axes {p.num_axes} exceeds the "
                              f"{len(shape)}-D bottom")
        return axis, shape[axis:end]


@register("Scale")
class ScaleLayer(_AxesLayer):
    """y = x · s (+ b): ``s`` learned (filler default constant 1) or bottom[1]; optional bias blob."""

    param_field = "scale_param"
    default_value = 1.0

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.bias_term = bool(param.scale_param.bias_term)
        if self.bias_term:
            self.add_blob(self.blob_shape, _filler_or_none(param.scale_param, "bias_filler"))

    def forward(self, x, *scale):
        s = self.blobs[0] if self.learned else scale[0]
        y = x * _broadcast(s, self.axis, x.dim())
        if self.bias_term:
            y = y + _broadcast(self.blobs[-1], self.axis, x.dim())
        return [y]


@register("Bias")
class BiasLayer(_AxesLayer):
    """y = x + b: ``b`` learned (filler default constant 0) or bottom[1]."""

    param_field = "bias_param"

    def forward(self, x, *bias):
        b = self.blobs[0] if self.learned else bias[0]
        return [x + _broadcast(b, self.axis, x.dim())]


class _QuotientProduct(torch.autograd.Function):
    """Eltwise PROD with ``stable_prod_grad: false``: dxᵢ = dy · y / xᵢ, as Caffe computes it."""

    @staticmethod
    def forward(ctx, *xs):
        y = xs[0]
        for x in xs[1:]:
            y = y * x
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, *xs = ctx.saved_tensors
        return tuple(dy * y / x for x in xs)


@register("Eltwise")
class EltwiseLayer(Layer):
    """SUM (with coefficients), PROD or MAX of equally shaped bottoms.

    MAX follows Caffe's CPU loop: bottom1 wins a tie with bottom0, later bottoms must be strictly
    greater; the gradient goes to the chosen bottom only.
    """

    bottoms_range = (2, 1 << 16)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.eltwise_param
        self.operation = caffe_pb2.EltwiseParameter.EltwiseOp.Name(p.operation)
        shapes = {tuple(s) for s in bottom_shapes}
        if len(shapes) != 1:
            raise ConfigError(f"layer {self.name!r}: Eltwise bottoms must have one shape, got "
                              f"{', '.join(map(str, bottom_shapes))}")
        coeffs = list(p.coeff)
        if coeffs and self.operation == "PROD":
            raise ConfigError(f"layer {self.name!r}: Eltwise layer only takes coefficients for summation.")
        if coeffs and len(coeffs) != len(bottom_shapes):
            raise ConfigError(f"layer {self.name!r}: Eltwise takes one coefficient per bottom blob "
                              f"({len(bottom_shapes)}), got {len(coeffs)}")
        self.coeffs = [float(c) for c in coeffs] if coeffs and self.operation == "SUM" else None
        self.stable = bool(p.stable_prod_grad)
        self.top_shapes.append(tuple(bottom_shapes[0]))

    def forward(self, *xs):
        if self.operation == "SUM":
            if self.coeffs is None:
                y = xs[0]
                for x in xs[1:]:
                    y = y + x
                return [y]
            y = xs[0] * self.coeffs[0] if self.coeffs[0] != 1 else xs[0]
            for c, x in zip(self.coeffs[1:], xs[1:]):
                y = y + x * c if c != 1 else y + x
            return [y]
        if self.operation == "PROD":
            if not self.stable:
                return [_QuotientProduct.apply(*xs)]
            y = xs[0]
            for x in xs[1:]:
                y = y * x
            return [y]
        y = torch.where(xs[0] > xs[1], xs[0], xs[1])
        for x in xs[2:]:
            y = torch.where(x > y, x, y)
        return [y]


@register("Concat")
class ConcatLayer(Layer):
    """Bottoms joined along ``axis`` (legacy ``concat_dim``); the other dimensions must agree."""

    bottoms_range = (1, 1 << 16)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise ConfigError(f"layer {self.name!r}: Either axis or concat_dim should be specified; not both.")
        first = tuple(bottom_shapes[0])
        if p.HasField("concat_dim"):
            if p.concat_dim >= len(first):
                raise ConfigError(f"layer {self.name!r}: concat_dim {p.concat_dim} out of range for a "
                                  f"{len(first)}-D blob")
            self.axis = int(p.concat_dim)
        else:
            self.axis = _canonical_axis(p.axis, len(first), self)
        total = 0
        for shape in bottom_shapes:
            shape = tuple(shape)
            if len(shape) != len(first) or shape[:self.axis] + shape[self.axis + 1:] != \
                    first[:self.axis] + first[self.axis + 1:]:
                raise ConfigError(f"layer {self.name!r}: bottom shapes {', '.join(map(str, bottom_shapes))} "
                                  f"differ outside the concat axis {self.axis}")
            total += shape[self.axis]
        self.top_shapes.append(first[:self.axis] + (total,) + first[self.axis + 1:])

    def forward(self, *xs):
        return [xs[0] if len(xs) == 1 else torch.cat(xs, dim=self.axis)]


@register("Flatten")
class FlattenLayer(Layer):
    """Axes ``axis``..``end_axis`` merged into one (C order)."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.flatten_param
        shape = tuple(bottom_shapes[0])
        self.start = _canonical_axis(p.axis, len(shape), self)
        self.end = _canonical_axis(p.end_axis, len(shape), self)
        if self.end < self.start:
            raise ConfigError(f"layer {self.name!r}: end_axis {p.end_axis} comes before axis {p.axis}")
        self.top_shapes.append(shape[:self.start] + (math.prod(shape[self.start:self.end + 1]),)
                               + shape[self.end + 1:])

    def forward(self, x):
        return [x.flatten(self.start, self.end)]


@register("Reshape")
class ReshapeLayer(Layer):
    """The bottom's axes [axis, axis+num_axes) replaced by ``shape``: 0 copies a dim, one −1 is inferred."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.reshape_param
        shape = tuple(bottom_shapes[0])
        ndim = len(shape)
        start = p.axis if p.axis >= 0 else ndim + p.axis + 1
        if not 0 <= start <= ndim:
            raise ConfigError(f"layer {self.name!r}: reshape axis {p.axis} out of range for a {ndim}-D blob")
        if p.num_axes < -1:
            raise ConfigError(f"layer {self.name!r}: num_axes must be >= -1, got {p.num_axes}")
        end = ndim if p.num_axes == -1 else start + p.num_axes
        if end > ndim:
            raise ConfigError(f"layer {self.name!r}: axis + num_axes exceeds the {ndim}-D bottom")
        dims = [int(d) for d in p.shape.dim]
        if dims.count(-1) > 1:
            raise ConfigError(f"layer {self.name!r}: reshape_param.shape takes at most one -1")
        for i, d in enumerate(dims):
            if d == 0 and start + i >= ndim:
                raise ConfigError(f"layer {self.name!r}: dim 0 at position {i} has no bottom axis to copy")
            if d < -1:
                raise ConfigError(f"layer {self.name!r}: reshape dims must be >= -1, got {d}")
        self.span, self.dims = (start, end), dims
        self.top_shapes.append(self._top(shape))

    def _top(self, shape: Shape) -> Shape:
        start, end = self.span
        new = [shape[start + i] if d == 0 else d for i, d in enumerate(self.dims)]
        top = list(shape[:start]) + new + list(shape[end:])
        known = math.prod(v for v in top if v != -1)
        total = math.prod(shape)
        if -1 in top:
            if known == 0 or total % known:
                raise ConfigError(f"layer {self.name!r}: cannot infer -1 reshaping {tuple(shape)} to "
                                  f"{tuple(self.dims)}")
            top[top.index(-1)] = total // known
        if math.prod(top) != total:
            raise ConfigError(f"layer {self.name!r}: reshape {tuple(shape)} to {tuple(top)} changes the count")
        return tuple(top)

    def forward(self, x):
        return [x.reshape(self._top(tuple(x.shape)))]


@register("Split")
class SplitLayer(Layer):
    """The bottom copied to every top; autograd sums the tops' gradients, as Caffe's backward does."""

    tops_range = (1, 1 << 16)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.top_shapes.extend(tuple(bottom_shapes[0]) for _ in param.top)

    def forward(self, x):
        return [x] * len(self.param.top)


def _same_shape_layer(fn_name: str, type_name: str, doc: str):
    """Register a parameter-free element-wise layer computing ``fn(x)``."""

    @register(type_name)
    class Elementwise(Layer):
        __doc__ = doc

        def __init__(self, param, bottom_shapes, ctx):
            super().__init__(param, bottom_shapes, ctx)
            self.top_shapes.append(tuple(bottom_shapes[0]))

        def forward(self, x):
            return [getattr(torch, fn_name)(x)]

    Elementwise.__name__ = Elementwise.__qualname__ = f"{type_name}Layer"
    return Elementwise


SigmoidLayer = _same_shape_layer("sigmoid", "Sigmoid", "y = 1/(1+e^−x); dx = dy·y(1−y).")
TanHLayer = _same_shape_layer("tanh", "TanH", "y = tanh x; dx = dy(1−y²).")


@register("ELU")
class ELULayer(Layer):
    """y = max(x,0) + α(e^min(x,0) − 1); dx = dy · (x > 0 ? 1 : y + α)."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.alpha = float(param.elu_param.alpha)
        self.top_shapes.append(tuple(bottom_shapes[0]))

    def forward(self, x):
        return [F.elu(x, self.alpha)]


@register("PReLU")
class PReLULayer(Layer):
    """y = max(x,0) + a_c·min(x,0), slopes per channel (or one shared), filler default 0.25."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.prelu_param
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2 and not p.channel_shared:
            raise ConfigError(f"layer {self.name!r}: PReLU needs a channel axis (or channel_shared)")
        self.shared = bool(p.channel_shared)
        filler = p.filler if p.HasField("filler") else _constant_filler(0.25)
        self.add_blob(() if self.shared else (shape[1],), filler)
        self.top_shapes.append(shape)

    def forward(self, x):
        slope = self.blobs[0].reshape(1) if self.shared else self.blobs[0]
        return [F.prelu(x, slope)]
