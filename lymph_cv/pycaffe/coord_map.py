"""``caffe.coord_map``: how spatial coordinates map between tops of a NetSpec, and ``crop`` from it.

A layer's map is ``(axis, a, b)``, output coordinate = ``a`` × input coordinate + ``b``: ``a = 1/stride``
and ``b = (pad − (k_eff − 1)/2)/stride`` for convolution and pooling, ``a = stride`` and
``b = (k_eff − 1)/2 − pad`` for deconvolution, ``b = −offset`` for Crop, the identity for pointwise
layers; ``axis`` is the first spatial axis (``None``: any).  Maps compose along a path;
:func:`coord_map_from_to` walks both tops back to a common ancestor.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator, Tuple

import numpy as np

from lymph_cv.pycaffe.net_spec import Function, Top, layers as L

#: Layers that keep every coordinate where it is.
PASS_THROUGH_LAYERS = ("AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log", "LRN",
                       "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split", "TanH",
                       "Threshold")
WINDOW_LAYERS = ("Convolution", "Pooling", "Im2col")
LEGACY_KEYS = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"}
#: Crop's default first cropped axis (N, C, H, W: H).
CROP_AXIS = 2
IDENTITY = (None, 1, 0)

Map = Tuple[object, object, object]


class UndefinedMapException(Exception):
    """The layer has no coordinate map (e.g. InnerProduct)."""


class AxisMismatchException(Exception):
    """Two maps along a path start at different axes."""


def conv_params(fn: Function):
    """(axis, stride, effective kernel, pad) of a convolution-like layer, as arrays."""
    params = fn.params.get("convolution_param", fn.params)
    if LEGACY_KEYS & set(fn.params):
        raise AssertionError("cropping does not support legacy _h/_w params")
    kernel = np.array(params["kernel_size"], ndmin=1)
    dilation = np.array(params.get("dilation", 1), ndmin=1)
    return (params.get("axis", 1), np.array(params.get("stride", 1), ndmin=1),
            (kernel - 1) * dilation + 1, np.array(params.get("pad", 0), ndmin=1))


def crop_params(fn: Function):
    """(axis, offsets) of a Crop layer."""
    params = fn.params.get("crop_param", fn.params)
    return params.get("axis", CROP_AXIS), np.array(params.get("offset", 0), ndmin=1)


def coord_map(fn: Function) -> Map:
    """The layer's own map (see the module docstring)."""
    if fn.type_name in WINDOW_LAYERS:
        axis, stride, kernel, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (kernel - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, kernel, pad = conv_params(fn)
        return axis, stride, (kernel - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return IDENTITY
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset  # the axis before the first cropped one carries no coordinate
    raise UndefinedMapException(fn.type_name)


def compose(first: Map, then: Map) -> Map:
    """Map ``first`` followed by ``then``: scales multiply, ``then``'s shift is scaled by ``first``'s."""
    axis1, a1, b1 = first
    axis2, a2, b2 = then
    if axis1 is not None and axis2 is not None and axis1 != axis2:
        raise AxisMismatchException(f"axis {axis1} vs {axis2}")
    return (axis2 if axis1 is None else axis1), a1 * a2, a1 * b2 + b1


def inverse(mapping: Map) -> Map:
    """The map undoing ``mapping``."""
    axis, a, b = mapping
    return axis, 1 / a, -b / a


def _mapped_bottoms(top: Top):
    # Crop's second bottom only gives the size: coordinates flow through the first.
    return top.fn.inputs[:1] if top.fn.type_name == "Crop" else top.fn.inputs


def _walk(start: Top) -> Iterator[Tuple[Top, Map]]:
    """``start`` and its spatial ancestors, nearest first, each with the map from it to ``start``."""
    maps = {start: IDENTITY}
    queue = deque([start])
    while queue:
        top = queue.popleft()
        yield top, maps[top]
        try:
            own = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mapped_bottoms(top):
            if bottom not in maps:
                maps[bottom] = compose(maps[top], own)
                queue.append(bottom)


def coord_map_from_to(top_from: Top, top_to: Top) -> Map:
    """The map from ``top_from``'s coordinates to ``top_to``'s; RuntimeError when no spatial path joins them."""
    from_maps = dict(_walk(top_from))
    for top, to_map in _walk(top_to):
        if top in from_maps:
            return compose(to_map, inverse(from_maps[top]))
    raise RuntimeError("could not compute a map between the tops; are they connected by spatial layers?")


def crop(top_from: Top, top_to: Top) -> Top:
    """A Crop layer cutting ``top_from`` to ``top_to``'s extent at the offset their map implies."""
    axis, a, b = coord_map_from_to(top_from, top_to)
    a, b = np.asarray(a), np.asarray(b)
    if not (a == 1).all():
        raise AssertionError(f"scale mismatch on crop (a = {a})")
    if not (b <= 0).all():
        raise AssertionError(f"cannot crop negative offset (b = {b})")
    if not (np.round(b) == b).all():
        raise AssertionError(f"cannot crop noninteger offset (b = {b})")
    return L.Crop(top_from, top_to, crop_param=dict(axis=axis + 1, offset=list(-np.round(b).astype(int))))
