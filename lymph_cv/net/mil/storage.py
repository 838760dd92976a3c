"""The MIL head, clinical MLP and fusion layer as a Caffe NetParameter (``mil_head.caffemodel``), never
pickled.

Format: one layer per module that owns parameters or buffers, named by its path in the model
(``head.attention_V``, ``head``, ``clinical.standardise``, ``clinical.clinical_ip1``, ``fuse``; the
root of each (``head``, ``clinical``) always, with no blobs when it owns none: its type names the method);
``nn.Linear`` modules are ``InnerProduct`` layers (blob 0 the (out, in) weight, blob 1 the bias, as
Caffe's), the others our own types (``MILStandardise``: blobs mean, sd; ``MILLearnedHead``: slope,
offset), blobs in the module's parameter-then-buffer order, shapes in ``BlobShape``.  What the layers
are (method, k, fusion, attribute names) is in ``mil.json`` beside it.
"""
from __future__ import annotations

import os
from typing import Mapping, Union

import numpy as np
import torch
from torch import nn

from lymph_cv.errors import FormatError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import array_to_blob, blob_shape, blob_to_array
from lymph_cv.formats.caffe.model import read_caffemodel, write_caffemodel

PathLike = Union[str, os.PathLike]
HEAD_NET_NAME = "lymph_cv_mil_head"


def _owned(module: nn.Module):
    return list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))


def _layer_type(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "InnerProduct"
    return getattr(module, "caffe_type", "MIL" + type(module).__name__)


def _layers(modules: Mapping[str, nn.Module]):
    for prefix, root in modules.items():
        for sub_name, module in root.named_modules():
            owned = _owned(module)
            if owned or not sub_name:  # the root always, so a head without parameters is named too
                yield (f"{prefix}.{sub_name}" if sub_name else prefix), module, owned


def modules_netparam(modules: Mapping[str, nn.Module]) -> caffe_pb2.NetParameter:
    """The NetParameter holding every parameter and buffer of ``modules`` (name → module)."""
    net = caffe_pb2.NetParameter(name=HEAD_NET_NAME)
    for name, module, owned in _layers(modules):
        layer = net.layer.add(name=name, type=_layer_type(module))
        if isinstance(module, nn.Linear):
            layer.inner_product_param.num_output = module.out_features
            layer.inner_product_param.bias_term = module.bias is not None
        for _, tensor in owned:
            layer.blobs.append(array_to_blob(tensor.detach().cpu().numpy().astype(np.float32), legacy=False))
    return net


def write_modules(path: PathLike, modules: Mapping[str, nn.Module]) -> None:
    write_caffemodel(path, modules_netparam(modules))


def load_modules(path: PathLike, modules: Mapping[str, nn.Module]) -> None:
    """Fill ``modules`` (built from the same configuration) from ``path``; FormatError naming the file
    on a missing layer or a blob of another shape."""
    net = read_caffemodel(path)
    stored = {layer.name: layer for layer in net.layer}
    for name, module, owned in _layers(modules):
        if name not in stored:
            raise FormatError(f"expected a MIL head layer {name!r} ({_layer_type(module)})", path)
        blobs = stored[name].blobs
        if len(blobs) != len(owned):
            raise FormatError(f"layer {name!r}: {len(blobs)} blobs, expected {len(owned)}", path)
        with torch.no_grad():
            for index, (blob, (_, tensor)) in enumerate(zip(blobs, owned)):
                if blob_shape(blob) != tuple(tensor.shape):
                    raise FormatError(f"layer {name!r} blob {index}: shape {blob_shape(blob)}, expected "
                                      f"{tuple(tensor.shape)}", path)
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(blob_to_array(blob), dtype=np.float32)))
