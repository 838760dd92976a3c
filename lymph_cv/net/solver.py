"""Caffe's solvers and learning-rate policies on plain torch tensors.

The updates follow Caffe's ``sgd_solver.cpp`` family operation by operation (float32, same order),
so a step here equals a step of ``caffe train``: the learning rate is computed from the number of
updates already done, gradients are clipped by their global L2 norm, normalised by ``iter_size``,
regularised (``weight_decay · decay_mult``) and then turned into the update by the solver type,
with ``base rate · lr_mult`` per parameter.  ``torch.optim`` is deliberately not used: its SGD keeps
the learning rate outside the momentum history and its state layout is not Caffe's solverstate.

History blobs are kept in Caffe's order (one per learnable parameter in net order; AdaDelta and Adam
append a second set), so they round-trip through ``.solverstate`` files.

Two extensions real Caffe does not know (caffe.proto marks them): ``lr_policy: "onecycle"`` (fastai's
one-cycle schedule of the rate and the momentum, :func:`one_cycle`) and ``type: "AdamW"`` (Adam with
decoupled weight decay, none on biases, BatchNorm, Scale and Bias blobs).  Both are functions of the
iteration alone, so a resumed run continues them exactly.
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.prototxt import upgrade_solver
from lymph_cv.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid", "onecycle")
#: layer types none of whose blobs AdamW decays; of the other layers only the weights (blob 0) decay.
NO_DECAY_TYPES = ("BatchNorm", "Scale", "Bias", "PReLU")
REGULARIZATION_TYPES = ("L2", "L1")

def solver_type(param: caffe_pb2.SolverParameter, path=None) -> str:
    """The solver's type string; the deprecated ``solver_type`` enum is mapped like Caffe's upgrade."""
    upgraded = caffe_pb2.SolverParameter()
    upgraded.CopyFrom(param)
    return upgrade_solver(upgraded, path).type


def cosine(start: float, end: float, position: float) -> float:
    """fastai's ``SchedCos``: from ``start`` (position 0) to ``end`` (position 1) along a half cosine."""
    return start + (1.0 + math.cos(math.pi * (1.0 - position))) * (end - start) / 2.0


def one_cycle(iteration: int, param: caffe_pb2.SolverParameter) -> tuple[float, float]:
    """(rate, momentum) of lr_policy ``onecycle`` before update number ``iteration`` of ``max_iter``.

    fastai's ``fit_one_cycle`` with the training position ``iteration / max_iter``: the first
    ``pct_start`` of it warms the rate up from ``base_lr / div`` to ``base_lr`` while the momentum
    falls from ``max_momentum`` to ``base_momentum``; the rest anneals the rate to
    ``base_lr / div_final`` and brings the momentum back (each a half cosine)."""
    cycle = param.onecycle_param
    top = param.base_lr
    position = min(1.0, iteration / param.max_iter)
    if position < cycle.pct_start:
        part = position / cycle.pct_start
        return (cosine(top / cycle.div, top, part),
                cosine(cycle.max_momentum, cycle.base_momentum, part))
    part = (position - cycle.pct_start) / (1.0 - cycle.pct_start)
    return (cosine(top, top / cycle.div_final, part),
            cosine(cycle.base_momentum, cycle.max_momentum, part))


class LearningRate:
    """Caffe's ``GetLearningRate``: the rate for a given number of completed updates.

    ``current_step`` is the solverstate's field: it advances for ``step`` and ``multistep``.
    """

    def __init__(self, param: caffe_pb2.SolverParameter, path=None):
        self.param = param
        self.policy = param.lr_policy
        self.current_step = 0
        if not param.HasField("lr_policy"):
            raise ConfigError("lr_policy is not set", path, valid=LR_POLICIES)
        if self.policy not in LR_POLICIES:
            raise ConfigError(f"unknown lr_policy {self.policy!r}", path, valid=LR_POLICIES)
        if self.policy == "step" and param.stepsize <= 0:
            raise ConfigError("lr_policy step needs stepsize > 0", path)
        if self.policy in ("poly", "onecycle") and param.max_iter <= 0:
            raise ConfigError(f"lr_policy {self.policy} needs max_iter > 0", path)
        if self.policy == "onecycle":
            cycle = param.onecycle_param
            if not 0.0 < cycle.pct_start < 1.0:
                raise ConfigError(f"onecycle_param.pct_start must be in (0, 1), got {cycle.pct_start:g}", path)
            if cycle.div <= 0 or cycle.div_final <= 0:
                raise ConfigError("onecycle_param.div and div_final must be > 0", path)

    def __call__(self, iteration: int) -> float:
        p = self.param
        if self.policy == "fixed":
            return p.base_lr
        if self.policy == "step":
            self.current_step = iteration // p.stepsize
            return p.base_lr * p.gamma ** self.current_step
        if self.policy == "exp":
            return p.base_lr * p.gamma ** iteration
        if self.policy == "inv":
            return p.base_lr * (1.0 + p.gamma * iteration) ** (-p.power)
        if self.policy == "multistep":
            if self.current_step < len(p.stepvalue) and iteration >= p.stepvalue[self.current_step]:
                self.current_step += 1
                log.info("MultiStep Status: Iteration %d, step = %d", iteration, self.current_step)
            return p.base_lr * p.gamma ** self.current_step
        if self.policy == "poly":
            return p.base_lr * (1.0 - iteration / p.max_iter) ** p.power
        if self.policy == "onecycle":
            return one_cycle(iteration, p)[0]
        return p.base_lr * (1.0 / (1.0 + math.exp(-p.gamma * (iteration - p.stepsize))))


@dataclass
class Learnable:
    """One learnable blob as the solver sees it: the tensor and its multipliers."""

    param: torch.Tensor
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    name: str = ""
    #: whether AdamW's decoupled weight decay applies (weights yes; biases, BatchNorm, Scale no).
    decoupled_decay: bool = True


class Solver(ABC):
    """Base class: the update pipeline shared by every solver type (clip → normalise → decay → update)."""

    #: how many history sets the solverstate carries (one blob per parameter each).
    history_sets = 1
    #: history sets that accumulate squares, so a valid state never holds a negative value there.
    squared_sets: tuple = ()
    #: whether ``momentum`` is a momentum that lr_policy onecycle cycles (not AdaDelta's decay).
    cycles_momentum = False

    def __init__(self, param: caffe_pb2.SolverParameter, learnables: Sequence[Learnable], path=None):
        self.param = param
        self.path = path
        self.learnables: List[Learnable] = list(learnables)
        self.lr = LearningRate(param, path)
        if param.regularization_type not in REGULARIZATION_TYPES:
            raise ConfigError(f"unknown regularization_type {param.regularization_type!r}", path,
                              valid=REGULARIZATION_TYPES)
        if param.iter_size < 1:
            raise ConfigError("iter_size must be >= 1", path)
        self.history: List[torch.Tensor] = [
            torch.zeros_like(item.param, memory_format=torch.contiguous_format)
            for _ in range(self.history_sets) for item in self.learnables]
        self.iter = 0
        #: the momentum of the update in progress (the solver's, or the one-cycle schedule's).
        self.momentum = float(param.momentum)
        #: called with each log message of the update (clipping); set by the training loop.
        self.on_message: Callable[[str], None] = log.info

    # ------------------------------------------------------------------ state
    @property
    def current_step(self) -> int:
        return self.lr.current_step

    def history_arrays(self) -> List[np.ndarray]:
        """History blobs in Caffe's order, as float32 arrays of the parameter shapes."""
        return [h.detach().cpu().numpy().astype(np.float32, copy=True) for h in self.history]

    def restore(self, iteration: int, current_step: int, history: Sequence[np.ndarray]) -> None:
        """Continue from a solverstate: completed updates, lr step and history blobs."""
        if len(history) != len(self.history):
            raise TrainingError(f"solverstate has {len(history)} history blobs, this solver and net "
                                f"need {len(self.history)}", self.path)
        for i, (target, values) in enumerate(zip(self.history, history)):
            values = np.asarray(values, dtype=np.float32)
            if values.size != target.numel():
                raise TrainingError(f"history blob {i} has {values.size} values, expected "
                                    f"{target.numel()} (shape {tuple(target.shape)})", self.path)
            if i // len(self.learnables) in self.squared_sets and np.any(values < 0):
                raise TrainingError(f"history blob {i} has negative values, impossible for {type(self).__name__}"
                                    " (was the state written by another solver type, e.g. SGD momentum?)",
                                    self.path)
            target.copy_(torch.from_numpy(values.reshape(tuple(target.shape))))
        self.iter = int(iteration)
        self.lr.current_step = int(current_step)

    # ----------------------------------------------------------------- update
    def grad(self, item: Learnable) -> torch.Tensor:
        """The parameter's diff (zeros when autograd produced none, as Caffe's cleared diff)."""
        if item.param.grad is None:
            item.param.grad = torch.zeros_like(item.param)
        return item.param.grad

    def clip_gradients(self) -> None:
        clip = self.param.clip_gradients
        if clip < 0:
            return
        sumsq = sum(float(torch.sum(self.grad(item).double() ** 2)) for item in self.learnables)
        norm = math.sqrt(sumsq)
        if norm > clip:
            factor = clip / norm
            self.on_message(f"Gradient clipping: scaling down gradients (L2 norm {norm:g} > {clip:g}) "
                            f"by scale factor {factor:g}")
            for item in self.learnables:
                self.grad(item).mul_(factor)

    def regularize(self, item: Learnable, diff: torch.Tensor) -> None:
        local_decay = np.float32(self.param.weight_decay) * np.float32(item.decay_mult)
        if local_decay == 0:
            return
        if self.param.regularization_type == "L2":
            diff.add_(item.param.detach(), alpha=float(local_decay))
        else:
            diff.add_(torch.sign(item.param.detach()), alpha=float(local_decay))

    def apply_update(self, advance: bool = True) -> float:
        """One Caffe ``ApplyUpdate``: returns the base rate used; parameters change in place.

        ``advance`` counts the update (what ``Step`` does after it); pycaffe's ``apply_update``
        alone leaves the iteration as it was, like Caffe's."""
        rate = self.lr(self.iter)
        if self.cycles_momentum and self.lr.policy == "onecycle":
            self.momentum = one_cycle(self.iter, self.param)[1]
        self.clip_gradients()
        with torch.no_grad():
            for i, item in enumerate(self.learnables):
                diff = self.grad(item)
                if self.param.iter_size > 1:
                    diff.mul_(1.0 / self.param.iter_size)
                self.regularize(item, diff)
                local_rate = float(np.float32(rate) * np.float32(item.lr_mult))
                self.compute_update(i, diff, local_rate)
                item.param.sub_(diff)
        if advance:
            self.iter += 1
        return rate

    def zero_grad(self) -> None:
        for item in self.learnables:
            if item.param.grad is not None:
                item.param.grad.zero_()

    @abstractmethod
    def compute_update(self, i: int, diff: torch.Tensor, local_rate: float) -> None:
        """Turn the regularised gradient ``diff`` of parameter ``i`` into its update, in place."""


class SGDSolver(Solver):
    """V = momentum·V + local_rate·g; W −= V."""

    cycles_momentum = True

    def compute_update(self, i, diff, local_rate):
        h = self.history[i]
        h.mul_(self.momentum).add_(diff, alpha=local_rate)
        diff.copy_(h)


class NesterovSolver(Solver):
    """Caffe's Nesterov: update = (1+m)·V_new − m·V_old."""

    cycles_momentum = True

    def compute_update(self, i, diff, local_rate):
        h = self.history[i]
        momentum = self.momentum
        previous = h.clone()
        h.mul_(momentum).add_(diff, alpha=local_rate)
        diff.copy_(h * (1.0 + momentum) - previous * momentum)


class AdaGradSolver(Solver):
    """h += g²; update = local_rate · g / (sqrt(h) + delta)."""

    squared_sets = (0,)

    def __init__(self, param, learnables, path=None):
        if param.momentum != 0:
            raise ConfigError("momentum must be 0 for AdaGrad (Caffe's CHECK)", path)
        super().__init__(param, learnables, path)

    def compute_update(self, i, diff, local_rate):
        h = self.history[i]
        h.add_(diff * diff)
        update = torch.sqrt(h).add_(self.param.delta)
        diff.div_(update).mul_(local_rate)


class RMSPropSolver(Solver):
    """h = rms_decay·h + (1−rms_decay)·g²; update = local_rate · g / (sqrt(h) + delta)."""

    squared_sets = (0,)

    def compute_update(self, i, diff, local_rate):
        h = self.history[i]
        decay = self.param.rms_decay
        h.mul_(decay).add_(diff * diff, alpha=1.0 - decay)
        update = torch.sqrt(h).add_(self.param.delta)
        diff.div_(update).mul_(local_rate)


class AdaDeltaSolver(Solver):
    """Caffe's AdaDelta: running means of g² (first history set) and of updates² (second set)."""

    history_sets = 2
    squared_sets = (0, 1)

    def compute_update(self, i, diff, local_rate):
        n = len(self.learnables)
        grad_history, update_history = self.history[i], self.history[n + i]
        momentum, delta = self.param.momentum, self.param.delta
        grad_history.mul_(momentum).add_(diff * diff, alpha=1.0 - momentum)
        ratio = (update_history + delta).div_(grad_history + delta).sqrt_()
        diff.mul_(ratio)
        update_history.mul_(momentum).add_(diff * diff, alpha=1.0 - momentum)
        diff.mul_(local_rate)


class AdamSolver(Solver):
    """Caffe's Adam: m and v (two history sets), bias correction with t = iter + 1."""

    history_sets = 2
    squared_sets = (1,)
    cycles_momentum = True

    def compute_update(self, i, diff, local_rate):
        n = len(self.learnables)
        m, v = self.history[i], self.history[n + i]
        beta1, beta2 = self.momentum, self.param.momentum2
        t = self.iter + 1
        correction = math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        m.mul_(beta1).add_(diff, alpha=1.0 - beta1)
        v.mul_(beta2).add_(diff * diff, alpha=1.0 - beta2)
        diff.copy_(m / (torch.sqrt(v).add_(self.param.delta))).mul_(local_rate * correction)


class AdamWSolver(AdamSolver):
    """Adam with decoupled weight decay (Loshchilov & Hutter): W −= local_rate·(adam + wd·W).

    ``weight_decay · decay_mult`` shrinks the weights directly instead of entering the gradient
    (so it is not rescaled by Adam's second moment), and only blobs marked ``decoupled_decay``
    (weights, not biases, BatchNorm, Scale or Bias blobs) decay.  Not a Caffe solver type."""

    def regularize(self, item, diff):
        """No coupled decay: it is applied in :meth:`compute_update`."""

    def compute_update(self, i, diff, local_rate):
        item = self.learnables[i]
        super().compute_update(i, diff, local_rate)
        local_decay = float(np.float32(self.param.weight_decay) * np.float32(item.decay_mult))
        if item.decoupled_decay and local_decay:
            diff.add_(item.param.detach(), alpha=local_rate * local_decay)


SOLVERS: Dict[str, type] = {
    "SGD": SGDSolver,
    "Nesterov": NesterovSolver,
    "AdaGrad": AdaGradSolver,
    "RMSProp": RMSPropSolver,
    "AdaDelta": AdaDeltaSolver,
    "Adam": AdamSolver,
    "AdamW": AdamWSolver,
}


def make_solver(param: caffe_pb2.SolverParameter, learnables: Sequence[Learnable],
                path=None) -> Solver:
    """The solver named by ``param`` (``type``, or the legacy ``solver_type`` enum)."""
    name = solver_type(param, path)
    if name not in SOLVERS:
        raise ConfigError(f"unknown solver type {name!r}", path, valid=SOLVERS)
    return SOLVERS[name](param, learnables, path)


def decays_decoupled(layer_type: str, index: int) -> bool:
    """Whether AdamW decays blob ``index`` of a layer of ``layer_type``: the weights (blob 0) of
    every layer but BatchNorm, Scale, Bias and PReLU; never a bias."""
    return index == 0 and layer_type not in NO_DECAY_TYPES


def learnables_of(net) -> List[Learnable]:
    """The solver's view of a built net's ``learnable`` list (layer, index, param, lr_mult, decay_mult)."""
    return [Learnable(entry.param, float(entry.lr_mult), float(entry.decay_mult),
                      f"{entry.layer}[{entry.index}]",
                      decays_decoupled(net.layer(entry.layer).param.type, entry.index))
            for entry in net.learnable]


def snapshot_names(prefix: str, iteration: int) -> tuple[str, str]:
    """Caffe's snapshot file names: ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``."""
    stem = f"{prefix}_iter_{iteration}"
    return stem + ".caffemodel", stem + ".solverstate"

