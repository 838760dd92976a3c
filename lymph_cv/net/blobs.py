"""Caffe blobs as numpy arrays: what pycaffe and Python layers see (``data``, ``diff``, ``reshape``).

:class:`ArrayBlob` owns two float32 arrays of one shape.  :class:`TensorBlob` is a learnable blob:
``data`` and ``diff`` are live numpy views of a torch parameter and its gradient, so writes from
Python go straight into what the engine computes with (CPU parameters; on CUDA they are copies).
"""
from __future__ import annotations

from typing import Optional, Sequence

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


class TensorBlob(BlobShapeMixin):
    """A learnable blob over a torch parameter: ``data``/``diff`` are views of it and its gradient."""

    def __init__(self, param: torch.Tensor):
        self.param = param

    @staticmethod
    def _view(tensor: torch.Tensor) -> np.ndarray:
        if tensor.device.type == "cpu":
            return tensor.detach().numpy()
        return tensor.detach().cpu().numpy()

    @property
    def data(self) -> np.ndarray:
        return self._view(self.param)

    @data.setter
    def data(self, value: np.ndarray) -> None:
        with torch.no_grad():
            self.param.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(self.param.shape))

    @property
    def diff(self) -> np.ndarray:
        return self._view(ensure_grad(self.param))

    @diff.setter
    def diff(self, value: np.ndarray) -> None:
        grad = ensure_grad(self.param)
        grad.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(grad.shape))

    def reshape(self, *shape: int) -> None:
        if _shape_args(shape) != self.shape:
            raise ConfigError("learnable blobs keep the shape their layer gives them")
