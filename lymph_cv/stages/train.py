"""The training loop of ``caffe train``: tests, display, updates, snapshots, resume and fine-tuning.

The schedule follows Caffe's ``Solver::Solve``/``Step`` (caffe-facts §7–§9): a test before the update
of every iteration that is a multiple of ``test_interval`` (iteration 0 too when
``test_initialization``), display lines every ``display`` iterations, a snapshot after every
``snapshot``-th update and at the end (``snapshot_after_train``), then the final display forward and
test, and ``Optimization Done.``.  One addition: a run shortened with ``max_iter=`` (``--max-iter``)
always ends with a test, so its accuracy is reported even off the ``test_interval`` grid.  The log
is Caffe's glog format, on stderr and in ``train.log`` in the base directory (a resumed run appends
to it; a fresh run first moves an earlier one aside as ``train.log.1``, ``.2``, …).

Paths inside the solver and net resolve like Caffe's, against the current directory, and when not
found there against the solver file's folder; that folder (or the current directory, when the net
was found there) is the *base directory* that receives the snapshots and the log.  The process's
working directory is never changed.

Determinism (a deliberate improvement over Caffe): batch ``b`` of every data layer and the dropout
masks of iteration ``i`` are pure functions of the seed and ``b``/``i`` (see
:mod:`lymph_cv.net.datalayer`), and the test cursor is a function of the iteration.  So on the CPU a run
resumed from a snapshot ends with exactly the weights of an uninterrupted run with the same seed.
The solver's ``augmentation_param`` (or the ``augmentation`` overrides: mixup, label smoothing,
vertical flips, quarter turns; :mod:`lymph_cv.net.augment`) is drawn the same way and recorded in
``train.json`` with the lr policy.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lymph_cv.formats import caffelog
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.model import (history_arrays, read_caffemodel, read_solverstate, set_history,
                                  write_caffemodel, write_solverstate)
from lymph_cv.formats.caffe.prototxt import read_net_prototxt, read_solver
from lymph_cv.formats.caffelog import CaffeLog, fmt
from lymph_cv.net.augment import STREAM_MIXUP, Augmentation, augment_labels
from lymph_cv.net.augment import stream as augment_stream
from lymph_cv.core.distributed import Collective, World, discover
from lymph_cv.net.datalayer import DataLayer, RecordCache
from lymph_cv.net.layers import BatchNormLayer
from lymph_cv.net.shared_records import SharedRecordCache
from lymph_cv.errors import (ConfigError, FormatError, InputError, Interrupted, LymphCVError, TrainingError,
                             UnsupportedError, Terminated, signal_name)
from lymph_cv.core import devices, faults
from lymph_cv.core.fsutil import atomic_write_json, check_writable, make_dirs
from lymph_cv.core.locks import folder_lock
from lymph_cv.workdir.records import ANY, read_record
from lymph_cv.core.progress import Progress
from lymph_cv.net.build import CaffeNet, build_net, resolve_net_path
from lymph_cv.net.solver import Solver, learnables_of, make_solver, snapshot_names, solver_type
from lymph_cv.stages.eta import ESTIMATE_AFTER, FORWARD_SHARE, Estimate, cpu_warning
from lymph_cv.workdir.layout import TRAIN_JSON as RECORD_NAME
from lymph_cv.workdir.layout import DB_TEST, DB_TRAIN, MEAN_FILE, SOLVER_NAME, SUPERSEDED_DIR, TRAIN_KEY_JSON, TRAIN_LOG
from lymph_cv.stages.stage import (LOCAL_EXECUTOR, TRAIN_EXECUTORS, PatchPipelineStage, RunOptions, executor_names,
                                   key_digest, run_record)
from lymph_cv.workdir.snapshots import snapshot_series

log = logging.getLogger(__name__)

LOG_NAME = TRAIN_LOG
#: sub-streams of the run seed: which random draws a derived seed is for.
STREAM_DROPOUT = 2
STREAM_INIT = 3
#: layer types whose TRAIN forward uses torch's random generator.
STOCHASTIC_LAYERS = ("Dropout",)
#: layer types that take soft targets (mixup, label smoothing) in the label blob.
SOFT_LABEL_LAYERS = ("SoftmaxWithLoss", "Accuracy")
#: Caffe's requested actions on a signal.
ACTION_NONE, ACTION_STOP, ACTION_SNAPSHOT = "none", "stop", "snapshot"
SIGNAL_ACTIONS = (ACTION_STOP, ACTION_SNAPSHOT, ACTION_NONE)
#: how ranks agree on an action: the strongest request of any rank wins.
ACTION_RANK = {ACTION_NONE: 0, ACTION_SNAPSHOT: 1, ACTION_STOP: 2}


@dataclass
class TrainResult:
    """What a training run did."""

    iterations: int
    start_iteration: int
    snapshots: List[Path] = field(default_factory=list)
    test_scores: Dict[str, float] = field(default_factory=dict)
    last_loss: float = float("nan")
    stopped_early: bool = False
    #: the signal that stopped it early (SIGINT, SIGTERM, …), None when it ran to the end.
    stop_signal: Optional[int] = None
    max_iter: int = 0
    seed: int = 0
    device: str = "cpu"
    base_dir: Path = Path(".")
    log_path: Optional[Path] = None


def derived_seed(seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for random stream ``stream`` at position ``index`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, stream, index]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def resolve_device(device: Optional[str], solver_mode: int) -> torch.device:
    """``cpu``/``cuda``/``cuda:N``/``auto``; without a choice, the solver's ``solver_mode`` is a hint."""
    if device is None:
        device = "auto" if solver_mode == caffe_pb2.SolverParameter.GPU else "cpu"
    return devices.resolve_device(device)


def run_seed(seed: Optional[int], param: caffe_pb2.SolverParameter, recorded: Optional[int] = None) -> int:
    """The run's seed: given, else the seed ``recorded`` by the run being resumed, else the solver's
    ``random_seed`` (≥ 0), else a fresh one (recorded in ``train.json``)."""
    if seed is not None:
        return int(seed)
    if recorded is not None:
        return int(recorded)
    if param.random_seed >= 0:
        return int(param.random_seed)
    return int.from_bytes(os.urandom(8), "little") >> 1


def find_input(path: str, folder: Path) -> Path:
    """An input named in a solver/net file: as Caffe opens it (current directory), else in ``folder``
    (the file's own folder); InputError naming both places when it is in neither."""
    found = resolve_net_path(path, folder)
    if not found.exists():
        raise InputError(f"not found in the current directory nor in {folder}", path)
    return found


def recorded_seed(record_path: Path, solver_path: Path) -> Optional[int]:
    """The seed in ``train.json`` when it records a run of this solver (what a resume must reuse)."""
    try:
        record = json.loads(Path(record_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("seed"), int):
        return None
    same = Path(str(record.get("solver", ""))).name == Path(solver_path).name
    return record["seed"] if same else None


def check_solver_values(param: caffe_pb2.SolverParameter, path: Path, finetuning: bool = False) -> None:
    """Values no training can use (a run that would write no model, or never learn).  ``base_lr: 0``
    is allowed only when fine-tuning (it copies the given weights into a snapshot unchanged)."""
    if param.max_iter <= 0:
        raise ConfigError(f"max_iter must be positive, got {param.max_iter}", path)
    if not math.isfinite(param.base_lr) or param.base_lr < 0 or (param.base_lr == 0 and not finetuning):
        raise ConfigError(f"base_lr must be a positive number, got {fmt(param.base_lr)}", path)


class SolverFiles:
    """Where the solver's relative paths lead: current directory first, then the solver's folder."""

    def __init__(self, solver_path: Path, param: caffe_pb2.SolverParameter):
        self.solver_path = Path(solver_path)
        self.folder = self.solver_path.parent
        net = param.net or param.train_net
        found_in_cwd = bool(net) and not Path(net).is_absolute() and Path(net).exists()
        at_home = self.folder.resolve() == Path.cwd().resolve()
        self.base_dir = Path(".") if found_in_cwd or at_home else self.folder

    def input(self, path: str) -> Path:
        """An input path as written in the solver/net: Caffe's, else beside the solver file."""
        return find_input(path, self.folder)

    def output(self, path: str) -> Path:
        """An output path (snapshot prefix, log) inside the base directory."""
        return Path(path) if Path(path).is_absolute() else self.base_dir / path


def _net_params(param: caffe_pb2.SolverParameter, files: SolverFiles
                ) -> Tuple[caffe_pb2.NetParameter, List[caffe_pb2.NetParameter]]:
    """(train net, one net per test) as Caffe's Solver::InitTrainNet/InitTestNets choose them."""
    sources = [name for name in ("net", "net_param", "train_net", "train_net_param") if param.HasField(name)]
    if len(sources) != 1:
        raise ConfigError(f"the solver must give exactly one of net, net_param, train_net, train_net_param "
                          f"(got {', '.join(sources) or 'none'})", files.solver_path)

    def load(name: str) -> caffe_pb2.NetParameter:
        return read_net_prototxt(files.input(name))

    general = None
    if param.HasField("net"):
        general = load(param.net)
        train = general
    elif param.HasField("net_param"):
        general = param.net_param
        train = general
    elif param.HasField("train_net"):
        train = load(param.train_net)
    else:
        train = param.train_net_param
    tests = list(param.test_net_param) + [load(name) for name in param.test_net]
    if general is not None and len(param.test_iter) > len(tests):
        tests += [general] * (len(param.test_iter) - len(tests))
    if len(tests) != len(param.test_iter):
        raise ConfigError(f"{len(tests)} test nets but {len(param.test_iter)} test_iter values",
                          files.solver_path)
    if tests and param.test_interval <= 0:
        raise ConfigError("test nets are given but test_interval is not positive", files.solver_path)
    return train, tests


def _state(param: caffe_pb2.SolverParameter, field_name: str, index: Optional[int] = None):
    states = getattr(param, field_name)
    if index is None:
        return states if param.HasField(field_name) else None
    return states[index] if index < len(states) else None


def _build(net_param: caffe_pb2.NetParameter, phase: int, state, files: SolverFiles, source: Path) -> CaffeNet:
    level = state.level if state is not None else 0
    stages = tuple(state.stage) if state is not None else ()
    return build_net(net_param, phase, level=level, stages=stages, base_dir=files.folder, source=source)


def _net_sources(param: caffe_pb2.SolverParameter, files: SolverFiles) -> Tuple[Path, List[Path]]:
    """The files :func:`_net_params`'s nets come from (the solver itself for a net given inline), named by
    the nets' errors."""
    train = files.input(param.net or param.train_net) if (param.net or param.train_net) else files.solver_path
    tests = [files.solver_path] * len(param.test_net_param) + [files.input(name) for name in param.test_net]
    return train, tests + [train] * max(0, len(param.test_iter) - len(tests))


class SignalQueue(list):
    """The actions requested by signals, in order; ``signals`` holds the numbers of the stop requests."""

    def __init__(self):
        super().__init__()
        self.signals: List[int] = []


@contextlib.contextmanager
def signal_actions(sigint: str = ACTION_STOP, sighup: str = ACTION_SNAPSHOT) -> Iterator[List[str]]:
    """Caffe's SignalHandler: SIGINT/SIGTERM and SIGHUP queue an action the loop polls after each
    iteration; a second stop request interrupts at once.  Outside the main thread nothing is installed."""
    pending = SignalQueue()
    received = pending.signals
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    effects = {signal.SIGINT: sigint, signal.SIGTERM: sigint, signal.SIGHUP: sighup}

    def handler(signum, _frame):
        if effects[signum] == ACTION_STOP and ACTION_STOP in pending:
            # a second stop request: give up without the snapshot
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if effects[signum] == ACTION_STOP:
            received.append(signum)
        pending.append(effects[signum])

    previous = {sig: signal.signal(sig, handler) for sig in effects}
    try:
        yield pending
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Trainer:
    """One ``caffe train`` run; :meth:`solve` runs it."""

    def __init__(self, solver_path: os.PathLike, *, snapshot: Optional[os.PathLike] = None,
                 weights: Sequence[os.PathLike] = (), device: Optional[str] = None,
                 seed: Optional[int] = None, max_iter: Optional[int] = None, type_name: Optional[str] = None,
                 augmentation: Optional[Dict[str, object]] = None, max_memory: Optional[int] = None,
                 world: Optional[World] = None, sync_bn: bool = False):
        self.solver_path = Path(solver_path)
        #: this process's rank among the processes training one net (Caffe's solver_count/rank).
        self.world = world if world is not None else discover()
        if snapshot is not None and weights:
            raise ConfigError("give either a snapshot to resume or weights to fine-tune, not both")
        param = read_solver(self.solver_path)
        if type_name is not None:  # pycaffe's SGDSolver(file) etc. name the type themselves
            param.type = type_name
        if param.snapshot_format == caffe_pb2.SolverParameter.HDF5 and param.HasField("snapshot_format"):
            raise UnsupportedError("snapshot_format HDF5 is not supported", self.solver_path,
                                   valid=("BINARYPROTO",))
        if param.snapshot_diff:
            raise UnsupportedError("snapshot_diff is not supported (snapshots hold the weights only)",
                                   self.solver_path)
        if max_iter is not None:
            if max_iter < 1:
                raise ConfigError(f"must be positive, got {max_iter}", "--max-iter")
            param.max_iter = int(max_iter)
        check_solver_values(param, self.solver_path, finetuning=bool(weights))
        #: a shortened run (--max-iter) always ends with a test, even off the test_interval grid.
        self.max_iter_override = max_iter is not None
        self.param = param
        #: the solver's augmentation_param with the caller's overrides (None values ignored).
        self.augmentation = Augmentation.from_param(param.augmentation_param, **(augmentation or {}))
        self.type = solver_type(param, self.solver_path)
        self.files = SolverFiles(self.solver_path, param)
        recorded = recorded_seed(self.files.output(RECORD_NAME), self.solver_path) if snapshot is not None else None
        self.seed = run_seed(seed, param, recorded)
        self.device = resolve_device(device, param.solver_mode)
        if self.world.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.world.local_rank)
        self.collective = Collective(self.world, self.device.type)
        # a fresh seed (none given, random_seed < 0) is drawn by the root and used by every rank
        self.seed = self.collective.root_value(self.seed)
        self.snapshot_path = Path(snapshot) if snapshot is not None else None
        self.weights = [Path(w) for w in weights]
        # Read before anything is written (the log of an earlier run is moved aside at the start):
        # a wrong or corrupt file is an error that leaves the base directory as it was.
        self.weights_data = [read_caffemodel(w) for w in self.weights]
        if self.snapshot_path is not None and self.snapshot_path.suffix == ".h5":
            raise UnsupportedError("HDF5 solverstates are not supported", self.snapshot_path, valid=(".solverstate",))
        self.state = read_solverstate(self.snapshot_path) if self.snapshot_path is not None else None

        train_param, test_params = _net_params(param, self.files)
        train_source, test_sources = _net_sources(param, self.files)
        self.train_param = train_param
        torch.manual_seed(derived_seed(self.seed, STREAM_INIT, 0))
        # the build reads the first datum of each database: one rank at a time (a LevelDB's LOCK)
        self.net = self.collective.in_turn(
            lambda: _build(train_param, caffe_pb2.TRAIN, _state(param, "train_state"), self.files, train_source),
            "building the net")
        self.net.init_params(torch.Generator().manual_seed(derived_seed(self.seed, STREAM_INIT, 1)))
        self.net.to(self.device)
        #: BatchNorm statistics over all ranks' batches (else per rank, as Caffe).
        self.sync_bn = bool(sync_bn) and self.world.distributed
        for layer in self.net.layers:
            if isinstance(layer, BatchNormLayer):
                layer.sync = self.sync_bn
        # Caffe broadcasts the root solver's weights before the first step (fillers or -weights).
        self.collective.broadcast([t for t in (*self.net.parameters(), *self.net.buffers())
                                   if t.is_floating_point()])
        # the solver checks its settings before the (slow) databases load
        self.solver: Solver = make_solver(param, learnables_of(self.net), self.solver_path)
        #: whether TRAIN forwards draw random numbers (dropout masks) that must be seeded per batch.
        self.stochastic = any(p.type in STOCHASTIC_LAYERS for p in self.net.layer_params)
        self.test_nets = []
        # Only the root solver tests (Caffe's TestAll on root only): the others build no test net.
        for i, test_param in enumerate(test_params if self.world.is_root else ()):
            test_net = _build(test_param, caffe_pb2.TEST, _state(param, "test_state", i), self.files, test_sources[i])
            test_net.to(self.device)
            test_net.share_weights_from(self.net)
            self.test_nets.append(test_net)
        cache = self.record_cache = RecordCache(max_memory)  # a database larger than this is streamed
        train_cache = cache if not self.world.distributed else SharedRecordCache(
            self.world.local_rank, f"{self.world.address}:{self.world.port}", self.collective.barrier)
        self.train_data = data_layers(self.net, caffe_pb2.TRAIN, self.seed, self.files.input, train_cache,
                                      self.augmentation, shard=(self.world.rank, self.world.size))
        self.test_data = [self._data_layers(net, caffe_pb2.TEST, cache) for net in self.test_nets]
        #: label blob → classes, for the blobs that carry soft targets (mixup, label smoothing).
        self.soft_labels = label_classes(self.net, self.train_data) if self.augmentation.soft_labels else {}
        self.result = TrainResult(iterations=0, start_iteration=0, max_iter=param.max_iter, seed=self.seed,
                                  device=self.device.type, base_dir=self.files.base_dir)
        self.losses: deque = deque(maxlen=max(1, param.average_loss))
        self.log: Optional[CaffeLog] = None
        self.pending: List[str] = SignalQueue()
        #: write train.json beside the snapshots (pycaffe's solvers do not: Caffe writes no record).
        self.write_record = True
        #: called once with the Estimate of the time left, after the first timed iterations
        #: (default: a log line, and the warning for the tutorial's iterations on a CPU).
        self.on_estimate: Optional[Callable[[Estimate], None]] = None
        self._timed = [0, 0.0]  # iterations timed, seconds (tests and snapshots excluded)
        self._tested = [0, 0.0]  # test passes timed, seconds
        self._estimated = False

    def _data_layers(self, net: CaffeNet, phase: int, cache: RecordCache) -> List[DataLayer]:
        return data_layers(net, phase, self.seed, self.files.input, cache)

    # ------------------------------------------------------------------ weights and state
    def restore(self, path: Path) -> None:
        """Resume from a ``.solverstate``: iteration, lr step, history and the learned net."""
        if path.suffix == ".h5":
            raise UnsupportedError("HDF5 solverstates are not supported", path, valid=(".solverstate",))
        state = self.state if path == self.snapshot_path and self.state is not None else read_solverstate(path)
        model = Path(state.learned_net)
        candidates = [model, path.parent / model.name, self.files.output(state.learned_net)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise TrainingError(f"learned_net {state.learned_net!r} not found (looked in the current "
                                f"directory, beside the solverstate and in {self.files.base_dir})", path)
        self.net.load_weights(read_caffemodel(found), found)
        shapes = [tuple(item.param.shape) for item in self.solver.learnables] * self.solver.history_sets
        try:
            arrays = history_arrays(state, shapes)
        except FormatError as exc:
            raise TrainingError(f"history does not fit this solver and net: {exc.detail}", path) from exc
        self.solver.restore(state.iter, state.current_step, arrays)

    def snapshot(self) -> None:
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate`` (atomically; the root rank only)."""
        if not self.world.is_root:
            return
        prefix = self.param.snapshot_prefix or str(self.solver_path.with_suffix("").name)
        model_name, state_name = snapshot_names(prefix, self.solver.iter)
        model_path, state_path = self.files.output(model_name), self.files.output(state_name)
        make_dirs(model_path.parent)
        self.log.info(f"Snapshotting to binary proto file {model_name}", caffelog.SRC_SNAPSHOT)
        write_caffemodel(model_path, self.net.export_weights(legacy_dims=True))
        self.log.info(f"Snapshotting solver state to binary proto file {state_name}",
                      caffelog.SRC_SNAPSHOT_STATE)
        state = caffe_pb2.SolverState(iter=self.solver.iter, learned_net=model_name,
                                      current_step=self.solver.current_step)
        set_history(state, self.solver.history_arrays(), legacy=True)
        write_solverstate(state_path, state)
        self.result.snapshots.append(model_path)
        self._record()
        faults.event("train:snapshot")

    def _check_resumed_augmentation(self, clog: CaffeLog) -> None:
        """Warn when the run being resumed (its train.json) trained with other augmentation: the
        result is then not the uninterrupted run's (e.g. ``train --resume`` without its ``--mixup``)."""
        path = self.files.output(RECORD_NAME)
        try:
            earlier = read_record(path, ANY) or {}
        except LymphCVError as exc:
            clog.warning(f"cannot compare the augmentation with the resumed run's: {exc}")
            return
        before, now = earlier.get("augmentation"), self.augmentation.record()
        if before is not None and before != now:
            changed = ", ".join(f"{key} {before.get(key)} -> {value}" for key, value in now.items()
                                if before.get(key) != value)
            clog.warning(f"resuming with other augmentation than the run that wrote {path.name} ({changed}); "
                         "the result will differ from an uninterrupted run")

    def _record(self, finished: bool = False) -> None:
        if not self.write_record or not self.world.is_root:
            return
        record = {"solver": str(self.solver_path), "seed": self.seed, "device": self.device.type,
                  "solver_type": self.type, "max_iter": self.param.max_iter,
                  "start_iteration": self.result.start_iteration, "iteration": self.solver.iter,
                  "resumed_from": str(self.snapshot_path) if self.snapshot_path else None,
                  "weights": [str(w) for w in self.weights],
                  "snapshots": [str(p) for p in self.result.snapshots],
                  "stopped_early": self.result.stopped_early, "finished": finished,
                  "lr_policy": self.param.lr_policy, "augmentation": self.augmentation.record(),
                  "world_size": self.world.size, "sync_bn": self.sync_bn, "torch": torch.__version__}
        if self.param.lr_policy == "onecycle":
            cycle = self.param.onecycle_param
            record["onecycle"] = {name: float(str(np.float32(getattr(cycle, name)))) for name in
                                  ("pct_start", "div", "div_final", "max_momentum", "base_momentum")}
        atomic_write_json(self.files.output(RECORD_NAME), record)

    # ------------------------------------------------------------------ forward passes
    def _inputs(self, layers: Sequence[DataLayer], batch: int) -> Dict[str, torch.Tensor]:
        return feed(layers, batch, self.device)

    def train_inputs(self, batch: int) -> Dict[str, torch.Tensor]:
        """TRAIN batch ``batch``, its labels turned into mixed / smoothed soft targets if asked."""
        inputs = feed(self.train_data, batch, self.device)
        for layer in self.train_data:
            if len(layer.tops) > 1 and layer.tops[1] in self.soft_labels:
                data, label = layer.tops[0], layer.tops[1]
                rng = augment_stream(self.seed, caffe_pb2.TRAIN, batch, STREAM_MIXUP)
                inputs[data], inputs[label] = augment_labels(inputs[data], inputs[label],
                                                             self.soft_labels[label], self.augmentation, rng)
        return inputs

    def _seed_dropout(self, seed: int) -> None:
        # torch.manual_seed would also reseed every CUDA device (slow); seed only the one in use.
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # manual_seed seeds the current device (cuda:N)
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)

    def forward_backward(self, batch: int, backward: bool = True) -> Tuple[float, Dict[str, torch.Tensor]]:
        """One TRAIN forward (and backward) on batch number ``batch``: (loss, output blobs)."""
        if self.stochastic:
            self._seed_dropout(derived_seed(self.seed, STREAM_DROPOUT, batch * self.world.size + self.world.rank))
        inputs = self.train_inputs(batch)
        with torch.set_grad_enabled(backward), _naming_source(self.train_data):
            blobs = self.net(inputs)
            loss = self.net.loss(blobs)
            if backward:
                loss.backward()
        return float(loss.detach()), {name: blobs[name].detach() for name in self.net.output_blobs}

    def tests_before(self, iteration: int) -> int:
        """How many test passes an uninterrupted run has done before ``iteration``'s test."""
        interval = self.param.test_interval
        if interval <= 0 or iteration <= 0:
            return 0
        passes = (iteration - 1) // interval + 1  # multiples of the interval in [0, iteration)
        return passes if self.param.test_initialization else passes - 1

    def test_forward(self, index: int, batch: int) -> Dict[str, torch.Tensor]:
        """Test net ``index`` forward on its batch number ``batch``: every blob by name."""
        return self.test_nets[index](self._inputs(self.test_data[index], batch))

    def test_all(self) -> None:
        first_batch = self.tests_before(self.solver.iter)
        for index, net in enumerate(self.test_nets):
            self.log.info(f"Iteration {self.solver.iter}, Testing net (#{index})", caffelog.SRC_TEST)
            iterations = self.param.test_iter[index]
            sums: Dict[str, torch.Tensor] = {}
            total_loss = 0.0
            with torch.no_grad(), _naming_source(self.test_data[index]):
                for k in range(iterations):
                    blobs = self.test_forward(index, first_batch * iterations + k)
                    if self.param.test_compute_loss:
                        total_loss += float(net.loss(blobs))
                    for name in net.output_blobs:
                        value = blobs[name].detach().reshape(-1).double()
                        sums[name] = sums[name] + value if name in sums else value
            if self.param.test_compute_loss:
                self.log.info(f"Test loss: {fmt(total_loss / max(iterations, 1))}", caffelog.SRC_TEST)
            scores = _output_lines(net, {n: (v / max(iterations, 1)).cpu().numpy() for n, v in sums.items()})
            for number, (name, value, suffix) in enumerate(scores):
                self.log.info(f"    Test net output #{number}: {name} = {fmt(value)}{suffix}",
                              caffelog.SRC_TEST_OUTPUT)
                self.result.test_scores[name if index == 0 else f"{name}#{index}"] = float(value)
            if ACTION_STOP in self.pending:
                break

    # ------------------------------------------------------------------ the loop
    def _display(self, iteration: int, outputs: Dict[str, torch.Tensor]) -> None:
        smoothed = sum(self.losses) / len(self.losses)
        self.log.info(f"Iteration {iteration}, loss = {fmt(smoothed)}", caffelog.SRC_DISPLAY)
        values = {name: value.reshape(-1).double().cpu().numpy() for name, value in outputs.items()}
        for number, (name, value, suffix) in enumerate(_output_lines(self.net, values)):
            self.log.info(f"    Train net output #{number}: {name} = {fmt(value)}{suffix}",
                          caffelog.SRC_TRAIN_OUTPUT)

    def _check(self, loss: float, iteration: int) -> None:
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at iteration {iteration}; lower base_lr or check the data",
                                self.solver_path)

    def step(self, stop_iter: int, progress) -> None:
        param = self.param
        iter_size = param.iter_size
        while self.solver.iter < stop_iter:
            iteration = self.solver.iter
            self.solver.zero_grad()
            if (param.test_interval > 0 and iteration % param.test_interval == 0
                    and (iteration > 0 or param.test_initialization) and (self.test_nets or not self.world.is_root)):
                if self.test_nets:
                    started = time.perf_counter()
                    self.test_all()
                    self._tested[0] += 1
                    self._tested[1] += time.perf_counter() - started
                if self._agree(ACTION_STOP if ACTION_STOP in self.pending else ACTION_NONE) == ACTION_STOP:
                    self.result.stopped_early = True
                    break
            display = param.display > 0 and iteration % param.display == 0
            started = time.perf_counter()
            loss = 0.0
            outputs: Dict[str, torch.Tensor] = {}
            for k in range(iter_size):
                part, outputs = self.forward_backward(iteration * iter_size + k)
                loss += part
            loss /= iter_size
            self._check(loss, iteration)
            # Caffe's multi-GPU step: every solver's diffs summed and scaled by 1/N, then the same update.
            self.collective.average([self.solver.grad(item) for item in self.solver.learnables])
            self.losses.append(loss)
            self.result.last_loss = loss
            if display:
                self._display(iteration, outputs)
            rate = self.solver.apply_update()
            if display:
                self.log.info(f"Iteration {iteration}, lr = {fmt(rate)}", caffelog.SRC_LR)
            if iteration > self.result.start_iteration:  # the first one warms up: not timed
                self._timed[0] += 1
                self._timed[1] += time.perf_counter() - started
                if not self._estimated and self._timed[0] >= ESTIMATE_AFTER:
                    self._estimate()
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.4g}", refresh=False)
                progress.update(1)
            action = self._agree(self.pending.pop(0) if self.pending else ACTION_NONE)
            if (param.snapshot > 0 and self.solver.iter % param.snapshot == 0) or action == ACTION_SNAPSHOT:
                self.snapshot()
            if action == ACTION_STOP:
                self.result.stopped_early = True
                break

    def _agree(self, action: str) -> str:
        """The action every rank takes: the strongest one any rank was asked for."""
        if not self.world.distributed:
            return action
        wanted = self.collective.maximum(ACTION_RANK[action])
        return next(name for name, value in ACTION_RANK.items() if value == wanted)

    def _estimate(self) -> None:
        """Time left to max_iter from the iterations and test passes timed so far."""
        self._estimated = True
        param = self.param
        ms = 1000 * self._timed[1] / self._timed[0]
        tests = 0
        if self.test_nets and param.max_iter > self.solver.iter:
            tests = max(0, self.tests_before(param.max_iter) - self.tests_before(self.solver.iter)) + 1
        measured = self._tested[0] > 0
        per_test = (self._tested[1] / self._tested[0] if measured
                    else sum(param.test_iter) * ms / 1000 * FORWARD_SHARE)
        estimate = Estimate(param.max_iter - self.solver.iter, ms, tests, per_test, measured, param.max_iter,
                            self.device.type)
        (self.on_estimate or self.log_estimate)(estimate)

    def log_estimate(self, estimate: Estimate) -> None:
        """The default for :attr:`on_estimate`: a log line, and the CPU warning where it applies."""
        self.log.info(f"Expected time to iteration {estimate.max_iter}: {estimate.describe()}", caffelog.SRC_TOOL)
        warning = cpu_warning(estimate)
        if warning:
            self.log.warning(warning, caffelog.SRC_TOOL)

    def solve(self, *, progress: Optional[bool] = None, log_file: bool = True,
              sigint_effect: str = ACTION_STOP, sighup_effect: str = ACTION_SNAPSHOT) -> TrainResult:
        """Train to ``max_iter`` (or until a signal asks to stop); returns what happened."""
        for effect in (sigint_effect, sighup_effect):
            if effect not in SIGNAL_ACTIONS:
                raise ConfigError(f"unknown signal effect {effect!r}", valid=SIGNAL_ACTIONS)
        if progress is None:
            progress = sys.stderr.isatty()
        root = self.world.is_root
        progress = progress and root
        if not root:  # the root rank writes the snapshots and the log, and holds the folder's lock
            return self._solve_locked(progress, log_file, sigint_effect, sighup_effect)
        # Snapshots and the log go here: a read-only or missing folder is an error before any work.
        prefix = self.param.snapshot_prefix or self.solver_path.with_suffix("").name
        for folder in dict.fromkeys((self.files.base_dir, self.files.output(prefix).parent)):
            check_writable(folder)
        # One training per base directory at a time (a second `train`, or `run` on the same fold).
        with folder_lock(self.files.base_dir):
            return self._solve_locked(progress, log_file, sigint_effect, sighup_effect)

    def _solve_locked(self, progress: bool, log_file: bool, sigint_effect: str, sighup_effect: str) -> TrainResult:
        root = self.world.is_root
        # Only the root solver logs (Caffe's multi-GPU rule); errors still reach every rank's stderr.
        log_path = self.files.output(LOG_NAME) if log_file and root else None
        resumed = self.snapshot_path is not None
        if log_path is not None and not resumed:
            keep_previous(log_path)
        quiet = None if root else open(os.devnull, "w", encoding="utf-8")
        with contextlib.ExitStack() as stack:
            if quiet is not None:
                stack.enter_context(quiet)
            stack.push(lambda kind, error, trace: self.collective.close(clean=kind is None))
            return self._solve_logged(log_path, resumed, progress, quiet, sigint_effect, sighup_effect)

    def _solve_logged(self, log_path, resumed, progress, stream, sigint_effect, sighup_effect) -> TrainResult:
        with caffelog.caffe_log(log_path, append=resumed, stream=stream, through_tqdm=progress) as clog, \
                signal_actions(sigint_effect, sighup_effect) as pending:
            self.log, self.pending = clog, pending
            self.solver.on_message = lambda message: clog.info(message, caffelog.SRC_LR)
            self.result.log_path = log_path
            # caffe.cpp's device line, then the seed every random draw of this run derives from
            clog.info("Use CPU." if self.device.type == "cpu" else
                      f"Use GPU with device ID {self.device.index or 0}", caffelog.SRC_TOOL)
            clog.info(f"Random seed: {self.seed}", caffelog.SRC_TOOL)
            if self.world.distributed:
                clog.info(f"Training on {self.world.size} processes ({self.world.launcher}); effective "
                          f"batch = {self.world.size} x the net's batch_size", caffelog.SRC_TOOL)
            if resumed:
                clog.info(f"Resuming from {self.snapshot_path}", caffelog.SRC_RESTORE)
                self._check_resumed_augmentation(clog)
                self.restore(self.snapshot_path)
            for weights, data in zip(self.weights, self.weights_data):
                clog.info(f"Finetuning from {weights}", caffelog.SRC_TOOL)
                self.net.load_weights(data, weights)
            self.result.start_iteration = self.solver.iter
            clog.info(f"Solving {self.net.name}", caffelog.SRC_SOLVE)
            clog.info(f"Learning Rate Policy: {self.param.lr_policy}", caffelog.SRC_POLICY)
            # A bar with an ETA on a terminal; plain periodic lines (no \r) into a file or pipe.
            try:
                with Progress(self.param.max_iter, f"train {self.solver_path.name}", "iter", initial=self.solver.iter,
                              bar=progress, say=lambda line: clog.info(line, caffelog.SRC_TOOL)) as bar:
                    self._solve(bar)
            except LymphCVError as exc:
                clog.fatal_to_file(f"Stopped by an error at iteration {self.solver.iter}: {exc}", caffelog.SRC_TOOL)
                raise
            except KeyboardInterrupt:
                clog.fatal_to_file(f"Interrupted at iteration {self.solver.iter} (no snapshot)", caffelog.SRC_TOOL)
                raise
            self.result.iterations = self.solver.iter
            if self.result.stopped_early and pending.signals:
                self.result.stop_signal = pending.signals[0]
            self._record(finished=not self.result.stopped_early)
        return self.result

    def _solve(self, bar) -> None:
        param = self.param
        self.step(param.max_iter, bar)
        if param.snapshot_after_train and (param.snapshot <= 0 or self.solver.iter % param.snapshot != 0):
            self.snapshot()
        if self.result.stopped_early:
            self.log.info("Optimization stopped early.", caffelog.SRC_STOPPED)
            return
        iteration = self.solver.iter
        if param.display > 0 and iteration % param.display == 0:
            # Caffe's extra TRAIN forward after the last update (consumes a batch, no update).
            loss, _ = self.forward_backward(iteration * param.iter_size, backward=False)
            self._check(loss, iteration)
            self.log.info(f"Iteration {iteration}, loss = {fmt(loss)}", caffelog.SRC_DISPLAY)
        on_grid = param.test_interval > 0 and iteration % param.test_interval == 0
        if self.test_nets and (on_grid or self.max_iter_override):
            self.test_all()
        self.log.info("Optimization Done.", caffelog.SRC_DONE)


@contextlib.contextmanager
def _naming_source(layers: Sequence[DataLayer]) -> Iterator[None]:
    """A data error raised inside the net (a label outside the classes) names the database it came from."""
    try:
        yield
    except InputError as exc:
        if exc.path is not None or not layers:
            raise
        raise InputError(exc.detail, layers[0].source) from None


def keep_previous(path: Path) -> Optional[Path]:
    """Move an earlier run's file aside as ``<name>.1``, ``.2``, … (first free); returns where."""
    if not path.exists():
        return None
    number = 1
    while path.with_name(f"{path.name}.{number}").exists():
        number += 1
    moved = path.with_name(f"{path.name}.{number}")
    path.rename(moved)
    return moved


def data_layers(net: CaffeNet, phase: int, seed: int, resolve: Callable[[str], Path],
                cache: Optional[RecordCache] = None, augmentation: Optional[Augmentation] = None,
                shard: Tuple[int, int] = (0, 1)) -> List[DataLayer]:
    """The DataLayer readers feeding ``net``'s input blobs (every input must have one); ``shard`` is
    (rank, world size) of a multi-process run."""
    layers = [DataLayer(p, phase, seed, resolve, cache, augmentation, shard=shard) for p in net.data_layers]
    missing = [b for b in net.input_blobs if not any(b in layer.tops for layer in layers)]
    if missing:
        raise ConfigError(f"net {net.name!r}: input blob(s) {', '.join(missing)} have no Data layer "
                          "to feed them")
    return layers


def label_classes(net: CaffeNet, layers: Sequence[DataLayer]) -> Dict[str, int]:
    """Label blob → class count (the scores' class axis of the SoftmaxWithLoss reading it) for every
    data layer with labels; ConfigError when a label blob feeds no such loss or a layer that cannot
    take soft targets."""
    found: Dict[str, int] = {}
    for layer in layers:
        if len(layer.tops) < 2:
            continue
        label = layer.tops[1]
        readers = [p for p in net.layer_params if label in list(p.bottom)]
        wrong = [f"{p.name} ({p.type})" for p in readers if p.type not in SOFT_LABEL_LAYERS]
        if wrong:
            raise ConfigError(f"mixup / label smoothing give blob {label!r} soft targets, which "
                              f"{', '.join(wrong)} cannot take", valid=SOFT_LABEL_LAYERS)
        for p in readers:
            if p.type == "SoftmaxWithLoss" and list(p.bottom).index(label) == 1:
                scores = net.blob_shapes[p.bottom[0]]
                axis = p.softmax_param.axis % len(scores)
                found[label] = int(scores[axis])
        if label not in found:
            raise ConfigError(f"mixup / label smoothing need a SoftmaxWithLoss layer reading the labels "
                              f"{label!r} of layer {layer.name}")
    return found


def feed(layers: Sequence[DataLayer], batch: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """The input blobs of batch number ``batch`` from every data layer."""
    inputs: Dict[str, torch.Tensor] = {}
    for layer in layers:
        inputs.update(layer.batch(batch, device))
    return inputs


def _output_lines(net: CaffeNet, values: Dict[str, np.ndarray]) -> List[Tuple[str, float, str]]:
    """(name, value, loss suffix) per output element, in output-blob order, as Caffe prints them."""
    lines = []
    for name in net.output_blobs:
        weight = net.loss_weights.get(name, 0.0)
        for value in np.asarray(values[name]).reshape(-1):
            suffix = f" (* {fmt(weight)} = {fmt(weight * value)} loss)" if weight else ""
            lines.append((name, float(value), suffix))
    return lines


def solver_snapshots(solver_path: os.PathLike, suffix: str = "solverstate") -> Dict[int, Path]:
    """This solver's own ``<snapshot_prefix>_iter_N.<suffix>`` files by N, where :meth:`Trainer.snapshot`
    writes them (another series in the same folder, e.g. the ``_dropout`` one, is not included)."""
    solver_path = Path(solver_path)
    param = read_solver(solver_path)
    prefix = SolverFiles(solver_path, param).output(param.snapshot_prefix or solver_path.with_suffix("").name)
    return snapshot_series(prefix.parent, suffix).get(prefix.name, {})


def latest_solverstate(solver_path: os.PathLike, max_iter: Optional[int] = None) -> Optional[Path]:
    """The solver's newest snapshot state up to ``max_iter`` (default: the solver's), or None: what
    ``train --resume`` (and a resubmitted cluster job) continues from after an interruption, a
    walltime limit or a raised ``max_iter``.  Later snapshots (a run with a larger ``max_iter``) are
    kept, not resumed."""
    states = solver_snapshots(solver_path)
    limit = max_iter if max_iter is not None else read_solver(Path(solver_path)).max_iter
    usable = [n for n in states if n <= limit]
    return states[max(usable)] if usable else None


#: Solver fields that cannot change the trained weights: logging, testing, snapshot cadence and the
#: length of the run (a longer run continues a shorter one; ``poly`` is the one policy that depends on it).
RESULT_NEUTRAL_FIELDS = ("display", "average_loss", "test_iter", "test_interval", "test_initialization",
                         "test_compute_loss", "snapshot", "snapshot_prefix", "snapshot_after_train",
                         "snapshot_format", "debug_info", "max_iter", "solver_mode", "device_id")


def training_identity(solver_path: os.PathLike) -> dict:
    """What decides a training's weights, read from its solver and net: every solver field except
    :data:`RESULT_NEUTRAL_FIELDS` (``max_iter`` too under ``lr_policy: "poly"``), the net file, the
    mean files it reads (their bytes) and the names of its databases (what a database holds is its
    builder's to say: ``run`` adds the key of its dbs stage).  Two trainings with the same identity
    draw the same weights at every iteration, so one's snapshots continue the other."""
    import hashlib

    solver_path = Path(solver_path)
    param = read_solver(solver_path)
    files = SolverFiles(solver_path, param)
    neutral = caffe_pb2.SolverParameter()
    neutral.CopyFrom(param)
    for name in RESULT_NEUTRAL_FIELDS:
        if name == "max_iter" and param.lr_policy == "poly":
            continue
        neutral.ClearField(name)
    digest = hashlib.sha256(neutral.SerializeToString(deterministic=True))
    inputs = []
    net = param.net or param.train_net
    if net:
        net_path = files.input(net)
        digest.update(net_path.read_bytes())
        text = net_path.read_text(encoding="utf-8", errors="replace")
        for name in sorted(set(_quoted_paths(text))):
            found = resolve_net_path(name, files.folder)
            if found.is_file():
                digest.update(name.encode() + found.read_bytes())
                inputs.append(name)
            else:  # a database: named only (its builder's record says what it holds, see `run`)
                digest.update(name.encode())
                inputs.append(name)
    return {"key": digest.hexdigest()[:16], "inputs": inputs}


def _quoted_paths(text: str) -> List[str]:
    """The ``source:`` and ``mean_file:`` values of a net prototxt (the files its data layers read)."""
    import re

    return re.findall(r'(?:source|mean_file)\s*:\s*"([^"]+)"', text)


def train(solver_path: os.PathLike, *, snapshot: Optional[os.PathLike] = None,
          weights: Sequence[os.PathLike] = (), device: Optional[str] = None, seed: Optional[int] = None,
          max_iter: Optional[int] = None, progress: Optional[bool] = None, log_file: bool = True,
          sigint_effect: str = ACTION_STOP, sighup_effect: str = ACTION_SNAPSHOT,
          augmentation: Optional[Dict[str, object]] = None, max_memory: Optional[int] = None,
          sync_bn: bool = False, on_estimate: Optional[Callable[[Estimate], None]] = None) -> TrainResult:
    """Train the solver's net like ``caffe train`` (see the module docstring); returns a summary.
    ``augmentation`` overrides fields of the solver's ``augmentation_param`` (mixup_alpha,
    label_smoothing, vertical_flip, rotate90); ``max_memory``: bytes a decoded database may take in
    memory, a larger one is streamed (default: 80% of the memory available when it is opened);
    ``sync_bn`` shares BatchNorm's batch statistics among the ranks of a multi-process run;
    ``on_estimate`` receives the expected time left after the first iterations (default: logged,
    with the CPU warning for the tutorial's 600,000)."""
    trainer = Trainer(solver_path, snapshot=snapshot, weights=weights, device=device, seed=seed,
                      max_iter=max_iter, augmentation=augmentation, max_memory=max_memory,
                      sync_bn=sync_bn)
    trainer.on_estimate = on_estimate
    try:
        return trainer.solve(progress=progress, log_file=log_file, sigint_effect=sigint_effect,
                             sighup_effect=sighup_effect)
    finally:
        trainer.record_cache.close()  # streamed databases: their reader threads hold them open


@dataclass
class TestResult:
    """What ``caffe test`` reports: per-batch output values, their means and the mean loss."""

    batches: List[List[Tuple[str, float]]]
    scores: List[Tuple[str, float, str]]
    loss: float


def test_model(model: os.PathLike, weights: Sequence[os.PathLike], iterations: int, *,
               device: Optional[str] = "cpu", seed: int = 0, log: Optional[CaffeLog] = None) -> TestResult:
    """``caffe test``: the TEST-phase net of ``model`` with ``weights``, ``iterations`` batches from its
    data layers (centre crops, records in key order from the first)."""
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    model = Path(model)
    target = resolve_device(device, caffe_pb2.SolverParameter.CPU)
    net = build_net(read_net_prototxt(model), caffe_pb2.TEST, base_dir=model.parent, source=model)
    for path in weights:
        net.load_weights(read_caffemodel(path), path)
    net.to(target)
    layers = data_layers(net, caffe_pb2.TEST, seed, lambda p: find_input(p, model.parent))
    say = log.info if log is not None else (lambda message, src=None: None)
    say(f"Running for {iterations} iterations.", caffelog.SRC_TOOL)
    batches: List[List[Tuple[str, float]]] = []
    sums: Dict[str, np.ndarray] = {}
    total_loss = 0.0
    with torch.no_grad():
        for i in range(iterations):
            blobs = net(feed(layers, i, target))
            total_loss += float(net.loss(blobs)) if net.loss_weights else 0.0
            row = []
            for name in net.output_blobs:
                values = blobs[name].detach().reshape(-1).double().cpu().numpy()
                sums[name] = sums[name] + values if name in sums else values
                for value in values:
                    say(f"Batch {i}, {name} = {fmt(value)}", caffelog.SRC_TOOL)
                    row.append((name, float(value)))
            batches.append(row)
    loss = total_loss / iterations
    say(f"Loss: {fmt(loss)}", caffelog.SRC_TOOL)
    scores = _output_lines(net, {name: values / iterations for name, values in sums.items()})
    for name, value, suffix in scores:
        say(f"{name} = {fmt(value)}{suffix}", caffelog.SRC_TOOL)
    return TestResult(batches, scores, loss)


# --------------------------------------------------------------------------- the run's stage


def fold_solver(workdir: os.PathLike, fold: int) -> Path:
    """Fold ``fold``'s rendered solver in a work directory."""
    return Path(workdir) / str(fold) / SOLVER_NAME.format(fold=fold)


def fold_snapshots(workdir: os.PathLike, fold: int, suffix: str) -> Dict[int, Path]:
    """The fold's snapshots of the rendered solver's own series by N (plain vs ``_dropout``: the other
    variant's files are neither resumed, evaluated nor deleted)."""
    solver = fold_solver(workdir, fold)
    return solver_snapshots(solver, suffix) if solver.is_file() else {}


def final_snapshot(workdir: os.PathLike, fold: int) -> Optional[Path]:
    """The fold's caffemodel at its solver's ``max_iter``, or None (not rendered, or not trained that far)."""
    solver = fold_solver(workdir, fold)
    if not solver.is_file():
        return None
    return fold_snapshots(workdir, fold, "caffemodel").get(int(read_solver(solver).max_iter))


class TrainStage(PatchPipelineStage):
    """Step 4b: train every fold to its final snapshot, here or as cluster jobs (``--executor``).

    Snapshots are never deleted: those of other settings move aside (:meth:`supersede`), those of the
    same training identity (a changed display or snapshot interval, a longer ``--max-iter``) are resumed.
    """

    name = "train"
    reads = (f"{{fold}}/{SOLVER_NAME}", DB_TRAIN, DB_TEST, MEAN_FILE)
    writes = ("{fold}/*_iter_N.caffemodel", "{fold}/*_iter_N.solverstate", f"{{fold}}/{TRAIN_LOG}",
              f"{{fold}}/{RECORD_NAME}", f"{{fold}}/{TRAIN_KEY_JSON}", f"{{fold}}/{SUPERSEDED_DIR}/KEY/")
    per_fold = True

    def check(self, o: RunOptions) -> None:
        if o.executor != LOCAL_EXECUTOR and o.executor not in TRAIN_EXECUTORS:
            raise ConfigError(f"unknown executor {o.executor!r}", valid=executor_names())
        try:
            devices.resolve_device(o.device)
        except ConfigError as exc:
            raise ConfigError(exc.detail, "--device") from None

    def params(self, o: RunOptions) -> dict:
        return {"seed": o.seed, "device": o.device, "folds": o.fold_list}

    def complete(self, o: RunOptions) -> bool:
        return all(final_snapshot(o.workdir, k) is not None for k in o.fold_list)

    def run(self, o: RunOptions, fresh: bool) -> None:
        for k in o.fold_list:
            self.supersede(o, k)
        todo = [k for k in o.fold_list if final_snapshot(o.workdir, k) is None]
        if not todo:
            return
        if o.executor == LOCAL_EXECUTOR:
            self._train_here(o, todo)
        else:
            TRAIN_EXECUTORS.lookup(o.executor)(o, todo)
        unfinished = [k for k in todo if final_snapshot(o.workdir, k) is None]
        if unfinished:
            raise TrainingError(f"fold(s) {', '.join(map(str, unfinished))} stopped before their last snapshot; "
                                "rerun `lymph-cv run` to resume", o.workdir)

    @staticmethod
    def training_key(o: RunOptions, fold: int) -> str:
        """The fold's training identity (:func:`training_identity`) with the key of the data it reads."""
        dbs_key = run_record(o.workdir)["stages"].get("dbs", {}).get("key", "")
        return key_digest({"solver": training_identity(fold_solver(o.workdir, fold))["key"], "dbs": dbs_key,
                           "device": o.device})

    def supersede(self, o: RunOptions, fold: int) -> Optional[Path]:
        """Keep the fold's snapshots when what decides its weights changed: move them (with their
        train.log and train.json) under ``K/superseded/<their key>/``; never delete them.  Returns where."""
        folder = Path(o.workdir) / str(fold)
        key_path = folder / TRAIN_KEY_JSON
        key = self.training_key(o, fold)
        try:
            old = json.loads(key_path.read_text(encoding="utf-8")).get("key")
        except (OSError, ValueError, AttributeError):
            old = None
        files = [p for suffix in ("caffemodel", "solverstate") for p in fold_snapshots(o.workdir, fold, suffix).values()]
        moved_to = None
        if files and old != key:
            moved_to = folder / SUPERSEDED_DIR / (old or f"unrecorded-{time.strftime('%Y%m%dT%H%M%S')}")
            make_dirs(moved_to)
            for path in files + [folder / LOG_NAME, folder / RECORD_NAME]:
                if path.exists():
                    os.replace(path, moved_to / path.name)
            log.info("fold %d: the training settings changed; kept its %d earlier snapshot(s) in %s", fold,
                     len(files) // 2 or len(files), moved_to)
        if old != key:
            atomic_write_json(key_path, {"key": key})
        return moved_to

    @staticmethod
    def _train_here(o: RunOptions, folds: Sequence[int]) -> None:
        for index, k in enumerate(folds):
            solver = fold_solver(o.workdir, k)
            resume = latest_solverstate(solver)
            log.info("fold %d: training%s", k, f" (resuming from {resume.name})" if resume else "")
            result = train(solver, snapshot=resume, device=o.device,
                           on_estimate=_announce_estimate(k, len(folds) - index))
            if result.stopped_early:
                signum = result.stop_signal or signal.SIGINT
                raise Interrupted(f"fold {k}: training stopped by {signal_name(signum)} at iteration "
                                  f"{result.iterations} of {result.max_iter} after its snapshot; rerun `lymph-cv run` "
                                  "to resume", solver, signum=signum)


def _announce_estimate(fold: int, folds_left: int) -> Callable[[Estimate], None]:
    """The estimate of a fold's training, and of the folds still to train in this run."""
    from lymph_cv.core.progress import format_duration

    def announce(estimate: Estimate) -> None:
        # Later folds start from iteration 0: each takes about what this one's full run takes.
        per_fold = estimate.seconds * estimate.max_iter / max(estimate.iterations, 1)
        run_seconds = estimate.seconds + per_fold * (folds_left - 1)
        log.info("fold %d: %s; the %d fold(s) left in this run: about %s", fold, estimate.describe(), folds_left,
                 format_duration(run_seconds))
        warning = cpu_warning(estimate, folds_left, run_seconds)
        if warning:
            log.warning("warning: %s", warning)

    return announce


STAGE = TrainStage()
