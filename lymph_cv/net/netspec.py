"""Torch-free facts about a parsed net, shared by the torch layers (lymph_cv.net.build, .layers)
and the numpy forward (lymph_cv.net.plain): declared inputs, Caffe's pooled sizes, and whether a
model's weights fit a deploy net."""
from __future__ import annotations

import os
from typing import Callable, Iterable, List, Optional, Tuple, Union

from lymph_cv.errors import ConfigError, EvaluationError, LymphCVError
from lymph_cv.formats.caffe import caffe_pb2

Shape = Tuple[int, ...]

#: Dimensions per declared input in the legacy ``input_dim`` list (N, C, H, W).
INPUT_DIMS = 4


def declared_inputs(net_param: caffe_pb2.NetParameter) -> List[Tuple[str, Shape]]:
    """The net's declared ``input`` blobs with their shapes (``input_shape``, else 4 ``input_dim`` each)."""
    names = list(net_param.input)
    if len(net_param.input_shape):
        if len(net_param.input_shape) != len(names):
            raise ConfigError(f"net {net_param.name!r}: {len(names)} inputs but {len(net_param.input_shape)} input_shape")
        shapes = [tuple(int(d) for d in s.dim) for s in net_param.input_shape]
    else:
        dims = list(net_param.input_dim)
        if len(dims) != INPUT_DIMS * len(names):
            raise ConfigError(f"net {net_param.name!r}: {len(names)} inputs need {INPUT_DIMS * len(names)} "
                              f"input_dim values, got {len(dims)}")
        shapes = [tuple(dims[i * INPUT_DIMS:(i + 1) * INPUT_DIMS]) for i in range(len(names))]
    return list(zip(names, shapes))


def fit_weights(load: Callable[[caffe_pb2.NetParameter, Optional[str]], Iterable[str]], weights: caffe_pb2.NetParameter,
                expected: Iterable[str], model: Union[str, os.PathLike], deploy: Union[str, os.PathLike]) -> None:
    """Copy ``weights`` with a net's ``load_weights`` (which returns the layers it filled) and check
    that every ``expected`` layer got its blobs: an EvaluationError "model M does not fit deploy net
    D: …" otherwise (the same words from the torch net and the numpy one)."""
    mismatch = f"model {model} does not fit deploy net {deploy}"
    try:
        copied = set(load(weights, model))
    except LymphCVError as exc:
        raise EvaluationError(f"{mismatch}: {exc.detail}") from exc
    missing = [name for name in expected if name not in copied]
    if missing:
        raise EvaluationError(f"{mismatch}: no weights for layer(s) {', '.join(missing)}")


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool = True) -> int:
    """Caffe's pooling output size: rounds up by default; the last window must start inside image+pad."""
    span = size + 2 * pad - kernel
    pooled = (-(-span // stride) if ceil else span // stride) + 1
    if pad and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled
