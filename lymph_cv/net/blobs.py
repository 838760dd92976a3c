"""Caffe blobs as numpy arrays: what pycaffe and Python layers see (``data``, ``diff``, ``reshape``).

:class:`ArrayBlob` owns two float32 arrays of one shape.  :class:`TensorBlob` is a learnable blob:
``data`` and ``diff`` are live numpy views of a torch parameter and its gradient, so writes from
Python go straight into what the engine computes with (on CUDA, host copies synced around each
computation).
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from lymph_cv.errors import ConfigError


class BlobShapeMixin:
    """Caffe's shape accessors over ``self.data``."""

    data: np.ndarray

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    def _axis(self, index: int) -> int:
        # Caffe's legacy accessors read 1 for axes the blob does not have.
        return int(self.data.shape[index]) if self.data.ndim > index else 1

    @property
    def num(self) -> int:
        return self._axis(0)

    @property
    def channels(self) -> int:
        return self._axis(1)

    @property
    def height(self) -> int:
        return self._axis(2)

    @property
    def width(self) -> int:
        return self._axis(3)


def _shape_args(shape: Sequence) -> tuple:
    if len(shape) == 1 and not np.isscalar(shape[0]):
        shape = tuple(shape[0])  # reshape((2, 3)) as well as reshape(2, 3)
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ConfigError(f"blob dimensions must be >= 0, got {dims}")
    return dims


class ArrayBlob(BlobShapeMixin):
    """A named activation blob: ``data`` and ``diff`` float32 arrays of one shape."""

    def __init__(self, shape: Sequence[int] = (), data: Optional[np.ndarray] = None):
        if data is not None:
            self.data = np.ascontiguousarray(data, dtype=np.float32)
        else:
            self.data = np.zeros(tuple(int(d) for d in shape), dtype=np.float32)
        self.diff = np.zeros_like(self.data)

    def reshape(self, *shape: int) -> None:
        """New dimensions; contents are kept only when the shape stays the same (Caffe keeps the
        memory, whose values are then meaningless, so zeros are the honest choice)."""
        dims = _shape_args(shape)
        if dims != self.shape:
            self.data = np.zeros(dims, dtype=np.float32)
            self.diff = np.zeros(dims, dtype=np.float32)

    def store(self, values: np.ndarray) -> None:
        """Write ``values`` into ``data`` (in place when the shape is unchanged, so views stay live)."""
        if values.shape != self.data.shape:
            self.reshape(*values.shape)
        self.data[...] = values


def ensure_grad(param: torch.Tensor) -> torch.Tensor:
    """The parameter's gradient tensor, created as zeros when absent (autograd then accumulates into it)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


class HostCopy:
    """Host arrays standing in for a device parameter and its gradient (a simplified SyncedMemory):
    Python reads and writes them; :func:`push_host` / :func:`pull_host` move them around the engine."""

    def __init__(self, param: torch.Tensor):
        self.data = param.detach().to("cpu", torch.float32).numpy().copy()
        self.diff = ensure_grad(param).detach().to("cpu", torch.float32).numpy().copy()


#: id of a device parameter → its host copy, shared by every blob (and net) over that parameter; an
#: entry goes when its parameter does (tensors compare elementwise, so they cannot be dict keys).
_HOST_COPIES: Dict[int, HostCopy] = {}


def host_copy(param: torch.Tensor) -> HostCopy:
    """The parameter's host copy, made from its current values on first use."""
    found = _HOST_COPIES.get(id(param))
    if found is None:
        found = _HOST_COPIES[id(param)] = HostCopy(param)
        weakref.finalize(param, _HOST_COPIES.pop, id(param), None)
    return found


def push_host(params: Iterable[torch.Tensor]) -> None:
    """Before the engine runs: what Python wrote into host copies goes to the parameters."""
    with torch.no_grad():
        for param in params:
            found = _HOST_COPIES.get(id(param))
            if found is not None:
                # through .data: no autograd version bump, so a recorded forward stays usable (and,
                # as in Caffe, its backward sees the weights as they are now)
                param.data.copy_(torch.from_numpy(found.data).reshape(param.shape))
                ensure_grad(param).copy_(torch.from_numpy(found.diff).reshape(param.shape))


def pull_host(params: Iterable[torch.Tensor]) -> None:
    """After the engine ran: the parameters' new values go to their host copies (in place)."""
    for param in params:
        found = _HOST_COPIES.get(id(param))
        if found is not None:
            found.data[...] = param.detach().to("cpu", torch.float32).numpy().reshape(found.data.shape)
            found.diff[...] = ensure_grad(param).detach().to("cpu", torch.float32).numpy().reshape(found.diff.shape)


class TensorBlob(BlobShapeMixin):
    """A learnable blob over a torch parameter: ``data``/``diff`` are live views of it and its gradient
    on the CPU; for a parameter on another device (``mirrored``) they are its :class:`HostCopy`, which
    the net pushes before and pulls after each computation, so writes into them still take effect."""

    def __init__(self, param: torch.Tensor, mirrored: Optional[bool] = None):
        self.param = param
        self.mirrored = param.device.type != "cpu" if mirrored is None else bool(mirrored)

    @property
    def data(self) -> np.ndarray:
        if self.mirrored:
            return host_copy(self.param).data
        return self.param.detach().numpy()

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self.data[...] = np.asarray(value, dtype=np.float32).reshape(self.shape)

    @property
    def diff(self) -> np.ndarray:
        if self.mirrored:
            return host_copy(self.param).diff
        return ensure_grad(self.param).detach().numpy()

    @diff.setter
    def diff(self, value: np.ndarray) -> None:
        self.diff[...] = np.asarray(value, dtype=np.float32).reshape(self.shape)

    def reshape(self, *shape: int) -> None:
        if _shape_args(shape) != self.shape:
            raise ConfigError("learnable blobs keep the shape their layer gives them")
