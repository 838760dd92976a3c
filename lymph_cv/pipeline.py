"""The generic engine of ``lymph-cv run``: loops over :data:`PIPELINE`, each entry a stage module
exporting ``STAGE`` (see :mod:`lymph_cv.stages.stage`); it knows no stage's internals.

A stage's parameters, together with the key of the stage before it (and its fingerprint of outside
inputs, e.g. the images), make the stage's *key*, recorded in ``WORKDIR/run.json`` when it completes:

* same key, stage recorded complete and its outputs present → skipped;
* same key, not recorded complete (interrupted) → resumed: the stage keeps what it finished
  (patch files, databases recorded in ``dbs.json``, snapshots, evaluated folds);
* different key (a changed parameter here or upstream), or ``--from`` this stage → redone
  from scratch, and so is every stage after it (their keys chain to this one).

``--folds`` is not part of the key of per-fold stages (dbs, render, train, evaluate): each records the
folds started under its key, so asking for more folds later runs the new ones from scratch and keeps
(or resumes) the others instead of retraining them.

Nothing is ever half-written under a final name (each stage writes atomically), so killing a
run at any moment and starting it again loses nothing that was complete.

To add a stage: one module exporting ``STAGE`` and one entry in :data:`PIPELINE`.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

# Importing it registers the cluster schedulers as executors of the train stage.
from lymph_cv.cluster import executors as _cluster_executors  # noqa: F401
from lymph_cv.core import faults
from lymph_cv.core.fsutil import atomic_write_json, make_dirs, remove_stale_temporaries
from lymph_cv.core.locks import folder_lock
from lymph_cv.errors import ConfigError, LymphCVError
from lymph_cv.stages.sources import input_fingerprint
from lymph_cv.stages.stage import DemoData, RunOptions, Stage, executor_names, key_digest, run_record
from lymph_cv.workdir.layout import RUN_JSON

log = logging.getLogger(__name__)

#: The stages in order: name → the module exporting its ``STAGE`` (imported when a run starts).
PIPELINE: Sequence[Tuple[str, str]] = (
    ("synth", "lymph_cv.stages.synth"),
    ("patches", "lymph_cv.stages.patches"),
    ("tiles", "lymph_cv.stages.tiling"),
    ("folds", "lymph_cv.stages.folds"),
    ("dbs", "lymph_cv.stages.dbs"),
    ("render", "lymph_cv.stages.render"),
    ("train", "lymph_cv.stages.train"),
    ("evaluate", "lymph_cv.stages.evaluate"),
    ("slide_eval", "lymph_cv.stages.slide_eval"),
    ("report", "lymph_cv.stages.report"),
    ("bags", "lymph_cv.stages.mil.bag_stage"),
    ("mil", "lymph_cv.stages.mil.mil_stage"),
)
STAGES = tuple(name for name, _module in PIPELINE)
#: Where training runs: here, or as jobs of a registered cluster scheduler.
EXECUTORS = tuple(executor_names())
#: The stage whose result is :attr:`RunResult.report`.
REPORT_STAGE = "report"
#: A fault point after each stage's completion is recorded (the fault suite kills runs there).
STAGE_DONE_EVENT = "run:stage"


@dataclass
class StageOutcome:
    """What happened to one stage in this run."""

    name: str
    action: str  # "skipped", "resumed", "ran"
    seconds: float = 0.0


@dataclass
class RunResult:
    """The stages' outcomes, what each handed on (``results``) and the final report
    (``lymph_cv.stages.report.Report``)."""

    stages: List[StageOutcome]
    report: object = None
    results: Dict[str, object] = field(default_factory=dict)


def load_stages() -> List[Stage]:
    """The ``STAGE`` of every module in :data:`PIPELINE`, in order."""
    stages = []
    for name, module in PIPELINE:
        stage = importlib.import_module(module).STAGE
        if stage.name != name:
            raise ConfigError(f"pipeline entry {name!r}: {module}.STAGE is named {stage.name!r}")
        stages.append(stage)
    return stages


#: ``run.json`` as a dict (``stages.stage.run_record``), under the engine's name.
load_record = run_record


def check_options(o: RunOptions, stages: Optional[Sequence[Stage]] = None) -> None:
    """Raise :class:`ConfigError` for options that cannot work together (the run's own, then each
    enabled stage's), before any stage runs rather than hours later when a stage first uses them."""
    if o.from_stage is not None and o.from_stage not in STAGES:
        raise ConfigError(f"unknown stage {o.from_stage!r} for --from", valid=STAGES)
    if o.k < 2:
        raise ConfigError(f"--k must be at least 2, got {o.k}")
    bad = [k for k in o.fold_list if not 1 <= k <= o.k]
    if bad:
        raise ConfigError(f"fold {bad[0]} is outside 1..{o.k}", valid=[str(k) for k in range(1, o.k + 1)])
    if o.max_iter is not None and o.max_iter < 1:
        raise ConfigError(f"--max-iter must be positive, got {o.max_iter}")
    if o.seed < 0:
        raise ConfigError(f"must be a non-negative integer, got {o.seed}", "--seed")
    for stage in stages if stages is not None else load_stages():
        if stage.enabled(o):
            stage.check(o)
    if o.demo is None and not o.data_dir.is_dir():
        raise ConfigError("data folder not found (expected one sub-folder per class, or use --demo)", o.data_dir)


def run_pipeline(options: RunOptions, on_stage: Optional[Callable[[str, str], None]] = None) -> RunResult:
    """Run (or skip, or resume) every stage in order; returns what each did and the report.

    ``on_stage(name, action)`` is called before each stage with "skip", "resume" or "run".
    """
    stages = load_stages()
    check_options(options, stages)
    workdir = Path(options.workdir)
    make_dirs(workdir)
    # One run per work directory (re-entrant: `lymph-cv run` holds it already).
    with folder_lock(workdir):
        return _run_stages(stages, options, on_stage)


def _action(stage: Stage, options: RunOptions, done: dict, key: str, forced: bool) -> Tuple[str, Set[int]]:
    """("skip" | "resume" | "run", the folds already started under this key)."""
    same = done.get("key") == key and not forced
    started = set(done.get("folds_started", done.get("params", {}).get("folds", []))) if same else set()
    have_folds = set(options.fold_list) <= started or not stage.per_fold
    if same and done.get("complete") and have_folds and stage.complete(options):
        return "skip", started
    return ("resume" if same else "run"), started


def _run_stage(stage: Stage, options: RunOptions, action: str, started: Set[int]) -> object:
    if not stage.per_fold:
        return stage.run(options, action == "run")
    # Folds new to this key start afresh (outputs on disk are another key's); the others resume.
    fresh = [k for k in options.fold_list if k not in started]
    kept = [k for k in options.fold_list if k in started]
    value = None
    if fresh:
        value = stage.run(dataclasses.replace(options, folds=fresh), True)
    if kept:
        value = stage.run(dataclasses.replace(options, folds=kept), False)
    return value


def _run_stages(stages: Sequence[Stage], options: RunOptions,
                on_stage: Optional[Callable[[str, str], None]]) -> RunResult:
    workdir = Path(options.workdir)
    record = load_record(workdir)
    # Leftovers of a killed run: temporaries never renamed into place (their writer is gone).
    for folder in [workdir, *(workdir / str(k) for k in options.fold_list)]:
        for path in remove_stale_temporaries(folder):
            log.info("removed %s, left by an interrupted run", path)
    outcomes: List[StageOutcome] = []
    results: Dict[str, object] = {}
    previous_key = ""
    forced = False
    for index, stage in enumerate(stages):
        if not stage.enabled(options):
            continue
        params = stage.params(options)
        keyed = {n: v for n, v in params.items() if n != "folds"} if stage.per_fold else params
        key = key_digest({"stage": stage.name, "params": keyed, "input": stage.fingerprint(options),
                          "previous": previous_key})
        previous_key = key
        forced = forced or options.from_stage == stage.name
        action, started = _action(stage, options, record["stages"].get(stage.name, {}), key, forced)
        if on_stage is not None:
            on_stage(stage.name, action)
        if action == "skip":
            outcomes.append(StageOutcome(stage.name, "skipped"))
            results[stage.name] = stage.result(options)
            continue
        # Record the stage as started (not complete) first: a crash mid-stage then resumes it.
        record["stages"][stage.name] = {"key": key, "params": params, "complete": False}
        if stage.per_fold:
            record["stages"][stage.name]["folds_started"] = sorted(started | set(options.fold_list))
        for later in stages[index + 1:]:
            record["stages"].get(later.name, {})["complete"] = False
        atomic_write_json(workdir / RUN_JSON, record)
        clock = time.monotonic()
        results[stage.name] = _run_stage(stage, options, action, started)
        seconds = time.monotonic() - clock
        record["stages"][stage.name].update(complete=True, seconds=round(seconds, 1),
                                            finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(workdir / RUN_JSON, record)
        faults.event(STAGE_DONE_EVENT)
        outcomes.append(StageOutcome(stage.name, "ran" if action == "run" else "resumed", seconds))
        # A stage that ran anew makes every later stage run anew too: their inputs changed.
        forced = forced or action == "run"
    return RunResult(outcomes, results.get(REPORT_STAGE), results)


__all__ = ["RunOptions", "DemoData", "RunResult", "StageOutcome", "PIPELINE", "STAGES", "EXECUTORS", "run_pipeline",
           "check_options", "load_stages", "load_record", "input_fingerprint", "LymphCVError"]
