"""The rest of pycaffe's top level: ``caffe.Layer``, ``layer_type_list``, the multi-solver counters,
``has_nccl``, ``Timer`` and the glog shims."""
from __future__ import annotations

import logging
import os
import time
from typing import List, Optional

import torch

from lymph_cv.net.layers import supported_types

log = logging.getLogger("caffe")

#: Values set by set_solver_count/set_solver_rank (None: ask torch.distributed, then the environment).
_solvers = {"count": None, "rank": None, "multiprocess": False}
RANK_ENV, WORLD_SIZE_ENV = "RANK", "WORLD_SIZE"
MS_PER_S = 1000.0


class Layer:
    """Base class of layers written in Python (``type: "Python"``).

    The net sets ``param_str``, ``phase``, ``type`` and ``blobs`` (``blobs.add_blob(*shape)``) before
    calling ``setup``; override ``setup``, ``reshape``, ``forward`` and ``backward``.
    """

    def __init__(self, param=None):
        self.layer_param = param

    def setup(self, bottom, top) -> None:
        """Called once with the bottom and top blobs."""

    def reshape(self, bottom, top) -> None:
        """Called before every forward: reshape the tops."""

    def forward(self, bottom, top) -> None:
        """Write the tops' data from the bottoms'."""

    def backward(self, top, propagate_down, bottom) -> None:
        """Write the bottoms' diffs from the tops' (where ``propagate_down``)."""


def layer_type_list() -> List[str]:
    """The layer types nets can use."""
    return supported_types()


def _distributed(what: str) -> Optional[int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() if what == "count" else torch.distributed.get_rank()
    return None


def solver_count() -> int:
    """How many solvers train together: set_solver_count's value, else torch.distributed's world
    size, else $WORLD_SIZE, else 1."""
    if _solvers["count"] is not None:
        return _solvers["count"]
    found = _distributed("count")
    return found if found is not None else int(os.environ.get(WORLD_SIZE_ENV, 1))


def solver_rank() -> int:
    """This process's rank among them (same sources as :func:`solver_count`; default 0)."""
    if _solvers["rank"] is not None:
        return _solvers["rank"]
    found = _distributed("rank")
    return found if found is not None else int(os.environ.get(RANK_ENV, 0))


def set_solver_count(count: int) -> None:
    _solvers["count"] = int(count)


def set_solver_rank(rank: int) -> None:
    _solvers["rank"] = int(rank)


def set_multiprocess(multiprocess: bool) -> None:
    _solvers["multiprocess"] = bool(multiprocess)


def has_nccl() -> bool:
    """False: multi-GPU training goes through torch.distributed (``lymph-cv train`` with several ranks)."""
    return False


def init_log(*_args) -> None:
    """glog set-up: logging is the ``logging`` module's here, nothing to do."""


def log_info(message: str) -> None:
    """``caffe.log``: one INFO line."""
    log.info("%s", message)


class Timer:
    """``caffe.Timer``: ``start()``, ``stop()``, ``ms`` (the last start–stop interval)."""

    def __init__(self):
        self._start: Optional[float] = None
        self._ms = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self._ms = (time.perf_counter() - self._start) * MS_PER_S
            self._start = None

    @property
    def ms(self) -> float:
        return self._ms
