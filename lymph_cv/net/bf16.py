"""A deploy net's forward pass in bfloat16 up to its first non-spatial layer, the rest in float32.

On a CPU with AMX (Sapphire Rapids and later) oneDNN runs a convolution whose input, weights and
bias are all bfloat16 as an AMX kernel, about 5× the float32 rate; converting float32 tensors at
every call (``torch.backends.mkldnn.conv.fp32_precision = "bf16"``) loses most of that.  So the
leading run of Convolution (with its fused BatchNorm + Scale, lymph_cv.net.fuse), Pooling and ReLU
layers (:func:`bf16_prefix`) keeps its blobs bfloat16, with the weights converted once
(channels-last, in oneDNN's own layout on a CPU, cached against the blobs' versions); at the first other layer (InnerProduct, …)
the live blobs turn float32 and :meth:`CaffeNet.forward` runs the rest as usual.  Without AMX or
avx512_bf16 the same code runs on oneDNN's (or ATen's) slower bfloat16 kernels: same results,
more time.

A MAX pooling followed by a plain ReLU in place on its top (the tutorial net's pool1 → relu1) runs
on the tensor's bit patterns read as int16: a negative bfloat16 is a negative int16 and the
non-negative ones order as their values, so max(0, max over the window of the int16s) is exactly
relu(maxpool(x)) (a pooling pad then acts as −∞, as Caffe's does), and torch's int16 pooling is
faster than its bfloat16 one; the native :mod:`lymph_cv.net.maxpool16` (``make native``) does it
without the int64 indices torch's CPU pooling always writes.  (A negative NaN becomes 0 there
instead of NaN.)

The results differ from float32 by bfloat16's 8-bit significand: lymph_cv.stages.evaluate
rechecks in float32 every window whose decision margin is within its bound.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F

from lymph_cv.core.native import native_enabled
from lymph_cv.net.fuse import Plan, ReLUPlan
from lymph_cv.net.layers import pooled_size

#: The spatial layer types the bfloat16 prefix may hold.
BF16_TYPES = ("Convolution", "Pooling", "ReLU")


def _single(layer) -> bool:
    return len(layer.param.bottom) == 1 and len(layer.param.top) == 1


def _in_place_relu(layer, top: str) -> bool:
    return (layer.type_name == "ReLU" and not layer.slope and list(layer.param.bottom) == [top] == list(layer.param.top))


def bf16_prefix(layers: Sequence, plan: Plan) -> int:
    """Index of the first layer after the leading run (inputs aside) of Convolution (with its fused
    BatchNorm + Scale), Pooling and ReLU layers of one bottom and one top each: the part
    :class:`BFloat16Forward` runs in bfloat16."""
    index = 0
    while index < len(layers):
        layer = layers[index]
        if layer.is_input:
            index += 1
            continue
        if layer.type_name not in BF16_TYPES or not _single(layer):
            break
        index = plan[index][1] + 1 if index in plan else index + 1
    return index


def relu_pools(layers: Sequence, end: int) -> Dict[int, int]:
    """MAX Pooling index → the plain ReLU in place on its top that follows it, before ``end``."""
    pairs = {}
    for index in range(min(end, len(layers)) - 1):
        pool, relu = layers[index], layers[index + 1]
        if pool.type_name == "Pooling" and pool.method == "MAX" and _single(pool) and _in_place_relu(relu, pool.param.top[0]):
            pairs[index] = index + 1
    return pairs


def relu_maxpool_int16(x: torch.Tensor, pool) -> torch.Tensor:
    """relu(maxpool(x)) of a bfloat16 ``x`` with ``pool``'s geometry, exactly, through int16 bit patterns."""
    y = F.max_pool2d(x.view(torch.int16), pool.kernel, pool.stride, pool.pad, ceil_mode=pool.ceil)
    return y.clamp_(min=0).view(torch.bfloat16)


def int16_pooling(x: torch.Tensor) -> bool:
    """Whether torch pools int16 on ``x``'s device (its CPU kernels do)."""
    return x.device.type == "cpu"


def native_pool():
    """:mod:`lymph_cv.net.maxpool16`, or None when it is not built or ``LYMPH_CV_NATIVE=0``."""
    if not native_enabled():
        return None
    try:
        from lymph_cv.net import maxpool16
    except ImportError:  # an optional build that failed: torch's int16 pooling gives the same values
        return None
    return maxpool16


def native_relu_maxpool(module, x: torch.Tensor, pool) -> torch.Tensor:
    """:func:`relu_maxpool_int16` by :mod:`lymph_cv.net.maxpool16` (a channels-last CPU ``x``)."""
    n, c, h, w = x.shape
    out_h, out_w = (pooled_size(size, k, st, pd, pool.ceil) for size, k, st, pd in zip((h, w), pool.kernel, pool.stride, pool.pad))
    source = x.permute(0, 2, 3, 1).view(torch.int16)
    out = torch.empty((n, out_h, out_w, c), dtype=torch.int16)
    module.relu_maxpool(source.numpy(), out.numpy(), n, h, w, c, *pool.kernel, *pool.stride, *pool.pad, out_h, out_w,
                        torch.get_num_threads())
    return out.view(torch.bfloat16).permute(0, 3, 1, 2)


def _onednn(x: torch.Tensor) -> bool:
    """Whether oneDNN's own bfloat16 convolutions (prepacked weights, ReLU post-op) run on ``x``:
    they need avx512bw/vl/dq or avx_ne_convert; elsewhere ``F.conv2d`` takes ATen's kernels."""
    return (x.device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class BFloat16Forward:
    """``net``'s forward pass with its spatial prefix in bfloat16 (module docstring)."""

    def __init__(self, net):
        self.net = net
        layers = list(net.layers)
        self.layers = layers
        self.plan: Plan = net._fusion.plan if net.fuse_layers else {}
        self.end = bf16_prefix(layers, self.plan)
        self.relus: ReLUPlan = net._relus if net.fuse_layers else {}
        self.pools = relu_pools(layers, self.end)
        self._native = native_pool()
        self._cache: Dict[int, Tuple[tuple, torch.Tensor, Optional[torch.Tensor]]] = {}

    @property
    def layer_names(self) -> List[str]:
        """The layers that run in bfloat16."""
        return [layer.name for layer in self.layers[: self.end] if not layer.is_input]

    def _weights(self, index: int, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Convolution ``index``'s weights (fused when planned) as channels-last bfloat16, or in
        oneDNN's layout for ``x``'s shape on a CPU."""
        layer = self.layers[index]
        if index in self.plan:
            weight, bias = self.net._fusion.weights(index)
        else:
            weight, bias = layer.blobs[0], layer.blobs[1] if layer.bias_term else None
        packed = _onednn(x)
        key = tuple((id(t), t._version) for t in (weight, bias) if t is not None) + (packed, tuple(x.shape))
        cached = self._cache.get(index)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.no_grad():
            low = weight.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            if packed:
                # reordered once instead of at every call (a few ms each on 2 threads)
                low = torch._C._nn.mkldnn_reorder_conv2d_weight(low.to_mkldnn(), list(layer.pad), list(layer.stride),
                                                                list(layer.dilation), layer.group, list(x.shape))
            low_bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self._cache[index] = (key, low, low_bias)
        return low, low_bias

    def _conv(self, index: int, x: torch.Tensor, relu: bool) -> torch.Tensor:
        conv = self.layers[index]
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        weight, bias = self._weights(index, x)
        if _onednn(x):
            # oneDNN's post-op: rounding to bfloat16 keeps the sign, so max(·, 0) before or after it is the same
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.pad), list(conv.stride),
                                                            list(conv.dilation), conv.group, "relu" if relu else "none",
                                                            [], "")
        y = F.conv2d(x, weight, bias, conv.stride, conv.pad, conv.dilation, conv.group)
        return torch.relu_(y) if relu else y

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """All blobs by name, as :meth:`CaffeNet.forward` returns them; those only the bfloat16 layers
        read stay bfloat16."""
        # Inputs stay float32 until a layer reads them (the float32 layers may read them too).
        blobs: Dict[str, torch.Tensor] = {name: value.contiguous(memory_format=torch.channels_last) if value.dim() == 4
                                          else value for name, value in inputs.items()}
        done: Set[int] = set()
        for index in range(self.end):
            layer = self.layers[index]
            if layer.is_input or index in done:
                continue
            (bottom,) = layer.param.bottom
            (top,) = layer.param.top
            x = blobs[bottom]
            if layer.type_name == "Convolution":
                last = self.plan[index][1] if index in self.plan else index
                relu = index in self.relus
                blobs[top] = self._conv(index, x, relu)
                done.update(range(index, (self.relus[index] if relu else last) + 1))
            elif index in self.pools and int16_pooling(x):
                x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
                native = self._native is not None and x.device.type == "cpu"
                blobs[top] = native_relu_maxpool(self._native, x, layer) if native else relu_maxpool_int16(x, layer)
                done.update((index, self.pools[index]))
            else:
                blobs[top] = layer(x.to(torch.bfloat16))[0]
        # Only what the float32 layers read turns float32 (a conv1-sized blob costs a pass to convert).
        later = {name for layer in self.layers[self.end :] for name in layer.param.bottom}
        rest = {**inputs, **{name: value.float() for name, value in blobs.items() if name in later}}
        return {**blobs, **self.net.forward(rest, start=self.end)}
