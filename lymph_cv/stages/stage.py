"""The stage contract: what every stage of ``lymph-cv run`` tells the generic engine (``pipeline.py``).

A stage module exports ``STAGE``, an instance of a :class:`Stage` subclass saying

* ``name``; ``reads`` and ``writes`` (work-directory names, as documentation);
* ``params(options)``: the parameters that enter its key (only those that can change a result:
  progress and worker counts stay out);
* ``complete(options)``: whether its outputs are all there;
* ``run(options, fresh)``: do the work (``fresh``: start over; else keep what a killed run finished);
* optionally ``enabled`` (False: the stage does not apply to this run, e.g. ``synth`` without
  ``--demo``, or a tile stage replacing ``patches`` for slides), ``fingerprint`` (a digest of outside
  inputs, e.g. the images), ``check`` (refuse options before the first stage runs), ``result`` (what a
  skipped stage hands on, as ``run`` returns it) and ``per_fold`` (outputs per fold: see below).

The engine chains the keys, records them in ``run.json`` and decides skip / resume / redo.

To add a stage: write one module exporting ``STAGE = MyStage()`` (a subclass of :class:`Stage`), add
one ``(name, module)`` entry to ``lymph_cv.pipeline.PIPELINE`` and, when it needs options, fields with
defaults to :class:`RunOptions` (so existing runs and their keys stay as they are).  Stages that
replace others return False from ``enabled`` where the others return True.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lymph_cv import DEFAULT_CLASSES
from lymph_cv.core.registry import Registry
from lymph_cv.errors import ConfigError
from lymph_cv.workdir.layout import RUN_JSON
from lymph_cv.workdir.records import RUN, read_record

#: Where ``--demo`` writes its synthetic images (inside the work directory).
DEMO_DATA_DIR = "data"
#: lymph_cv.net.archs.DEFAULT_ARCH, spelled out: importing the registry loads torch.
TUTORIAL_ARCH = "alexnet32w"
#: Hex digits of a stage key.
KEY_DIGITS = 16


@dataclass(frozen=True)
class DemoData:
    """The synthetic data set ``--demo`` generates (small enough for minutes on 2 cores)."""

    per_class: int = 15
    cases_per_class: int = 5
    width: int = 420
    height: int = 320


@dataclass(frozen=True)
class RunOptions:
    """Everything that decides what ``lymph-cv run`` computes (and how: workers, executor, timeouts).

    A plain dataclass: a new stage adds its fields here, with defaults that keep today's runs.
    """

    workdir: Path
    data: Optional[Path] = None
    demo: Optional[DemoData] = None
    classes: Sequence[str] = DEFAULT_CLASSES
    k: int = 5
    folds: Optional[Sequence[int]] = None
    group_by: str = "image"
    seed: int = 0
    backend: str = "leveldb"
    direct: bool = False
    max_iter: Optional[int] = None
    dropout: bool = False
    #: architecture registry name (lymph_cv.net.archs) and forced ResNet stem (None: by patch size).
    arch: str = TUTORIAL_ARCH
    stem: Optional[str] = None
    overrides: Dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    executor: str = "local"
    job_options: Optional[object] = None
    job_timeout: Optional[float] = None
    oversample: bool = True
    tta: bool = False
    #: the evaluation's forward arithmetic (stages.evaluate.PRECISIONS)
    precision: str = "float32"
    aggregate: str = "vote"
    heatmaps: bool = False
    workers: Optional[int] = None
    from_stage: Optional[str] = None
    #: stain normalisation: method (None: none), its parameters, and a target (record or image);
    #: without a target it is fitted per fold on the fold's training images (needs ``direct``).
    stain: Optional[str] = None
    stain_params: Dict[str, object] = field(default_factory=dict)
    stain_target: Optional[Path] = None
    #: whole slides (``--tile-size``): the data are slides, tiled (stages.tiling) instead of cut into
    #: patches and evaluated slide by slide (stages.slide_eval); the tile options of ``slides tile``.
    tile_size: Optional[int] = None
    tile_mpp: Optional[float] = None
    tile_level: Optional[int] = None
    tile_stride: Optional[int] = None
    min_tissue: Optional[float] = None  # None: the tiler's default
    tile_resize: Optional[int] = None
    #: two classes: a slide is the second class when its tile fraction reaches this (None: argmax).
    slide_threshold: Optional[float] = None
    #: class activation maps over each test slide (nets with global average pooling).
    cams: bool = True
    #: multiple-instance learning (issue 15): the MIL method (None: the patch pipeline), the bag kind
    #: (patient: DATA/<patient>/ + clinical CSV; image, case: the patch manifest's), the clinical
    #: fusion, and MILConfig settings as text (``--mil-set crop=64``).
    mil: Optional[str] = None
    bag: Optional[str] = None
    clinical: Optional[Path] = None
    fusion: Optional[str] = None
    mil_params: Dict[str, str] = field(default_factory=dict)

    @property
    def slides(self) -> bool:
        """Whether this is a run over whole slides."""
        return self.tile_size is not None

    @property
    def data_dir(self) -> Path:
        return Path(self.data) if self.data is not None else Path(self.workdir) / DEMO_DATA_DIR

    @property
    def fold_list(self) -> List[int]:
        return list(self.folds) if self.folds else list(range(1, self.k + 1))

    def where(self, path: os.PathLike) -> str:
        """``path`` relative to the workdir when inside it, so a moved workdir stays current."""
        path, workdir = Path(path).resolve(), Path(self.workdir).resolve()
        return os.fspath(path.relative_to(workdir)) if path.is_relative_to(workdir) else os.fspath(path)


class Stage(ABC):
    """One pipeline stage (see the module docstring); subclasses set ``name`` and override what they need."""

    name: str = ""
    #: Work-directory names read and written (``{fold}`` per fold), as documentation.
    reads: Tuple[str, ...] = ()
    writes: Tuple[str, ...] = ()
    #: Outputs per fold: the fold list is not part of the key; folds first asked for under the key
    #: run fresh, folds already started under it resume (so adding a fold keeps the others' work).
    per_fold: bool = False

    def enabled(self, options: RunOptions) -> bool:
        return True

    def check(self, options: RunOptions) -> None:
        """Raise a ConfigError for options this stage cannot work with (before any stage runs)."""

    def params(self, options: RunOptions) -> dict:
        return {}

    def fingerprint(self, options: RunOptions) -> str:
        return ""

    @abstractmethod
    def complete(self, options: RunOptions) -> bool:
        """Whether the stage's outputs are all there."""

    @abstractmethod
    def run(self, options: RunOptions, fresh: bool) -> object:
        """Do the work (``fresh``: start over; else keep what a killed run finished)."""

    def result(self, options: RunOptions) -> object:
        """What a skipped stage hands on (as ``run`` returns it); None by default."""
        return None


class PatchPipelineStage(Stage):
    """A stage of the patch classifier (folds, DBs, training, evaluation, report): off in a MIL run,
    which trains and evaluates bags instead (``stages/mil``)."""

    def enabled(self, options: RunOptions) -> bool:
        return options.mil is None


def key_digest(obj) -> str:
    """The short digest of a JSON-able value that keys stages (and trainings) in ``run.json``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:KEY_DIGITS]


def run_record(workdir: os.PathLike) -> dict:
    """``WORKDIR/run.json`` (``{"stages": {name: {key, params, complete, ...}}}``), empty when there is none."""
    record = read_record(Path(workdir) / RUN_JSON, RUN)
    if record is None:
        return {"stages": {}}
    if record.get("stages") is None:
        record["stages"] = {}
    return record


def stain_key(o: RunOptions) -> dict:
    """The stain part of a stage key (empty without normalisation, so older keys stay valid)."""
    if o.stain is None:
        return {}
    target = None
    if o.stain_target is not None:
        target = {"path": str(o.stain_target), "sha256": hashlib.sha256(Path(o.stain_target).read_bytes()).hexdigest()}
    return {"stain": {"method": o.stain, "params": dict(o.stain_params), "target": target}}


def check_stain(o: RunOptions, instances: str, source: str) -> None:
    """The stain options' one-line errors before any stage: an unknown method or parameter, a per-fold
    fit (no ``--stain-target``) without ``--direct``, a missing target. ``instances`` and ``source`` name
    what the stage normalises ("images", "tiles") and what its databases read ("images", "slides")."""
    if o.stain is None:
        return
    from lymph_cv.stages.stain import get_normaliser

    get_normaliser(o.stain, **o.stain_params)
    if o.stain_target is None and not o.direct:
        raise ConfigError(f"--stain without --stain-target fits a target per fold on its training {instances}, "
                          f"which needs --direct (databases built straight from the {source})")
    if o.stain_target is not None and not Path(o.stain_target).is_file():
        raise ConfigError("no such file (a stain record or an image)", o.stain_target)


def stain_target_record(o: RunOptions):
    """The given stain target as a ``StainRecord`` (None: none given, fitted per fold)."""
    from lymph_cv.stages.stain import resolve_target

    return None if o.stain_target is None else resolve_target(o.stain_target, o.stain, o.stain_params or None)


#: Cluster executors of the train stage: name → ``train(options, folds)`` (``lymph_cv.cluster`` registers
#: its schedulers; the train stage runs ``local`` itself).
TrainExecutor = Callable[[RunOptions, Sequence[int]], None]
TRAIN_EXECUTORS: Registry[TrainExecutor] = Registry("executor")
#: Decorator adding a training executor under a name.
register_executor = TRAIN_EXECUTORS.register
#: The executor that trains in this process.
LOCAL_EXECUTOR = "local"


def executor_names() -> List[str]:
    """Where training can run: here, then each registered cluster scheduler."""
    return [LOCAL_EXECUTOR, *TRAIN_EXECUTORS.names()]
