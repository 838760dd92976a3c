"""A parsed Caffe net → a torch module with Caffe's semantics (:class:`CaffeNet`).

``build_net(net_param, phase)`` keeps the layers whose include/exclude rules match the phase,
builds each through the layer registry (:mod:`lymph_cv.net.layers`) with shapes inferred from
the inputs, and returns a :class:`CaffeNet`.  Its interface, relied on by training, evaluation and
pycaffe:

* ``net.input_blobs`` — tops of Data/Input layers and declared ``input`` blobs, in order;
  ``net.data_layers`` — the ``LayerParameter`` of every Data layer;
  ``net.output_blobs`` — blobs produced and never consumed, sorted by name as Caffe's
  ``std::set`` orders them (tutorial TEST net: accuracy, loss);
  ``net.loss_weights`` — blob → loss weight (loss layers' first top default 1);
  ``net.blob_shapes`` — blob → shape at build time.
* ``net.forward(inputs)`` — ``inputs`` maps input blob names to float32 tensors (N×C×H×W data,
  N labels); returns every blob by name (in-place tops hold the final value, as in Caffe).
* ``net.learnable`` — :class:`Learnable` entries (layer, blob index, parameter, lr_mult,
  decay_mult) in Caffe's order: layer by layer, weights then bias.
* ``net.init_params(generator)`` — Caffe's fillers (no filler = constant 0).
* ``net.load_weights(net_param)`` — copy blobs by layer name from a caffemodel's NetParameter
  (V1 or V2, legacy 4-D dims accepted); ``net.export_weights(legacy_dims=True)`` — the
  NetParameter Caffe would snapshot (layer parameters as given, blobs filled).
* ``net.share_weights_from(other)`` — use ``other``'s parameter tensors for same-named layers,
  as Caffe's test nets share the train net's blobs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import array_to_blob, blob_shape, blob_to_array, read_mean, shape_compatible
from lymph_cv.formats.caffe.datum import parse_datum
from lymph_cv.formats.caffe.prototxt import filter_net
from lymph_cv.errors import ConfigError, FormatError, LymphCVError, naming
from lymph_cv.net.fillers import fill
from lymph_cv.net import layers_extra  # noqa: F401  (pycaffe's layers register next to the core ones)
from lymph_cv.net.fuse import FusedConvolutions, conv2d, fusion_plan, relu_plan, scale_pairs
from lymph_cv.net.layers import BuildContext, Layer, Shape, layer_class
from lymph_cv.net.netspec import declared_inputs
from lymph_cv.formats.store import open_reader

PathLike = Union[str, os.PathLike]


@dataclass
class Learnable:
    """One learnable blob and its Caffe multipliers."""

    layer: str
    index: int
    param: nn.Parameter
    lr_mult: float
    decay_mult: float


def resolve_net_path(path: PathLike, base_dir: Optional[PathLike] = None) -> Path:
    """A path from a net or solver file: as given (Caffe: against the current directory), else
    against ``base_dir`` (the file's own folder) when it exists only there."""
    candidate = Path(path)
    if candidate.is_absolute() or base_dir is None or candidate.exists():
        return candidate
    beside = Path(base_dir) / candidate
    return beside if beside.exists() else candidate


def data_layer_shapes(layer: caffe_pb2.LayerParameter, base_dir: Optional[PathLike] = None) -> Dict[str, Shape]:
    """Top shapes of a Data layer: batch × C × H × W from the first datum of its DB (or its mean
    file when the DB is absent), H and W replaced by ``crop_size``; labels are (batch,)."""
    batch = int(layer.data_param.batch_size)
    if batch < 1:
        raise ConfigError(f"layer {layer.name!r}: data_param.batch_size must be positive")
    crop = int(layer.transform_param.crop_size)
    chw = None
    source = resolve_net_path(layer.data_param.source, base_dir)
    if layer.data_param.source and source.exists():
        with open_reader(source) as reader:
            for key, value in reader:
                try:
                    chw = parse_datum(value)[0].shape
                except FormatError as exc:
                    raise FormatError(f"record {key.decode(errors='replace')}: {exc.detail}", source) from exc
                break
        if chw is None:
            raise ConfigError(f"layer {layer.name!r}: data source is empty", path=source)
    elif layer.transform_param.mean_file:
        chw = read_mean(resolve_net_path(layer.transform_param.mean_file, base_dir)).shape
    else:
        raise ConfigError(f"layer {layer.name!r}: data source not found, cannot infer the input shape",
                          path=source)
    c, h, w = chw
    if crop:
        if crop > h or crop > w:
            raise ConfigError(f"layer {layer.name!r}: crop_size {crop} exceeds the {h}x{w} images")
        h = w = crop
    shapes = {layer.top[0]: (batch, c, h, w)}
    if len(layer.top) > 1:
        shapes[layer.top[1]] = (batch,)
    return shapes


class CaffeNet(nn.Module):
    """A Caffe net as a torch module; see the module docstring for the interface."""

    def __init__(self, name: str, phase: int, layer_params: List[caffe_pb2.LayerParameter],
                 layers: List[Layer], blob_shapes: Dict[str, Shape], input_blobs: List[str]):
        super().__init__()
        self.name = name
        self.phase = phase
        self.layer_params = layer_params
        self.layers = nn.ModuleList(layers)
        self.blob_shapes = blob_shapes
        self.input_blobs = input_blobs
        self.data_layers = [p for p in layer_params if p.type == "Data"]
        self.layer_names = [p.name for p in layer_params]
        self._by_name = {layer.name: layer for layer in layers}
        self.output_blobs = self._outputs()
        self.loss_weights = self._loss_weights()
        self.learnable = self._learnable()
        #: Run 4-D blobs channels-last: the same values, about 1.6x faster convolutions on CPU
        #: (benchmarks/bench_net.py).
        self.channels_last = True
        #: lymph_cv.net.fuse (equal to 1e-5): without autograd, Convolution + BatchNorm (global stats)
        #: + Scale in place as one convolution, and a ReLU in place on a convolution's top as its
        #: oneDNN post-op (CPU); BatchNorm + Scale in place as one batch-norm kernel in any phase.
        #: False: every layer as written.
        self.fuse_layers = True
        self._fusion = FusedConvolutions(self.layers, fusion_plan(list(self.layers)))
        self._relus = relu_plan(list(self.layers), self._fusion.plan)
        self._scale_pairs = scale_pairs(list(self.layers))

    # -- structure ---------------------------------------------------------------------------

    def _outputs(self) -> List[str]:
        available = set(self.input_blobs)
        for param in self.layer_params:
            available.difference_update(param.bottom)
            available.update(param.top)
        return sorted(available)

    def _loss_weights(self) -> Dict[str, float]:
        weights: Dict[str, float] = {}
        for layer in self.layers:
            given = list(layer.param.loss_weight)
            if given and len(given) != len(layer.param.top):
                raise ConfigError(f"layer {layer.name!r}: {len(given)} loss_weight values for "
                                  f"{len(layer.param.top)} tops")
            if not given:
                given = [1.0 if (layer.is_loss and i == 0) else 0.0 for i in range(len(layer.param.top))]
            for top, weight in zip(layer.param.top, given):
                if weight:
                    weights[top] = float(weight)
        return weights

    def _learnable(self) -> List[Learnable]:
        entries = []
        for layer in self.layers:
            specs = list(layer.param.param)
            if len(specs) > len(layer.blobs):
                raise ConfigError(f"layer {layer.name!r}: {len(specs)} param specs for {len(layer.blobs)} blobs")
            for index, blob in enumerate(layer.blobs):
                spec = specs[index] if index < len(specs) else caffe_pb2.ParamSpec()
                if spec.name:
                    raise ConfigError(f"layer {layer.name!r}: named (shared) parameters are not supported")
                entries.append(Learnable(layer.name, index, blob, float(spec.lr_mult), float(spec.decay_mult)))
        return entries

    def layer(self, name: str) -> Layer:
        """The layer module called ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"net {self.name!r} has no layer {name!r}", valid=self.layer_names) from None

    def params(self) -> Dict[str, List[nn.Parameter]]:
        """Layer name → its learnable blobs, for layers that have any (net order)."""
        return {layer.name: list(layer.blobs) for layer in self.layers if len(layer.blobs)}

    # -- computation -------------------------------------------------------------------------

    def forward(self, inputs: Mapping[str, torch.Tensor], start: int = 0) -> Dict[str, torch.Tensor]:
        """Run every layer; ``inputs`` holds the input blobs. Returns all blobs by name.

        ``start``: run only the layers from that index on, ``inputs`` then holding every blob they
        read (e.g. what another precision computed up to there: lymph_cv.net.bf16)."""
        missing = [name for name in self.input_blobs if name not in inputs]
        if missing:
            raise ConfigError(f"net {self.name!r}: missing input blob(s) {', '.join(missing)}",
                              valid=self.input_blobs)
        blobs: Dict[str, torch.Tensor] = dict(inputs)
        if self.channels_last:
            for name, value in blobs.items():
                if value.dim() == 4:
                    blobs[name] = value.contiguous(memory_format=torch.channels_last)
        fuse = self.fuse_layers and not torch.is_grad_enabled()
        skip = -1
        for index, layer in enumerate(self.layers):
            if layer.is_input or index <= skip or index < start:
                continue
            relu = fuse and index in self._relus
            if fuse and index in self._fusion.plan:
                (bottom,) = layer.param.bottom
                blobs[layer.param.top[0]] = self._fusion.forward(index, blobs[bottom], relu)
                skip = self._relus[index] if relu else self._fusion.plan[index][1]
                continue
            if relu:
                (bottom,) = layer.param.bottom
                bias = layer.blobs[1] if layer.bias_term else None
                blobs[layer.param.top[0]] = conv2d(blobs[bottom], layer.blobs[0], bias, layer, relu=True)
                skip = self._relus[index]
                continue
            if self.fuse_layers and index in self._scale_pairs:
                scale = self.layers[self._scale_pairs[index]]
                (top,) = layer.param.top
                blobs[top] = layer(blobs[top], scale.blobs[0], scale.blobs[1] if scale.bias_term else None)[0]
                skip = index + 1
                continue
            tops = layer(*[blobs[name] for name in layer.param.bottom])
            for name, value in zip(layer.param.top, tops):
                blobs[name] = value
        return blobs

    def loss(self, blobs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Σ loss_weight · blob over the loss blobs of a forward result."""
        total = None
        for name, weight in self.loss_weights.items():
            term = blobs[name].sum() * weight
            total = term if total is None else total + term
        if total is None:
            raise ConfigError(f"net {self.name!r} has no loss layer")
        return total

    # -- weights -----------------------------------------------------------------------------

    def init_params(self, generator: Optional[torch.Generator] = None) -> None:
        """Fill every learnable blob with its layer's filler, layer by layer, weights then bias."""
        if generator is None:
            generator = torch.Generator()
        for layer in self.layers:
            if getattr(layer, "self_initialised", False):
                continue  # e.g. a Python layer: its setup wrote the blobs
            for blob, filler in zip(layer.blobs, layer.fillers):
                fill(blob.data, filler, generator)

    def load_weights(self, source: caffe_pb2.NetParameter, path: Optional[PathLike] = None) -> List[str]:
        """Copy blobs by layer name (Caffe's CopyTrainedLayersFrom); returns the layers with blobs copied.

        Source layers unknown here are ignored; layers absent from the source keep their values.
        """
        copied = []
        source_layers = list(source.layer) if len(source.layer) else list(source.layers)
        for src in source_layers:
            if src.name not in self._by_name:
                continue
            target = self._by_name[src.name]
            if len(src.blobs) != len(target.blobs):
                raise FormatError(f"layer {src.name!r}: the model has {len(src.blobs)} blobs, "
                                  f"the net expects {len(target.blobs)}", path)
            arrays = []
            for index, (blob, param) in enumerate(zip(src.blobs, target.blobs)):
                if not shape_compatible(blob, tuple(param.shape)):
                    raise FormatError(f"layer {src.name!r} blob {index}: the model has shape "
                                      f"{blob_shape(blob)}, the net expects {tuple(param.shape)}", path)
                try:
                    arrays.append(blob_to_array(blob).reshape(tuple(param.shape)))
                except LymphCVError as exc:
                    raise FormatError(f"layer {src.name!r} blob {index}: {exc.detail}", path) from exc
            with torch.no_grad():
                for array, param in zip(arrays, target.blobs):
                    param.copy_(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
            if len(src.blobs):
                copied.append(src.name)
        return copied

    def export_weights(self, legacy_dims: bool = True) -> caffe_pb2.NetParameter:
        """The NetParameter Caffe snapshots: name, every layer's parameters with its blobs.

        ``legacy_dims`` writes num/channels/height/width (right-aligned, 1-padded) like the
        tutorial-era Caffe; otherwise ``shape`` as Caffe since 2015-03.
        """
        out = caffe_pb2.NetParameter(name=self.name)
        for param, layer in zip(self.layer_params, self.layers):
            entry = out.layer.add()
            entry.CopyFrom(param)
            del entry.blobs[:]
            if layer.is_loss and not len(entry.loss_weight):
                # Caffe's loss layers record their implicit weight at setup, so snapshots carry it.
                entry.loss_weight.append(1.0)
            for blob in layer.blobs:
                entry.blobs.append(array_to_blob(blob.detach().cpu().numpy(), legacy=legacy_dims))
        return out

    def share_weights_from(self, other: "CaffeNet") -> None:
        """Use ``other``'s parameter tensors for every same-named layer (shapes must agree)."""
        for layer in self.layers:
            if not len(layer.blobs) or layer.name not in other._by_name:
                continue
            theirs = other._by_name[layer.name].blobs
            if len(theirs) != len(layer.blobs) or any(a.shape != b.shape for a, b in zip(theirs, layer.blobs)):
                raise ConfigError(f"layer {layer.name!r}: cannot share blobs of different shapes")
            for index, param in enumerate(theirs):
                layer.blobs[index] = param
        self.learnable = self._learnable()


def build_net(net_param: caffe_pb2.NetParameter, phase: int, *, level: int = 0, stages: Iterable[str] = (),
              input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
              base_dir: Optional[PathLike] = None, accuracy_ties: str = "higher_index",
              source: Optional[PathLike] = None) -> CaffeNet:
    """Build the layers of ``net_param`` that the NetState (phase, level, stages) includes.

    ``input_shapes`` fixes input blob shapes (else: declared inputs, Data layers' DB or mean file,
    resolved against the current directory, then ``base_dir``).  ``accuracy_ties``: see
    :data:`lymph_cv.net.layers.ACCURACY_TIES`.  ``source``: the prototxt ``net_param`` was read
    from, named by an error that names no other file (an unknown layer type, a shape that does not fit).
    """
    try:
        return _build_net(net_param, phase, level, stages, input_shapes, base_dir, accuracy_ties)
    except LymphCVError as exc:
        naming(exc, source)
        raise


def _build_net(net_param: caffe_pb2.NetParameter, phase: int, level: int, stages: Iterable[str],
               input_shapes: Optional[Mapping[str, Sequence[int]]], base_dir: Optional[PathLike],
               accuracy_ties: str) -> CaffeNet:
    net_param = filter_net(net_param, phase, level, stages)
    known: Dict[str, Shape] = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    ctx = BuildContext(phase=phase, accuracy_ties=accuracy_ties, input_shapes=known)
    blob_shapes: Dict[str, Shape] = {}
    input_blobs: List[str] = []
    for name, shape in declared_inputs(net_param):
        blob_shapes[name] = known.get(name, shape)
        input_blobs.append(name)

    layer_params: List[caffe_pb2.LayerParameter] = []
    layers: List[Layer] = []
    seen = set()
    for param in net_param.layer:
        if param.name in seen:
            raise ConfigError(f"net {net_param.name!r}: duplicate layer name {param.name!r}")
        seen.add(param.name)
        cls = layer_class(param)
        if cls.is_input and param.type == "Data":
            missing = [top for top in param.top if top not in known]
            if missing:
                known.update({k: v for k, v in data_layer_shapes(param, base_dir).items() if k not in known})
        bottoms = []
        for name in param.bottom:
            if name not in blob_shapes:
                raise ConfigError(f"layer {param.name!r}: unknown bottom blob {name!r}")
            bottoms.append(blob_shapes[name])
        layer = cls(param, bottoms, ctx)
        for name, shape in zip(param.top, layer.top_shapes):
            blob_shapes[name] = tuple(shape)
        if cls.is_input:
            input_blobs.extend(param.top)
        layer_params.append(layer.param)  # a layer may complete its parameters (BatchNorm's lr_mult 0)
        layers.append(layer)
    return CaffeNet(net_param.name, phase, layer_params, layers, blob_shapes, input_blobs)
