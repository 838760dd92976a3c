"""Caffe's weight fillers (``FillerParameter``) on torch tensors.

Each filler writes into an existing tensor using an explicit :class:`torch.Generator`, so a seed
fully determines the initial weights.  Definitions follow caffe/filler.hpp: ``constant`` (the
default type, value 0), ``gaussian`` (optionally ``sparse``), ``uniform``, ``xavier``, ``msra``,
``positive_unitball`` and ``bilinear``; ``variance_norm`` picks fan-in, fan-out or their average.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.errors import UnsupportedError

FillerFn = Callable[[torch.Tensor, caffe_pb2.FillerParameter, torch.Generator], None]

#: filler type → function(tensor, FillerParameter, generator) filling the tensor in place.
FILLERS: Dict[str, FillerFn] = {}


def _filler(name: str):
    def decorate(fn: FillerFn) -> FillerFn:
        FILLERS[name] = fn
        return fn

    return decorate


def _fan_in(shape) -> int:
    count = math.prod(shape)
    return count // shape[0] if shape and shape[0] else count


def _fan_out(shape) -> int:
    count = math.prod(shape)
    return count // shape[1] if len(shape) > 1 and shape[1] else count


def _variance_n(shape, param: caffe_pb2.FillerParameter) -> float:
    fan_in, fan_out = _fan_in(shape), _fan_out(shape)
    if param.variance_norm == caffe_pb2.FillerParameter.FAN_OUT:
        return float(fan_out)
    if param.variance_norm == caffe_pb2.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    return float(fan_in)


def _cpu_like(tensor: torch.Tensor) -> torch.Tensor:
    # Draw on the CPU in float64 so a seed gives the same weights on every device.
    return torch.empty(tensor.shape, dtype=torch.float64)


@_filler("constant")
def _constant(tensor, param, generator):
    tensor.fill_(param.value)


@_filler("gaussian")
def _gaussian(tensor, param, generator):
    values = _cpu_like(tensor).normal_(param.mean, param.std, generator=generator)
    if param.sparse >= 0:
        if tensor.dim() < 1 or tensor.shape[0] == 0:
            raise UnsupportedError("sparse gaussian filler needs a blob with outputs on axis 0")
        keep = min(1.0, param.sparse / tensor.shape[0])
        mask = torch.bernoulli(torch.full(values.shape, keep, dtype=torch.float64), generator=generator)
        values *= mask
    tensor.copy_(values)


@_filler("uniform")
def _uniform(tensor, param, generator):
    tensor.copy_(_cpu_like(tensor).uniform_(param.min, param.max, generator=generator))


@_filler("xavier")
def _xavier(tensor, param, generator):
    scale = math.sqrt(3.0 / _variance_n(tuple(tensor.shape), param))
    tensor.copy_(_cpu_like(tensor).uniform_(-scale, scale, generator=generator))


@_filler("msra")
def _msra(tensor, param, generator):
    std = math.sqrt(2.0 / _variance_n(tuple(tensor.shape), param))
    tensor.copy_(_cpu_like(tensor).normal_(0.0, std, generator=generator))


@_filler("positive_unitball")
def _positive_unitball(tensor, param, generator):
    values = _cpu_like(tensor).uniform_(0.0, 1.0, generator=generator)
    rows = values.reshape(values.shape[0], -1) if values.dim() else values.reshape(1, -1)
    rows /= rows.sum(dim=1, keepdim=True)
    tensor.copy_(rows.reshape(values.shape))


@_filler("bilinear")
def _bilinear(tensor, param, generator):
    if tensor.dim() != 4 or tensor.shape[2] != tensor.shape[3]:
        raise UnsupportedError(f"bilinear filler needs a 4-D blob with square kernels, got {tuple(tensor.shape)}")
    size = tensor.shape[3]
    f = math.ceil(size / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    axis = 1 - torch.abs(torch.arange(size, dtype=torch.float64) / f - c)
    tensor.copy_((axis[:, None] * axis[None, :]).expand(tensor.shape))


def fill(tensor: torch.Tensor, param: Optional[caffe_pb2.FillerParameter], generator: torch.Generator) -> None:
    """Fill ``tensor`` in place as Caffe's filler ``param`` would (``None`` = constant 0)."""
    if param is None:
        param = caffe_pb2.FillerParameter()
    fn = FILLERS.get(param.type)
    if fn is None:
        raise UnsupportedError(f"unknown filler type {param.type!r}", valid=sorted(FILLERS))
    with torch.no_grad():
        fn(tensor, param, generator)
