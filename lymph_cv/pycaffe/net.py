"""``caffe.Net`` on the PyTorch port: numpy blobs, forward/backward over layer ranges, weights I/O.

The net runs layer by layer on the blobs' numpy memory, as Caffe's ``ForwardFromTo``/``BackwardFromTo``
do, so ``forward(start=, end=)`` and ``backward(start=, end=)`` see what a user wrote into ``.data`` and
``.diff``.  Each layer's forward is recorded by torch autograd (TRAIN phase or ``force_backward``);
``backward`` replays the record with the top blobs' diffs (a layer not run forward yet is run on its
bottoms' current data first) and writes each bottom's diff, summing them where a blob feeds several
layers (Caffe's Split layers), and accumulates parameter diffs until ``clear_param_diffs``.  Loss blobs
carry their loss weight as diff, as Caffe sets at setup.

A full forward with nothing to record (TEST phase without force_backward) runs as one torch graph
and leaves the blobs as the per-layer run would.  Only blobs Caffe gives diffs get them (a layer that
learns, or one downstream of it; all with force_backward), so data and labels cost no backward.

Learnable blobs are live views of the torch parameters (and gradients) the engine and the solvers use;
for device parameters they are host copies synced around each call (:mod:`lymph_cv.net.blobs`).
Caffe's automatically inserted Split layers are not materialised: a blob used by several layers has no
``*_split_*`` companions in ``blobs`` or ``layers``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from itertools import zip_longest
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from lymph_cv.errors import ConfigError, FormatError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.model import read_caffemodel, write_caffemodel
from lymph_cv.formats.caffe.prototxt import read_net_prototxt
from lymph_cv.core.devices import resolve_device
from lymph_cv.net.blobs import ArrayBlob, TensorBlob, ensure_grad, pull_host, push_host
from lymph_cv.net.build import CaffeNet, build_net, resolve_net_path
from lymph_cv.net.datalayer import DataLayer

log = logging.getLogger(__name__)

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST
PHASES = {TRAIN: "TRAIN", TEST: "TEST"}
#: HDF5 weight files (Caffe's Net::ToHDF5): one group per layer under this group, datasets "0", "1", ….
HDF5_DATA_GROUP = "data"

_state = {"device": "cpu", "gpu_id": 0, "seed": 0, "seed_set": False}

# Kept for callers of the first pycaffe module: a blob is an ArrayBlob, a learnable one a TensorBlob.
Blob = ArrayBlob
ParamBlob = TensorBlob


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
    """Seed for filler initialisation and TRAIN-phase randomness of nets and solvers created from now on."""
    _state["seed"] = int(seed)
    _state["seed_set"] = True


def device() -> torch.device:
    """The device chosen by set_mode_cpu/set_mode_gpu/set_device."""
    if _state["device"] == "cuda":
        return resolve_device(f"cuda:{_state['gpu_id']}")
    return resolve_device("cpu")


def device_name() -> str:
    """The chosen device as ``lymph-cv train --device`` spells it."""
    chosen = device()
    return "cpu" if chosen.type == "cpu" else f"cuda:{chosen.index or 0}"


def chosen_seed() -> Optional[int]:
    """The seed given to set_random_seed, or None when none was."""
    return _state["seed"] if _state["seed_set"] else None


class LayerView:
    """``net.layers[i]``: the layer's ``type`` and its learnable ``blobs``."""

    def __init__(self, type_name: str, blobs: List[TensorBlob]):
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
    """pycaffe's ``caffe.Net(model_file, [weights,] phase, level=0, stages=None, weights=None)``."""

    def __init__(self, model_file: str | os.PathLike, *args, weights: Optional[str] = None,
                 phase: Optional[int] = None, level: int = 0, stages: Optional[Iterable[str]] = None):
        weights, phase = _split_args(args, weights, phase)
        model_file = Path(model_file)
        param = read_net_prototxt(model_file)
        net = build_net(param, phase, level=int(level), stages=tuple(stages or ()), base_dir=model_file.parent)
        net.init_params(torch.Generator().manual_seed(_state["seed"]))
        net.to(device())

        def resolve(path: str) -> Path:
            return resolve_net_path(path, model_file.parent)

        readers = [DataLayer(layer, phase, _state["seed"], resolve) for layer in net.data_layers]
        self._attach(net, readers, bool(param.force_backward))
        self.model_file = model_file
        if weights is not None:
            self.copy_from(weights)

    @classmethod
    def wrap(cls, net: CaffeNet, readers: Sequence[DataLayer], force_backward: bool = False) -> "Net":
        """A pycaffe view of a net built elsewhere (the solver's train and test nets)."""
        self = cls.__new__(cls)
        self._attach(net, readers, force_backward)
        self.model_file = None
        return self

    def _attach(self, net: CaffeNet, readers: Sequence[DataLayer], force_backward: bool) -> None:
        self._net = net
        self.phase = net.phase
        self.force_backward = force_backward
        self._readers = {reader.name: reader for reader in readers}
        self._batch = 0
        self._tape: Dict[int, Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
        self.blobs: "OrderedDict[str, ArrayBlob]" = OrderedDict(
            (name, ArrayBlob(shape)) for name, shape in net.blob_shapes.items())
        for name, weight in net.loss_weights.items():
            self.blobs[name].diff[...] = weight
        self._rebuild_params()
        self._needs_diff = self._blobs_needing_diffs()
        #: a full forward may run as one graph: no layer keeps tops the user may have written
        self._whole_graph_ok = not any(getattr(layer, "refill", None) is not None for layer in net.layers)
        self._fill_once()

    def _blobs_needing_diffs(self) -> set:
        """Caffe's rule: a blob gets a diff when its layer learns or a bottom of it has one
        (every blob with force_backward); data and labels do not, which saves their backward."""
        needed = set()
        for layer in self._net.layers:
            learns = any(param.requires_grad for param in layer.blobs)
            if self.force_backward or learns or any(name in needed for name in layer.param.bottom):
                needed.update(layer.param.top)
        if self.force_backward:
            needed.update(self.blobs)
        return needed

    def _rebuild_params(self) -> None:
        params: "OrderedDict[str, List[TensorBlob]]" = OrderedDict()
        self.layers = []
        for layer in self._net.layers:
            for param in layer.blobs:
                ensure_grad(param)
            user = getattr(layer, "impl", None)
            if user is not None:  # a Python layer: Caffe hands back the user's own object
                user.blobs[:] = [TensorBlob(p) for p in layer.blobs]
                blobs, view = user.blobs, user
            else:
                blobs = [TensorBlob(p) for p in layer.blobs]
                view = LayerView(layer.type_name, blobs)
            if len(blobs):
                params[layer.name] = blobs
            self.layers.append(view)
        self.params = params

    def _fill_once(self) -> None:
        """Fill the tops a layer writes only once (DummyData's constant tops), as Caffe's setup does."""
        for layer in self._net.layers:
            if getattr(layer, "refill", None) is not None:
                with torch.no_grad():
                    for name, value in zip(layer.param.top, layer()):
                        self.blobs[name].store(value.cpu().numpy())

    # -- pycaffe's attributes ------------------------------------------------------------------

    @property
    def inputs(self) -> List[str]:
        """Input blob names: declared inputs and Input layer tops (not Data or DummyData tops)."""
        fed = {top for p in self._net.data_layers for top in p.top}
        return [name for name in self._net.input_blobs if name not in fed]

    @property
    def outputs(self) -> List[str]:
        """Output blob names (produced, never consumed; sorted like Caffe's std::set)."""
        return list(self._net.output_blobs)

    @property
    def _layer_names(self) -> List[str]:
        return list(self._net.layer_names)

    @property
    def _blob_names(self) -> List[str]:
        return list(self.blobs)

    @property
    def layer_dict(self) -> "OrderedDict[str, object]":
        return OrderedDict(zip(self._net.layer_names, self.layers))

    @property
    def top_names(self) -> "OrderedDict[str, List[str]]":
        return OrderedDict((p.name, list(p.top)) for p in self._net.layer_params)

    @property
    def bottom_names(self) -> "OrderedDict[str, List[str]]":
        return OrderedDict((p.name, list(p.bottom)) for p in self._net.layer_params)

    @property
    def blob_loss_weights(self) -> "OrderedDict[str, float]":
        return OrderedDict((name, float(self._net.loss_weights.get(name, 0.0))) for name in self.blobs)

    @property
    def torch_net(self) -> CaffeNet:
        """The underlying :class:`lymph_cv.net.build.CaffeNet`."""
        return self._net

    def _layer_index(self, name: Optional[str], default: int) -> int:
        if name is None:
            return default
        try:
            return self._net.layer_names.index(name)
        except ValueError:
            raise ConfigError(f"net has no layer {name!r}", valid=self._net.layer_names) from None

    # -- the engine ----------------------------------------------------------------------------

    def _records(self) -> bool:
        return self.phase == TRAIN or self.force_backward

    def _leaf(self, name: str, grad: bool) -> torch.Tensor:
        # a copy: a later in-place layer overwrites the blob's memory, not what autograd saved
        tensor = torch.tensor(self.blobs[name].data, device=self._device_of())
        if tensor.dim() == 4 and self._net.channels_last:  # the engine's layout: same values, faster convolutions
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor.requires_grad_(grad)

    def _device_of(self) -> torch.device:
        for param in self._net.parameters():
            return param.device
        for buffer in self._net.buffers():
            return buffer.device
        return torch.device("cpu")

    @contextlib.contextmanager
    def synced(self) -> Iterator[None]:
        """Around a computation: push host copies of device weights (what Python wrote) before, pull
        the results after.  A no-op on the CPU, where the blobs are views."""
        params = list(self._net.parameters())
        push_host(params)
        try:
            yield
        finally:
            pull_host(params)

    def _read(self, layer_name: str, batch: Optional[int]) -> None:
        reader = self._readers.get(layer_name)
        if reader is None:
            raise ConfigError(f"Data layer {layer_name!r} has no reader (a net wrapped without its data)")
        number = self._batch if batch is None else batch
        for name, tensor in reader.batch(number).items():
            self.blobs[name].store(tensor.cpu().numpy())

    def _run_layer(self, index: int, grad: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        layer = self._net.layers[index]
        # propagate_down: false stops the diff at that bottom (Caffe then leaves its diff alone)
        wanted = list(layer.param.propagate_down) or [True] * len(layer.param.bottom)
        bottoms = [self._leaf(name, grad and want and name in self._needs_diff)
                   for name, want in zip(layer.param.bottom, wanted)]
        with torch.set_grad_enabled(grad):
            tops = list(layer(*bottoms))
        return bottoms, tops

    def forward_range(self, start: int, end: int, batch: Optional[int] = None) -> float:
        """Caffe's ForwardFromTo over layer indices ``start..end``; returns the loss computed there.
        ``batch`` picks the Data layers' batch number (default: the net's own counter)."""
        grad = self._records()
        if not grad and start == 0 and end == len(self._net.layers) - 1 and self._whole_graph_ok:
            return self._forward_whole(batch)
        loss = 0.0
        read = False
        for index in range(start, end + 1):
            layer = self._net.layers[index]
            if layer.is_input:
                if layer.param.type == "Data":
                    self._read(layer.name, batch)
                    read = True
                continue
            bottoms, tops = self._run_layer(index, grad)
            if grad:
                self._tape[index] = (bottoms, tops)
            refill = getattr(layer, "refill", None)
            for k, (name, value) in enumerate(zip(layer.param.top, tops)):
                if refill is not None and not refill[k]:
                    continue
                self.blobs[name].store(value.detach().to("cpu", torch.float32).numpy())
                weight = self._net.loss_weights.get(name)
                if weight:
                    loss += weight * float(self.blobs[name].data.sum())
        if read and batch is None:
            self._batch += 1
        return loss

    def _forward_whole(self, batch: Optional[int]) -> float:
        """The whole net as one torch graph (nothing to record, no top filled only once): the blobs end
        as the per-layer run leaves them, without its per-layer copies (deploy nets, Classifier)."""
        for param in self._net.data_layers:
            self._read(param.name, batch)
        device = self._device_of()
        inputs = {name: torch.from_numpy(self.blobs[name].data).to(device) for name in self._net.input_blobs}
        with torch.no_grad():
            results = self._net(inputs)
        loss = 0.0
        for name, value in results.items():
            if name in inputs:
                continue
            self.blobs[name].store(value.to("cpu", torch.float32).numpy())
            weight = self._net.loss_weights.get(name)
            if weight:
                loss += weight * float(self.blobs[name].data.sum())
        if self._net.data_layers and batch is None:
            self._batch += 1
        return loss

    def _diff_like(self, name: str, top: torch.Tensor) -> torch.Tensor:
        """Blob ``name``'s diff as a tensor in ``top``'s layout (a mismatch slows convolutions' backward)."""
        diff = torch.from_numpy(np.ascontiguousarray(self.blobs[name].diff)).to(top.device).reshape(top.shape)
        if top.dim() == 4 and top.is_contiguous(memory_format=torch.channels_last):
            diff = diff.contiguous(memory_format=torch.channels_last)
        return diff

    def backward_range(self, start: int, end: int) -> None:
        """Caffe's BackwardFromTo over layer indices ``start`` down to ``end``."""
        written = set()
        for index in range(start, end - 1, -1):
            layer = self._net.layers[index]
            p = layer.param
            if layer.is_input or (not len(p.bottom) and not len(layer.blobs)):
                continue
            bottoms, tops = self._tape.get(index) or self._run_layer(index, True)
            pairs = [(top, self._diff_like(name, top)) for name, top in zip(p.top, tops) if top.requires_grad]
            targets = [b for b in bottoms if b.requires_grad] + [w for w in layer.blobs if w.requires_grad]
            for bottom in bottoms:
                bottom.grad = None
            if pairs and targets:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs], retain_graph=True,
                                        inputs=targets)
            for name, bottom, want in zip(p.bottom, bottoms, list(p.propagate_down) or [True] * len(p.bottom)):
                if not want or name not in self._needs_diff:
                    continue  # Caffe leaves that diff alone
                diff = (bottom.grad.detach().to("cpu", torch.float32).numpy() if bottom.grad is not None
                        else np.zeros(tuple(bottom.shape), dtype=np.float32))
                blob = self.blobs[name]
                if blob.diff.shape != diff.shape:
                    blob.diff = np.zeros(diff.shape, dtype=np.float32)
                if name in written and name not in p.top:
                    blob.diff += diff
                else:
                    blob.diff[...] = diff
                written.add(name)

    # -- pycaffe's computation -----------------------------------------------------------------

    def _set_inputs(self, inputs: Mapping[str, np.ndarray], field: str, allowed: Sequence[str]) -> None:
        for name, array in inputs.items():
            if name not in allowed:
                raise ConfigError(f"{name!r} is not an {'input' if field == 'data' else 'output'} blob",
                                  valid=allowed)
            array = np.asarray(array, dtype=np.float32)
            blob = self.blobs[name]
            if blob.data.ndim and array.shape[:1] != blob.shape[:1]:
                raise ConfigError(f"{name!r}: batch of {array.shape[0] if array.ndim else 0}, "
                                  f"the net takes {blob.shape[0]}")
            if field == "data":
                blob.store(array)
            else:
                blob.diff[...] = array

    def _known(self, names: Sequence[str], extra: Optional[Sequence[str]]) -> List[str]:
        """``names`` then ``extra``, each once; ConfigError naming any that is not a blob."""
        wanted = list(dict.fromkeys(list(names) + list(extra or [])))
        missing = [b for b in wanted if b not in self.blobs]
        if missing:
            raise ConfigError(f"unknown blob(s) {', '.join(missing)}", valid=list(self.blobs))
        return wanted

    def forward(self, blobs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                end: Optional[str] = None, **kwargs: np.ndarray) -> Dict[str, np.ndarray]:
        """Set the given input blobs, run layers ``start``..``end`` (names, inclusive), return the
        output blobs (the ``end`` layer's tops when given) and ``blobs`` by name."""
        first = self._layer_index(start, 0)
        last = self._layer_index(end, len(self.layers) - 1)
        wanted = self._known((self.top_names[end] if end is not None else self.outputs), blobs)
        self._set_inputs(kwargs, "data", self.inputs)
        with self.synced():
            self.forward_range(first, last)
        return {name: self.blobs[name].data for name in wanted}

    def backward(self, diffs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                 end: Optional[str] = None, **kwargs: np.ndarray) -> Dict[str, np.ndarray]:
        """Set the given output diffs, run layers ``start`` down to ``end`` backward, return the input
        diffs (the ``end`` layer's bottoms' when given) and ``diffs`` by name."""
        first = self._layer_index(start, len(self.layers) - 1)
        last = self._layer_index(end, 0)
        wanted = self._known((self.bottom_names[end] if end is not None else self.inputs), diffs)
        self._set_inputs(kwargs, "diff", self.outputs)
        with self.synced():
            self.backward_range(first, last)
        return {name: self.blobs[name].diff for name in wanted}

    def reshape(self) -> None:
        """Propagate the input blobs' shapes through the net (Data layers keep their batch)."""
        with torch.no_grad(), self.synced():
            for index, layer in enumerate(self._net.layers):
                if layer.is_input:
                    continue
                _, tops = self._run_layer(index, False)
                for name, value in zip(layer.param.top, tops):
                    self.blobs[name].reshape(*value.shape)

    def _batches(self, inputs: Mapping[str, np.ndarray]) -> Iterator[Dict[str, np.ndarray]]:
        """Net-sized batches of ``inputs``, the last one zero-padded."""
        if not inputs:
            return
        batch = next(iter(self.blobs.values())).shape[0]
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

    @staticmethod
    def _total(kwargs: Mapping[str, np.ndarray]) -> int:
        sizes = {len(v) for v in kwargs.values()}
        if len(sizes) != 1:
            raise ConfigError("the input arrays must have the same length")
        return sizes.pop()

    @staticmethod
    def _stack(collected: Dict[str, List[np.ndarray]], total: int) -> Dict[str, np.ndarray]:
        return {name: np.concatenate(parts)[:total] if parts and parts[0].ndim else np.asarray(parts)
                for name, parts in collected.items()}

    def forward_all(self, blobs: Optional[Sequence[str]] = None, **kwargs: np.ndarray) -> Dict[str, np.ndarray]:
        """Forward any number of inputs in net-sized batches; outputs stacked, padding dropped."""
        if not kwargs:
            raise ConfigError("forward_all needs input arrays, e.g. forward_all(data=...)")
        total = self._total(kwargs)
        collected: Dict[str, List[np.ndarray]] = {}
        for chunk in self._batches(kwargs):
            for name, value in self.forward(blobs=blobs, **chunk).items():
                collected.setdefault(name, []).append(np.array(value, copy=True))
        return self._stack(collected, total)

    def forward_backward_all(self, blobs: Optional[Sequence[str]] = None, diffs: Optional[Sequence[str]] = None,
                             **kwargs: np.ndarray) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        """forward + backward in net-sized batches: inputs and output diffs from ``kwargs``."""
        if not kwargs:
            raise ConfigError("forward_backward_all needs input or output-diff arrays")
        total = self._total(kwargs)
        forward_in = {k: v for k, v in kwargs.items() if k in self.inputs}
        backward_in = {k: v for k, v in kwargs.items() if k in self.outputs}
        unknown = sorted(set(kwargs) - set(forward_in) - set(backward_in))
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: neither an input nor an output blob")
        outs: Dict[str, List[np.ndarray]] = {}
        grads: Dict[str, List[np.ndarray]] = {}
        for fb, bb in zip_longest(self._batches(forward_in), self._batches(backward_in), fillvalue={}):
            for name, value in self.forward(blobs=blobs, **fb).items():
                outs.setdefault(name, []).append(np.array(value, copy=True))
            for name, value in self.backward(diffs=diffs, **bb).items():
                grads.setdefault(name, []).append(np.array(value, copy=True))
        return self._stack(outs, total), self._stack(grads, total)

    def clear_param_diffs(self) -> None:
        """Zero every learnable blob's diff (in place: views of them stay valid)."""
        with self.synced():
            for param in self._net.parameters():
                ensure_grad(param).zero_()

    # -- weights -------------------------------------------------------------------------------

    def copy_from(self, weights: str | os.PathLike) -> None:
        """Load a .caffemodel's blobs by layer name (pycaffe's copy_from)."""
        with self.synced():
            self._net.load_weights(read_caffemodel(weights), path=weights)

    def share_with(self, other: "Net") -> None:
        """Use ``other``'s learnable blobs for every same-named layer (Caffe's ShareTrainedLayersWith)."""
        with other.synced(), self.synced():
            self._net.share_weights_from(other.torch_net)
            self._rebuild_params()

    def save(self, filename: str | os.PathLike) -> None:
        """Write the weights as a .caffemodel (legacy 4-D blob dims, like the tutorial's files)."""
        with self.synced():
            write_caffemodel(filename, self._net.export_weights(legacy_dims=True))

    def save_hdf5(self, filename: str | os.PathLike) -> None:
        """Write the weights as Caffe's HDF5 model: ``/data/<layer>/<i>`` datasets."""
        import h5py

        with self.synced(), h5py.File(filename, "w") as out:
            group = out.create_group(HDF5_DATA_GROUP)
            for name, blobs in self.params.items():
                layer = group.create_group(name)
                for index, blob in enumerate(blobs):
                    layer.create_dataset(str(index), data=np.array(blob.data, dtype=np.float32))

    def load_hdf5(self, filename: str | os.PathLike) -> None:
        """Load weights written by :meth:`save_hdf5` (or Caffe) by layer name."""
        import h5py

        with h5py.File(filename, "r") as source:
            if HDF5_DATA_GROUP not in source:
                raise FormatError(f"no {HDF5_DATA_GROUP!r} group (not a Caffe HDF5 model)", filename)
            group = source[HDF5_DATA_GROUP]
            for name in group:
                if name not in self.params:
                    continue
                blobs = self.params[name]
                if len(group[name]) != len(blobs):
                    raise FormatError(f"layer {name!r}: the file has {len(group[name])} blobs, the net "
                                      f"{len(blobs)}", filename)
                for index, blob in enumerate(blobs):
                    values = np.asarray(group[name][str(index)], dtype=np.float32)
                    if values.size != blob.count:
                        raise FormatError(f"layer {name!r} blob {index}: {values.shape} does not fit "
                                          f"{blob.shape}", filename)
                    blob.data = values.reshape(blob.shape)
