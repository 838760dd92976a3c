"""pycaffe's solvers (``caffe.SGDSolver(file)`` …, ``caffe.get_solver``) on the ``lymph-cv train`` engine.

A pycaffe solver is a :class:`lymph_cv.stages.train.Trainer`: the same schedule (tests, display,
snapshots, signals), the same update code (:mod:`lymph_cv.net.solver`) and the same seeding.  What
differs is only how a net runs: through :class:`lymph_cv.pycaffe.net.Net`, so the blobs a Python loop
reads or writes (``solver.net.blobs['label'].data[...] = …``, ``net.blobs['loss'].data``) are those the
iteration used, and DummyData, Python and Input layers feed the nets as in Caffe.  As in Caffe,
snapshots go to ``snapshot_prefix`` relative to the current directory, and no ``train.json`` or
``train.log`` is written: the log lines go to stderr, at INFO unless ``$GLOG_minloglevel`` says less.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from lymph_cv.formats import caffelog
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.prototxt import read_solver
from lymph_cv.errors import ConfigError
from lymph_cv.net.datalayer import DataLayer, RecordCache
from lymph_cv.net.build import CaffeNet
from lymph_cv.net.solver import SOLVERS, solver_type
from lymph_cv.pycaffe.net import TEST, TRAIN, Net, chosen_seed, device_name
from lymph_cv.stages.train import STREAM_DROPOUT, Trainer, derived_seed, signal_actions


#: GLOG_minloglevel values (what Caffe users set to quiet pycaffe) → logging levels; default 0.
GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}
GLOG_ENV = "GLOG_minloglevel"


def glog_level() -> int:
    """The stderr level of a pycaffe solver's log lines: INFO (display, tests, snapshots) as Caffe
    prints them, unless $GLOG_minloglevel asks for less."""
    text = os.environ.get(GLOG_ENV, "0").strip()
    number = int(text) if text.lstrip("-").isdigit() else 0
    return GLOG_LEVELS[min(max(number, 0), max(GLOG_LEVELS))]


class PyTrainer(Trainer):
    """The training engine with pycaffe nets (see the module docstring)."""

    def __init__(self, solver_path: os.PathLike, solver_type_name: str, seed: Optional[int]):
        super().__init__(solver_path, device=device_name(), seed=seed, type_name=solver_type_name)
        self.write_record = False
        self.files.base_dir = Path(".")  # Caffe: snapshot_prefix is relative to the current directory
        force = bool(self.train_param.force_backward)
        self.py_net = Net.wrap(self.net, self.train_data, force)
        self.py_test_nets = [Net.wrap(net, readers) for net, readers in zip(self.test_nets, self.test_data)]

    def _data_layers(self, net: CaffeNet, phase: int, cache: RecordCache) -> List[DataLayer]:
        # Input, DummyData and Python layers feed a pycaffe net too: only Data layers need readers.
        return [DataLayer(p, phase, self.seed, self.files.input, cache) for p in net.data_layers]

    def forward_backward(self, batch: int, backward: bool = True):
        if self.stochastic:
            self._seed_dropout(derived_seed(self.seed, STREAM_DROPOUT, batch))
        net = self.py_net
        last = len(net.layers) - 1
        loss = net.forward_range(0, last, batch=batch)
        if backward:
            net.backward_range(last, 0)
        return loss, {name: torch.from_numpy(net.blobs[name].data) for name in self.net.output_blobs}

    def test_forward(self, index: int, batch: int) -> Dict[str, torch.Tensor]:
        net = self.py_test_nets[index]
        net.forward_range(0, len(net.layers) - 1, batch=batch)
        return {name: torch.from_numpy(blob.data) for name, blob in net.blobs.items()}

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The log and signal handling a step, snapshot or solve runs in."""
        with caffelog.caffe_log(None, console_level=glog_level()) as clog, signal_actions() as pending:
            self.log, self.pending = clog, pending
            self.solver.on_message = lambda message: clog.info(message, caffelog.SRC_LR)
            yield


class Solver:
    """pycaffe's Solver: ``net``, ``test_nets``, ``iter``, ``step``, ``solve``, ``snapshot``, ``restore``,
    ``apply_update``, ``share_weights``; built from a solver prototxt file."""

    #: the solver type this class runs (None: the file's own ``type``).
    type_name: Optional[str] = None

    def __init__(self, solver_file: str | os.PathLike):
        param = read_solver(solver_file)
        wanted = self.type_name or solver_type(param, solver_file)
        if wanted not in SOLVERS:
            raise ConfigError(f"unknown solver type {wanted!r}", solver_file, valid=SOLVERS)
        # as in Caffe, the file's random_seed wins over caffe.set_random_seed
        seed = None if param.random_seed >= 0 else chosen_seed()
        self._trainer = PyTrainer(solver_file, wanted, seed)

    @property
    def net(self) -> Net:
        return self._trainer.py_net

    @property
    def test_nets(self) -> List[Net]:
        return list(self._trainer.py_test_nets)

    @property
    def iter(self) -> int:
        return self._trainer.solver.iter

    @property
    def param(self) -> caffe_pb2.SolverParameter:
        return self._trainer.param

    @property
    def type(self) -> str:
        return self._trainer.type

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
        solver = self._trainer.solver
        return float(solver.lr(solver.iter))

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (tests, display, snapshots as the solver file says)."""
        trainer = self._trainer
        with self.net.synced(), trainer.session():
            trainer.step(trainer.solver.iter + int(iters), None)

    def solve(self, resume: Optional[str | os.PathLike] = None) -> None:
        """Train to ``max_iter`` (after restoring ``resume``, a .solverstate, when given)."""
        trainer = self._trainer
        with self.net.synced(), trainer.session():
            if resume is not None:
                trainer.restore(Path(resume))
            trainer.result.start_iteration = trainer.solver.iter
            trainer._solve(None)

    def snapshot(self) -> None:
        """Write ``<snapshot_prefix>_iter_<iter>.caffemodel`` and ``.solverstate``."""
        with self.net.synced(), self._trainer.session():
            self._trainer.snapshot()

    def restore(self, state_file: str | os.PathLike) -> None:
        """Continue from a .solverstate (iteration, learning-rate step, history, weights)."""
        with self.net.synced():
            self._trainer.restore(Path(state_file))

    def apply_update(self) -> None:
        """Update the weights from the current diffs (the iteration count is left as is, like Caffe)."""
        with self.net.synced():
            self._trainer.solver.apply_update(advance=False)

    def share_weights(self, net: Net) -> None:
        """Make ``net`` use this solver's net's learnable blobs."""
        net.share_with(self.net)


def _typed(type_name: str) -> type:
    """The pycaffe class running solver type ``type_name`` whatever the file says (as Caffe's do)."""
    doc = f"pycaffe's {type_name}Solver(solver_file)."
    return type(f"{type_name}Solver", (Solver,), {"type_name": type_name, "__doc__": doc, "__module__": __name__})


SGDSolver = _typed("SGD")
NesterovSolver = _typed("Nesterov")
AdaGradSolver = _typed("AdaGrad")
RMSPropSolver = _typed("RMSProp")
AdaDeltaSolver = _typed("AdaDelta")
AdamSolver = _typed("Adam")


def get_solver(solver_file: str | os.PathLike) -> Solver:
    """A solver of the type the file names (``type``, or the legacy ``solver_type``)."""
    return Solver(solver_file)


__all__ = ["Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "get_solver", "TRAIN", "TEST"]
