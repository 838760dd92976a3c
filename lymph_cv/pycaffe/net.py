"""``caffe.Net`` on the PyTorch port: blobs and params as numpy arrays, forward, forward_all, save."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.model import read_caffemodel, write_caffemodel
from lymph_cv.formats.caffe.prototxt import read_net_prototxt
from lymph_cv.core.devices import resolve_device
from lymph_cv.errors import ConfigError
from lymph_cv.net.build import CaffeNet, build_net, resolve_net_path

log = logging.getLogger(__name__)

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST
PHASES = {TRAIN: "TRAIN", TEST: "TEST"}

_state = {"device": "cpu", "gpu_id": 0, "seed": 0}


def set_mode_cpu() -> None:
    """Run nets created from now on on the CPU."""
    _state["device"] = "cpu"


def set_mode_gpu() -> None:
    """Run nets created from now on on CUDA; falls back to the CPU (with a warning) without a GPU."""
    if torch.cuda.is_available():
        _state["device"] = "cuda"
    else:
        log.warning("set_mode_gpu: no CUDA device available, running on the CPU")
        _state["device"] = "cpu"


def set_device(device_id: int) -> None:
    """Select the CUDA device used in GPU mode."""
    _state["gpu_id"] = int(device_id)


def set_random_seed(seed: int) -> None:
    """Seed for filler initialisation and TRAIN-phase randomness of nets created from now on."""
    _state["seed"] = int(seed)


def _device() -> torch.device:
    if _state["device"] == "cuda":
        return resolve_device(f"cuda:{_state['gpu_id']}")
    return resolve_device("cpu")


class Blob:
    """A named array, like pycaffe's blob: ``data``, ``diff``, ``shape``, ``reshape``."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.diff = np.zeros_like(data)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    def _axis(self, index: int) -> int:
        # Caffe's legacy accessors read 1 for axes the blob does not have.
        return int(self.data.shape[index]) if self.data.ndim > index else 1

    num = property(lambda self: self._axis(0))
    channels = property(lambda self: self._axis(1))
    height = property(lambda self: self._axis(2))
    width = property(lambda self: self._axis(3))

    def reshape(self, *shape: int) -> None:
        """New dimensions (contents are not kept when the size changes)."""
        shape = tuple(int(d) for d in shape)
        if shape != self.shape:
            self.data = np.zeros(shape, dtype=np.float32)
            self.diff = np.zeros(shape, dtype=np.float32)


class ParamBlob(Blob):
    """A learnable blob whose ``data`` is a live view of the torch parameter (writes go through)."""

    def __init__(self, param: torch.nn.Parameter):
        self._param = param
        self.diff = np.zeros(tuple(param.shape), dtype=np.float32)

    @property
    def data(self) -> np.ndarray:
        if self._param.device.type == "cpu":
            return self._param.detach().numpy()
        return self._param.detach().cpu().numpy()

    @data.setter
    def data(self, value: np.ndarray) -> None:
        with torch.no_grad():
            self._param.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)))

    def reshape(self, *shape: int) -> None:
        raise ConfigError("learnable blobs keep the shape their layer gives them")


class LayerView:
    """``net.layers[i]``: the layer's ``type`` and its learnable ``blobs``."""

    def __init__(self, type_name: str, blobs: List[ParamBlob]):
        self.type = type_name
        self.blobs = blobs


def _split_args(args: Sequence, weights: Optional[str], phase: Optional[int]):
    """Net(model, phase) | Net(model, weights, phase) | Net(model, phase, weights=...)."""
    args = list(args)
    if args and isinstance(args[-1], int) and not isinstance(args[-1], bool):
        if phase is not None:
            raise ConfigError("phase given twice")
        phase = args.pop()
    if args:
        if weights is not None or len(args) > 1:
            raise ConfigError("usage: Net(model, [weights,] phase)")
        weights = args[0]
    if phase not in PHASES:
        raise ConfigError(f"Net needs a phase, got {phase!r}", valid=["caffe.TRAIN", "caffe.TEST"])
    return weights, phase


class Net:
    """pycaffe's ``caffe.Net(model_file, [weights,] phase)`` on the PyTorch port."""

    def __init__(self, model_file: str | os.PathLike, *args, weights: Optional[str] = None,
                 phase: Optional[int] = None, level: int = 0, stages: Iterable[str] = ()):
        weights, phase = _split_args(args, weights, phase)
        self.model_file = Path(model_file)
        self.phase = phase
        self._base_dir = self.model_file.parent
        param = read_net_prototxt(self.model_file)
        self._device = _device()
        self._net: CaffeNet = build_net(param, phase, level=level, stages=stages, base_dir=self._base_dir)
        generator = torch.Generator().manual_seed(_state["seed"])
        self._net.init_params(generator)
        self._net.to(self._device)
        self._data_layers = self._make_data_layers()
        self._batch = 0
        if weights is not None:
            self.copy_from(weights)
        self.blobs: "OrderedDict[str, Blob]" = OrderedDict(
            (name, Blob(np.zeros(shape, dtype=np.float32))) for name, shape in self._net.blob_shapes.items())
        self._rebuild_params()

    def _make_data_layers(self):
        if not self._net.data_layers:
            return []
        from lymph_cv.net.datalayer import DataLayer

        def resolve(path: str) -> Path:
            return resolve_net_path(path, self._base_dir)

        return [DataLayer(layer, self.phase, _state["seed"], resolve) for layer in self._net.data_layers]

    def _rebuild_params(self) -> None:
        self.params: "OrderedDict[str, List[ParamBlob]]" = OrderedDict(
            (name, [ParamBlob(p) for p in params]) for name, params in self._net.params().items())
        self.layers = [LayerView(layer.type_name, self.params.get(layer.name, [])) for layer in self._net.layers]

    # -- pycaffe's attributes ------------------------------------------------------------------

    @property
    def inputs(self) -> List[str]:
        """Input blob names (declared inputs and data layer tops)."""
        return list(self._net.input_blobs)

    @property
    def outputs(self) -> List[str]:
        """Output blob names (produced, never consumed; Caffe's order)."""
        return list(self._net.output_blobs)

    @property
    def _layer_names(self) -> List[str]:
        return list(self._net.layer_names)

    @property
    def layer_dict(self) -> "OrderedDict[str, LayerView]":
        return OrderedDict(zip(self._net.layer_names, self.layers))

    @property
    def torch_net(self) -> CaffeNet:
        """The underlying :class:`lymph_cv.net.build.CaffeNet`."""
        return self._net

    # -- computation ---------------------------------------------------------------------------

    def _feed(self, inputs: Mapping[str, np.ndarray]) -> None:
        for name, array in inputs.items():
            if name not in self.inputs:
                raise ConfigError(f"{name!r} is not an input blob", valid=self.inputs)
            array = np.asarray(array, dtype=np.float32)
            blob = self.blobs[name]
            if array.shape[0] != blob.shape[0]:
                raise ConfigError(f"input {name!r}: batch of {array.shape[0]}, the net takes {blob.shape[0]}")
            if array.shape != blob.shape:
                blob.reshape(*array.shape)
            blob.data[...] = array

    def forward(self, blobs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                end: Optional[str] = None, **kwargs: np.ndarray) -> Dict[str, np.ndarray]:
        """Set the given input blobs, run the net, return the output blobs (and ``blobs``) by name.

        Nets with Data layers read their next batch when no input is given.
        """
        if start is not None or end is not None:
            raise ConfigError("forward(start=..., end=...) is not supported; run the whole net")
        self._feed(kwargs)
        if self._data_layers and not kwargs:
            for layer in self._data_layers:
                for name, tensor in layer.batch(self._batch).items():
                    self._feed({name: tensor.numpy()})
            self._batch += 1
        inputs = {name: torch.from_numpy(self.blobs[name].data).to(self._device) for name in self.inputs}
        with torch.no_grad():
            results = self._net(inputs)
        for name, tensor in results.items():
            if name in self.inputs:
                continue
            self.blobs[name].data = tensor.detach().to("cpu", torch.float32).numpy().copy()
            if self.blobs[name].diff.shape != self.blobs[name].data.shape:
                self.blobs[name].diff = np.zeros_like(self.blobs[name].data)
        wanted = list(self.outputs) + [b for b in (blobs or []) if b not in self.outputs]
        missing = [b for b in wanted if b not in self.blobs]
        if missing:
            raise ConfigError(f"unknown blob(s) {', '.join(missing)}", valid=list(self.blobs))
        return {name: self.blobs[name].data for name in wanted}

    def reshape(self) -> None:
        """Propagate the input blobs' shapes through the net (pycaffe's Net.reshape)."""
        self.forward(**{name: self.blobs[name].data for name in self.inputs if not self._data_layers})

    def _batches(self, inputs: Mapping[str, np.ndarray]) -> Iterator[Dict[str, np.ndarray]]:
        """Net-sized batches of ``inputs``, the last one zero-padded."""
        batch = self.blobs[self.inputs[0]].shape[0]
        total = len(next(iter(inputs.values())))
        for start in range(0, total, batch):
            chunk = {}
            for name, array in inputs.items():
                part = np.asarray(array[start:start + batch], dtype=np.float32)
                if len(part) < batch:
                    padded = np.zeros((batch,) + part.shape[1:], dtype=np.float32)
                    padded[:len(part)] = part
                    part = padded
                chunk[name] = part
            yield chunk

    def forward_all(self, blobs: Optional[Sequence[str]] = None, **kwargs: np.ndarray) -> Dict[str, np.ndarray]:
        """Forward any number of inputs in net-sized batches; outputs stacked, padding dropped."""
        if not kwargs:
            raise ConfigError("forward_all needs input arrays, e.g. forward_all(data=...)")
        sizes = {len(v) for v in kwargs.values()}
        if len(sizes) != 1:
            raise ConfigError("forward_all inputs must have the same length")
        total = sizes.pop()
        collected: Dict[str, List[np.ndarray]] = {}
        for chunk in self._batches(kwargs):
            for name, value in self.forward(blobs=blobs, **chunk).items():
                collected.setdefault(name, []).append(np.array(value, copy=True))
        return {name: np.concatenate(parts)[:total] if parts[0].ndim else np.asarray(parts)
                for name, parts in collected.items()}

    # -- weights -------------------------------------------------------------------------------

    def copy_from(self, weights: str | os.PathLike) -> None:
        """Load a .caffemodel's blobs by layer name (pycaffe's copy_from)."""
        self._net.load_weights(read_caffemodel(weights), path=weights)

    def save(self, filename: str | os.PathLike) -> None:
        """Write the weights as a .caffemodel (legacy 4-D blob dims, like the tutorial's files)."""
        write_caffemodel(filename, self._net.export_weights(legacy_dims=True))
