"""Layer-by-layer forward/backward timing, as ``caffe time`` reports it.

Caffe times each layer's Forward and Backward separately.  To do the same with autograd, every
layer runs on detached copies of its bottoms, so the graph is cut at layer boundaries; the backward
then walks the layers in reverse, each ``autograd.backward`` call computing exactly one layer's
gradients (parameters and bottoms) from the gradients of its tops.  The parameter gradients equal
those of one whole-net backward.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from lymph_cv.formats import caffelog
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.prototxt import read_net_prototxt
from lymph_cv.formats.caffelog import CaffeLog, fmt
from lymph_cv.net.datalayer import DataLayer
from lymph_cv.errors import ConfigError
from lymph_cv.net.build import CaffeNet, build_net


@dataclass
class LayerTime:
    """Average milliseconds of one layer's forward and backward."""

    name: str
    forward_ms: float = 0.0
    backward_ms: float = 0.0


@dataclass
class Timing:
    """``caffe time``'s figures: per-iteration totals and per-layer averages (milliseconds)."""

    iterations: int
    iteration_ms: List[float] = field(default_factory=list)
    layers: List[LayerTime] = field(default_factory=list)

    @property
    def forward_ms(self) -> float:
        return sum(layer.forward_ms for layer in self.layers)

    @property
    def backward_ms(self) -> float:
        return sum(layer.backward_ms for layer in self.layers)

    @property
    def mean_ms(self) -> float:
        return sum(self.iteration_ms) / max(len(self.iteration_ms), 1)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def forward_backward_by_layer(net: CaffeNet, inputs: Mapping[str, torch.Tensor],
                              sync: Callable[[], None] = lambda: None
                              ) -> Tuple[float, List[float], List[float]]:
    """One forward and backward, layer by layer: (loss, forward seconds, backward seconds) per layer
    of ``net.layers`` (input layers take 0)."""
    blobs: Dict[str, torch.Tensor] = dict(inputs)
    if getattr(net, "channels_last", False):  # the memory layout CaffeNet.forward gives its inputs
        blobs = {name: value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value
                 for name, value in blobs.items()}
    records = []
    forward = [0.0] * len(net.layers)
    backward = [0.0] * len(net.layers)
    for index, layer in enumerate(net.layers):
        if layer.is_input:
            continue
        start = time.perf_counter()
        leaves = []
        for name in layer.param.bottom:
            source = blobs[name]
            leaves.append((source.detach().requires_grad_(source.requires_grad), source))
        tops = layer(*[leaf for leaf, _ in leaves])
        for name, value in zip(layer.param.top, tops):
            blobs[name] = value
        sync()
        forward[index] = time.perf_counter() - start
        records.append((index, leaves, list(tops)))
    # A net without a loss (a deploy net) still runs its backward in Caffe: nothing to propagate.
    loss = net.loss(blobs) if net.loss_weights else torch.zeros(())
    grads: Dict[int, torch.Tensor] = {}
    for name, weight in net.loss_weights.items():
        grads[id(blobs[name])] = torch.full_like(blobs[name], weight)
    for index, leaves, tops in reversed(records):
        start = time.perf_counter()
        pairs = [(top, grads.pop(id(top))) for top in tops if id(top) in grads and top.requires_grad]
        if pairs:
            torch.autograd.backward([top for top, _ in pairs], [grad for _, grad in pairs])
            for leaf, source in leaves:
                if leaf.grad is not None:
                    key = id(source)
                    grads[key] = grads[key] + leaf.grad if key in grads else leaf.grad
        sync()
        backward[index] = time.perf_counter() - start
    return float(loss.detach()), forward, backward


def time_net(net: CaffeNet, batch: Callable[[int], Mapping[str, torch.Tensor]], iterations: int,
             device: torch.device, on_iteration: Optional[Callable[[int, float], None]] = None) -> Timing:
    """``caffe time``: one warm-up pass, then ``iterations`` timed layer-wise forward-backward passes
    on batches ``batch(0..)``; parameter gradients are zeroed before each pass."""
    sync = synchronizer(device)
    params = [entry.param for entry in net.learnable]
    result = Timing(iterations, layers=[LayerTime(p.name) for p in net.layer_params])

    def one(index: int) -> Tuple[List[float], List[float]]:
        for param in params:
            param.grad = None
        inputs = batch(index)
        sync()
        _, forward, backward = forward_backward_by_layer(net, inputs, sync)
        return forward, backward

    one(0)
    for i in range(iterations):
        forward, backward = one(i + 1)
        total = (sum(forward) + sum(backward)) * 1000.0
        result.iteration_ms.append(total)
        for entry, f, b in zip(result.layers, forward, backward):
            entry.forward_ms += f * 1000.0 / iterations
            entry.backward_ms += b * 1000.0 / iterations
        if on_iteration is not None:
            on_iteration(i + 1, total)
    return result


def time_model(model: os.PathLike, iterations: int, *, phase: int = caffe_pb2.TRAIN,
               device: Optional[str] = "cpu", seed: int = 0, log: Optional[CaffeLog] = None) -> Timing:
    """``caffe time``: build ``model`` for ``phase`` with filler weights, feed its Data layers (input
    blobs without one stay zero, as Caffe's fresh blobs are) and time ``iterations`` passes."""
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    from lymph_cv.stages.train import STREAM_INIT, derived_seed, feed, find_input, resolve_device

    model = Path(model)
    target = resolve_device(device, caffe_pb2.SolverParameter.CPU)
    net = build_net(read_net_prototxt(model), phase, base_dir=model.parent, source=model)
    net.init_params(torch.Generator().manual_seed(derived_seed(seed, STREAM_INIT, 1)))
    net.to(target)
    readers = [DataLayer(p, phase, seed, lambda path: find_input(path, model.parent))
               for p in net.data_layers]
    fed = {top for reader in readers for top in reader.tops}
    zeros = {name: torch.zeros(net.blob_shapes[name], device=target)
             for name in net.input_blobs if name not in fed}

    def batch(index: int) -> Dict[str, torch.Tensor]:
        return {**zeros, **feed(readers, index, target)}

    say = log.info if log is not None else (lambda message, src=None: None)
    say("*** Benchmark begins ***", caffelog.SRC_TOOL)
    say(f"Testing for {iterations} iterations.", caffelog.SRC_TOOL)
    result = time_net(net, batch, iterations, target, on_iteration=lambda j, ms: say(
        f"Iteration: {j} forward-backward time: {fmt(ms)} ms.", caffelog.SRC_TOOL))
    say("Average time per layer: ", caffelog.SRC_TOOL)
    for layer in result.layers:
        say(f"{layer.name:>10}\tforward: {fmt(layer.forward_ms)} ms.", caffelog.SRC_TOOL)
        say(f"{layer.name:>10}\tbackward: {fmt(layer.backward_ms)} ms.", caffelog.SRC_TOOL)
    say(f"Average Forward pass: {fmt(result.forward_ms)} ms.", caffelog.SRC_TOOL)
    say(f"Average Backward pass: {fmt(result.backward_ms)} ms.", caffelog.SRC_TOOL)
    say(f"Average Forward-Backward: {fmt(result.mean_ms)} ms.", caffelog.SRC_TOOL)
    say(f"Total Time: {fmt(sum(result.iteration_ms))} ms.", caffelog.SRC_TOOL)
    say("*** Benchmark ends ***", caffelog.SRC_TOOL)
    return result
