"""Layers that pycaffe users and Caffe's own Python tests need: DummyData, Silence and Python.

Registered in :data:`lymph_cv.net.layers.LAYERS` like the others (``lymph_cv.net`` imports this
module, so building any net sees them).

* ``DummyData``: tops of given shapes (``shape`` or the legacy num/channels/height/width lists, one
  entry for all tops or one per top) filled by ``data_filler`` (none: constant 0).  As in Caffe a
  constant-filled top is filled once and then left alone (``refill`` is False for it), so data a
  pycaffe user writes into it survives forward passes; other fillers draw anew on every forward.
* ``Silence``: consumes its bottoms, produces nothing; their diffs become zero.
* ``Python``: ``python_param { module layer param_str }``; the class is imported from ``sys.path``
  and called with the LayerParameter, gets ``param_str``, ``phase`` and ``blobs`` (``add_blob``),
  and its ``setup``/``reshape``/``forward``/``backward`` run on numpy blobs
  (:class:`lymph_cv.net.blobs.ArrayBlob`).  Inside the torch engine it is one autograd function, so
  it trains in ``lymph-cv train`` and pycaffe alike.  Exceptions from the user's code propagate as
  they are (Caffe's test expects the RuntimeError of ``setup``).
"""
from __future__ import annotations

import importlib
from typing import List, Sequence

import numpy as np
import torch

from lymph_cv.errors import ConfigError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.net.blobs import ArrayBlob, TensorBlob, push_host
from lymph_cv.net.fillers import fill
from lymph_cv.net.layers import Layer, register

#: Tops/bottoms a layer without a natural limit may have.
MANY = 1 << 16
#: Legacy DummyData dimension lists, in blob order.
LEGACY_DIMS = ("num", "channels", "height", "width")
#: DummyData's filler stream: a fixed seed keeps nets reproducible.
DUMMY_SEED = 1701


def _per_top(values: Sequence, count: int, what: str, layer: Layer) -> list:
    values = list(values)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ConfigError(f"layer {layer.name!r}: {what} needs 1 or {count} entries (one per top), got {len(values)}")
    return values


@register("DummyData")
class DummyDataLayer(Layer):
    """Filled tops of fixed shapes (see the module docstring)."""

    bottoms_range = (0, 0)
    tops_range = (1, MANY)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.dummy_data_param
        count = len(param.top)
        legacy = [list(getattr(p, name)) for name in LEGACY_DIMS]
        if len(p.shape):
            if any(legacy):
                raise ConfigError(f"layer {self.name!r}: give either shape or num/channels/height/width")
            shapes = [tuple(int(d) for d in s.dim) for s in _per_top(p.shape, count, "shape", self)]
        elif any(legacy):
            columns = [_per_top(values, count, name, self) for name, values in zip(LEGACY_DIMS, legacy)]
            shapes = [tuple(int(column[i]) for column in columns) for i in range(count)]
        else:
            raise ConfigError(f"layer {self.name!r}: dummy_data_param needs shape or num/channels/height/width")
        fillers = list(p.data_filler) or [caffe_pb2.FillerParameter()]
        self.data_fillers = _per_top(fillers, count, "data_filler", self)
        self.top_shapes.extend(shapes)
        #: per top: drawn again on every forward (a constant filler fills once).
        self.refill = [f.type != "constant" for f in self.data_fillers]
        self.generator = torch.Generator().manual_seed(DUMMY_SEED)
        # no inputs tell the device: an empty buffer follows the module's .to()
        self.register_buffer("device_probe", torch.empty(0), persistent=False)

    def forward(self):
        tops = []
        for shape, filler in zip(self.top_shapes, self.data_fillers):
            top = torch.empty(shape, dtype=torch.float32)
            fill(top, filler, self.generator)
            tops.append(top.to(self.device_probe.device))
        return tops


@register("Silence")
class SilenceLayer(Layer):
    """Swallows its bottoms (no tops); Caffe uses it to keep unused blobs from being outputs."""

    bottoms_range = (1, MANY)
    tops_range = (0, 0)

    def forward(self, *bottoms):
        return []


class PythonBlobs(list):
    """A Python layer's ``self.blobs``: learnable blobs; ``add_blob(*shape)`` appends one."""

    def __init__(self, owner: "PythonLayer"):
        super().__init__()
        self._owner = owner

    def add_blob(self, *shape: int) -> None:
        """A new zero blob of ``shape``, saved, loaded and updated like any layer's weights."""
        self._owner.add_blob(tuple(int(d) for d in shape), None)
        self.append(TensorBlob(self._owner.blobs[-1]))


class _PythonFunction(torch.autograd.Function):
    """The user's forward/backward as one autograd node; parameters are inputs only so that the
    node exists whenever they learn (the user writes their diffs directly)."""

    @staticmethod
    def forward(ctx, layer, *inputs):
        count = len(layer.param.bottom)
        bottoms = [ArrayBlob(data=x.detach().cpu().numpy()) for x in inputs[:count]]
        tops = layer.top_blobs
        layer.impl.reshape(bottoms, tops)
        layer.impl.forward(bottoms, tops)
        push_host(layer.blobs)  # on CUDA the user's blobs are host copies: what forward wrote takes effect
        ctx.layer, ctx.bottoms = layer, bottoms
        ctx.top_data = [np.array(top.data, dtype=np.float32, copy=True) for top in tops]
        device = inputs[0].device if inputs else torch.device("cpu")
        return tuple(torch.from_numpy(data.copy()).to(device) for data in ctx.top_data)

    @staticmethod
    def backward(ctx, *grads):
        layer, bottoms = ctx.layer, ctx.bottoms
        tops = layer.top_blobs
        for top, data, grad in zip(tops, ctx.top_data, grads):
            top.data = data  # the forward this graph belongs to, even if another one ran since
            top.diff = (np.zeros_like(data) if grad is None
                        else np.array(grad.detach().cpu().numpy(), dtype=np.float32).reshape(data.shape))
        for bottom in bottoms:
            bottom.diff = np.zeros_like(bottom.data)
        count = len(bottoms)
        propagate = [bool(ctx.needs_input_grad[1 + i]) for i in range(count)]
        layer.impl.backward(tops, propagate, bottoms)
        push_host(layer.blobs)  # the parameter diffs it wrote
        device = grads[0].device if grads else torch.device("cpu")
        bottom_grads = [torch.from_numpy(np.asarray(b.diff, dtype=np.float32).copy()).to(device) if want else None
                        for b, want in zip(bottoms, propagate)]
        return (None, *bottom_grads) + (None,) * (len(ctx.needs_input_grad) - 1 - count)


@register("Python")
class PythonLayer(Layer):
    """A layer written in Python (see the module docstring)."""

    bottoms_range = (0, MANY)
    tops_range = (0, MANY)
    #: its blobs hold what the user's setup wrote; the net's fillers must not overwrite them.
    self_initialised = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.python_param
        if not p.module or not p.layer:
            raise ConfigError(f"layer {self.name!r}: python_param needs module and layer")
        try:
            module = importlib.import_module(p.module)
        except ImportError as exc:
            raise ConfigError(f"layer {self.name!r}: cannot import Python module {p.module!r} ({exc}); "
                              "is its folder on PYTHONPATH?") from None
        cls = getattr(module, p.layer, None)
        if cls is None:
            raise ConfigError(f"layer {self.name!r}: module {p.module!r} has no {p.layer!r}")
        self.impl = cls(param)
        self.impl.param_str = p.param_str
        self.impl.phase = ctx.phase
        self.impl.blobs = PythonBlobs(self)
        self.impl.type = "Python"
        self.top_blobs: List[ArrayBlob] = [ArrayBlob() for _ in param.top]
        bottoms = [ArrayBlob(shape) for shape in bottom_shapes]
        self.impl.setup(bottoms, self.top_blobs)
        self.impl.reshape(bottoms, self.top_blobs)
        self.top_shapes.extend(top.shape for top in self.top_blobs)

    @property
    def user_blobs(self) -> "PythonBlobs":
        return self.impl.blobs

    def forward(self, *bottoms):
        return list(_PythonFunction.apply(self, *bottoms, *self.blobs))
