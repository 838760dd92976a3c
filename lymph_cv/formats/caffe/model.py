"""Caffe models (``.caffemodel``) and solver states (``.solverstate``) ⇄ named numpy blobs.

A caffemodel is a binary NetParameter whose layers carry their learned blobs; V2 files use
``layer`` (field 100), V1 files ``layers`` (field 2).  The tutorial-era Caffe wrote legacy
4-D blob dims (an InnerProduct weight as 1×1×M×K); :func:`net_params` gives every blob in
its layer's real shape, and :func:`set_net_params` writes values back in the convention
the file already uses, so decode → encode reproduces the file byte for byte.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import blob_to_array, store_array
from lymph_cv.formats.caffe.files import parse_binary, read_bytes
from lymph_cv.formats.caffe.prototxt import v1_type_name
from lymph_cv.errors import FormatError
from lymph_cv.core.fsutil import atomic_write_bytes

PathLike = Union[str, os.PathLike]
CAFFEMODEL_EXPECTED = "expected a Caffe model (.caffemodel: binary NetParameter with named layers)"
SOLVERSTATE_EXPECTED = "expected a Caffe solver state (.solverstate: binary SolverState)"

#: Layer types whose first blob is a 4-D filter bank (out, in/group, kh, kw).
FILTER_LAYER_TYPES = ("Convolution", "Deconvolution")
#: Layer types whose first blob is a 2-D weight matrix (legacy files store it as 1×1×M×K).
MATRIX_LAYER_TYPES = ("InnerProduct",)
#: Index of the bias among a layer's blobs.
BIAS_INDEX = 1

Layer = Union[caffe_pb2.LayerParameter, caffe_pb2.V1LayerParameter]


def net_layers(net: caffe_pb2.NetParameter) -> Sequence[Layer]:
    """The net's layers: V2 ``layer`` or, for legacy nets, V1 ``layers``."""
    return net.layer if len(net.layer) else net.layers


def layer_type(layer: Layer) -> str:
    """A layer's type string (V1 enum values mapped to their V2 names)."""
    if isinstance(layer, caffe_pb2.V1LayerParameter):
        return v1_type_name(layer.type)
    return layer.type


def parse_caffemodel(data: bytes, path: Optional[PathLike] = None) -> caffe_pb2.NetParameter:
    """Parse caffemodel bytes, checking they look like one (layers, names, no stray fields)."""
    net = parse_binary(caffe_pb2.NetParameter, data, path, CAFFEMODEL_EXPECTED)
    if len(net.layer) and len(net.layers):
        raise FormatError("has both 'layer' and legacy 'layers' fields; use one of them", path)
    layers = net_layers(net)
    if not len(layers):
        raise FormatError(f"{CAFFEMODEL_EXPECTED}; found no layers", path)
    if not all(layer.name for layer in layers):
        raise FormatError(f"{CAFFEMODEL_EXPECTED}; a layer has no name", path)
    return net


def read_caffemodel(path: PathLike) -> caffe_pb2.NetParameter:
    """Read a ``.caffemodel`` (V1 or V2) as a NetParameter, exactly as stored (no upgrade)."""
    return parse_caffemodel(read_bytes(path, CAFFEMODEL_EXPECTED), path)


def real_shape(type_name: str, index: int, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape a layer's blob really has, undoing legacy 4-D padding (1×1×M×K → M×K)."""
    if len(shape) != 4:
        return shape
    if index == BIAS_INDEX and (type_name in FILTER_LAYER_TYPES or type_name in MATRIX_LAYER_TYPES):
        return shape[-1:]
    if index == 0 and type_name in MATRIX_LAYER_TYPES:
        return shape[-2:]
    return shape


def net_params(net: caffe_pb2.NetParameter, path: Optional[PathLike] = None) -> Dict[str, List[np.ndarray]]:
    """Learned blobs by layer name (layers without blobs omitted), each in its real shape."""
    params: Dict[str, List[np.ndarray]] = {}
    for layer in net_layers(net):
        if not len(layer.blobs):
            continue
        type_name = layer_type(layer)
        arrays = []
        for index, blob in enumerate(layer.blobs):
            try:
                array = blob_to_array(blob)
            except FormatError as exc:
                raise FormatError(f"layer {layer.name!r} blob {index}: {exc.detail}", path) from exc
            target = real_shape(type_name, index, array.shape)
            arrays.append(array.reshape(target))
        params[layer.name] = arrays
    return params


def _fill_blobs(blobs, arrays: Sequence[np.ndarray], legacy: Optional[bool]) -> None:
    """Existing blobs (same number) keep their dims convention; new ones follow ``legacy``."""
    if len(blobs) != len(arrays):
        del blobs[:]
    for index, array in enumerate(arrays):
        if index < len(blobs):
            store_array(blobs[index], array)
        else:
            store_array(blobs.add(), array, bool(legacy))


def set_net_params(
    net: caffe_pb2.NetParameter, params: Mapping[str, Sequence[np.ndarray]], legacy: Optional[bool] = None
) -> None:
    """Store ``params`` (layer name → arrays) into the net's layers' blobs, in place.

    Existing blobs keep their dimension convention; new blobs get legacy 4-D dims when
    ``legacy`` is true (tutorial-era Caffe), otherwise ``shape`` (current Caffe).
    """
    layers = {layer.name: layer for layer in net_layers(net)}
    for name, arrays in params.items():
        if name not in layers:
            raise FormatError(f"net {net.name!r} has no layer named {name!r}")
        _fill_blobs(layers[name].blobs, arrays, legacy)


def caffemodel_bytes(net: caffe_pb2.NetParameter) -> bytes:
    """Serialized caffemodel."""
    return net.SerializeToString()


def write_caffemodel(path: PathLike, net: caffe_pb2.NetParameter) -> None:
    """Write a NetParameter as a ``.caffemodel`` atomically."""
    atomic_write_bytes(path, caffemodel_bytes(net))


def parse_solverstate(data: bytes, path: Optional[PathLike] = None) -> caffe_pb2.SolverState:
    """Parse solverstate bytes, checking they look like one (an ``iter`` field, valid history)."""
    state = parse_binary(caffe_pb2.SolverState, data, path, SOLVERSTATE_EXPECTED)
    if not state.HasField("iter"):
        raise FormatError(f"{SOLVERSTATE_EXPECTED}; no iteration number", path)
    for index, blob in enumerate(state.history):
        try:
            blob_to_array(blob)
        except FormatError as exc:
            raise FormatError(f"{SOLVERSTATE_EXPECTED}; history blob {index}: {exc.detail}", path) from exc
    return state


def read_solverstate(path: PathLike) -> caffe_pb2.SolverState:
    """Read a ``.solverstate`` (iter, learned_net, history blobs, current_step)."""
    return parse_solverstate(read_bytes(path, SOLVERSTATE_EXPECTED), path)


def history_arrays(
    state: caffe_pb2.SolverState, shapes: Optional[Sequence[Sequence[int]]] = None
) -> List[np.ndarray]:
    """The solver history blobs, as stored or reshaped to ``shapes`` (the params' real shapes)."""
    arrays = [blob_to_array(blob) for blob in state.history]
    if shapes is None:
        return arrays
    if len(shapes) != len(arrays):
        raise FormatError(f"solver state has {len(arrays)} history blobs, the net has {len(shapes)} parameters")
    result = []
    for index, (array, shape) in enumerate(zip(arrays, shapes)):
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise FormatError(f"history blob {index} has shape {array.shape}, the parameter {tuple(shape)}")
        result.append(array.reshape(tuple(shape)))
    return result


def set_history(state: caffe_pb2.SolverState, arrays: Sequence[np.ndarray], legacy: Optional[bool] = None) -> None:
    """Store history arrays into ``state`` in place (existing blobs keep their dims convention)."""
    _fill_blobs(state.history, arrays, legacy)


def write_solverstate(path: PathLike, state: caffe_pb2.SolverState) -> None:
    """Write a SolverState as a ``.solverstate`` atomically."""
    atomic_write_bytes(path, state.SerializeToString())
