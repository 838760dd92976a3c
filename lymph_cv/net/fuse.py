"""Convolution + BatchNorm (global statistics) + Scale, in place on one blob, as one convolution;
BatchNorm + Scale in place as one batch-norm kernel (TRAIN too: γ and β get their gradients as before).

In a TEST net the three layers are an affine map per output channel, so the convolution's weights
and bias can absorb them: W' = W·k, b' = (b − mean)·k + β with k = γ / sqrt(var + eps).  The
result equals the three layers to float32 rounding (the tests hold it to 1e-5) at the cost of one
convolution; the intermediate blob is invisible anyway, since BatchNorm and Scale work in place.
Fused weights are recomputed only when a blob changed (test nets share the training net's blobs).

Without autograd on the CPU, a ReLU in place on a convolution's top (after its BatchNorm + Scale,
when those are fused) runs as oneDNN's post-op of that convolution (``relu_plan``): one pass over
the output instead of two, bitwise the same values, since the convolution is the same oneDNN
primitive ``F.conv2d`` runs and max(x, 0) is exact (tested).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

#: conv layer index → (BatchNorm index, Scale index)
Plan = Dict[int, Tuple[int, int]]
#: BatchNorm layer index → Scale layer index
Pairs = Dict[int, int]
#: conv layer index → index of the in-place ReLU that follows it (or its fused BatchNorm + Scale)
ReLUPlan = Dict[int, int]
#: The smallest batch for which ``F.conv2d`` takes oneDNN for any float32 CPU convolution
#: (ATen's use_mkldnn: below it, 1×1 and small single-image convolutions may take its own kernels,
#: whose rounding the fused primitive would not reproduce).
MIN_FUSED_BATCH = 16


def _in_place_scale(bn, scale) -> bool:
    """``scale`` is a learned per-channel Scale working in place on ``bn``'s in-place top."""
    if (bn.type_name, scale.type_name) != ("BatchNorm", "Scale") or len(bn.param.top) != 1:
        return False
    (top,) = bn.param.top
    return (list(bn.param.bottom) == [top] and list(scale.param.bottom) == [top] and list(scale.param.top) == [top]
            and scale.learned and scale.axis == 1 and scale.blobs[0].dim() == 1)


def scale_pairs(layers: Sequence) -> Pairs:
    """BatchNorm → Scale pairs in place: one batch-norm kernel applies γ and β (any phase)."""
    return {i: i + 1 for i in range(len(layers) - 1) if _in_place_scale(layers[i], layers[i + 1])}


def fusion_plan(layers: Sequence) -> Plan:
    """Conv → BatchNorm (global stats) → Scale runs, each in place on the convolution's top."""
    plan: Plan = {}
    for i in range(len(layers) - 2):
        conv, bn, scale = layers[i], layers[i + 1], layers[i + 2]
        if (conv.type_name, bn.type_name, scale.type_name) != ("Convolution", "BatchNorm", "Scale"):
            continue
        if list(bn.param.bottom) == list(conv.param.top) and _in_place_scale(bn, scale) and bn.use_global:
            plan[i] = (i + 1, i + 2)
    return plan


def relu_plan(layers: Sequence, plan: Plan) -> ReLUPlan:
    """Convolutions (alone or with their fused BatchNorm + Scale) followed by a plain ReLU in place
    on their top."""
    relus: ReLUPlan = {}
    for i, conv in enumerate(layers):
        if conv.type_name != "Convolution" or len(conv.param.bottom) != 1 or len(conv.param.top) != 1:
            continue
        after = plan[i][1] + 1 if i in plan else i + 1
        if after >= len(layers):
            continue
        relu = layers[after]
        (top,) = conv.param.top
        if relu.type_name == "ReLU" and not relu.slope and list(relu.param.bottom) == [top] == list(relu.param.top):
            relus[i] = after
    return relus


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def conv_relu_fusable(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` may run with its ReLU as a oneDNN post-op: a float32 CPU
    batch of at least :data:`MIN_FUSED_BATCH` with oneDNN enabled (then ``F.conv2d`` runs oneDNN too),
    outside CPU autocast (which would cast ``F.conv2d``'s operands, not the post-op primitive's)."""
    return (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] >= MIN_FUSED_BATCH
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and not _cpu_autocast())


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias, conv, relu: bool = False) -> torch.Tensor:
    """``conv``'s convolution of ``x`` with these weights, then max(·, 0) if ``relu``: fused into
    oneDNN's primitive where :func:`conv_relu_fusable`, else ``F.conv2d`` and an in-place ReLU."""
    if relu and conv_relu_fusable(x):
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.pad), list(conv.stride),
                                                        list(conv.dilation), conv.group, "relu", [], "")
    y = F.conv2d(x, weight, bias, conv.stride, conv.pad, conv.dilation, conv.group)
    return torch.relu_(y) if relu else y


class FusedConvolutions:
    """The fused weights of a plan, cached against the blobs' versions."""

    def __init__(self, layers: Sequence, plan: Plan):
        self.layers, self.plan = layers, plan
        self._cache: Dict[int, Tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _sources(conv, bn, scale) -> List[torch.Tensor]:
        return list(conv.blobs) + list(bn.blobs) + list(scale.blobs)

    def weights(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        conv, bn, scale = (self.layers[j] for j in (index,) + self.plan[index])
        key = tuple((id(t), t._version) for t in self._sources(conv, bn, scale))
        cached = self._cache.get(index)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.no_grad():
            mean, var = bn.global_stats()
            k = scale.blobs[0] * torch.rsqrt(var + bn.eps)
            weight = conv.blobs[0] * k.reshape(-1, 1, 1, 1)
            bias = conv.blobs[1] if conv.bias_term else torch.zeros_like(mean)
            bias = (bias - mean) * k
            if scale.bias_term:
                bias = bias + scale.blobs[1]
            weight = weight.contiguous(memory_format=torch.channels_last)
        self._cache[index] = (key, weight, bias)
        return weight, bias

    def forward(self, index: int, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """The fused convolution ``index`` of ``x`` (then max(·, 0) if ``relu``)."""
        conv = self.layers[index]
        weight, bias = self.weights(index)
        return conv2d(x, weight.to(x.dtype), bias.to(x.dtype), conv, relu)
