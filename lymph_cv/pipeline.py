"""The end-to-end orchestrator: images → patches → folds → DBs → configs → training → evaluation → report.

Every stage is a plain call into the stage's library module.  Its parameters, together with
the key of the stage before it (and, for the first stage, a fingerprint of the input images),
make the stage's *key*, recorded in ``WORKDIR/run.json`` when the stage completes:

* same key, stage recorded complete and its outputs present → skipped;
* same key, not recorded complete (interrupted) → resumed: the stage keeps what it finished
  (patch files, databases recorded in ``dbs.json``, snapshots, evaluated folds);
* different key (a changed parameter here or upstream), or ``--from`` this stage → redone
  from scratch, and so is every stage after it (their keys chain to this one).

``--folds`` is not part of the key of the per-fold stages (dbs, render, train, evaluate): each
records the folds started under its key, so asking for more folds later runs the new ones from
scratch and keeps (or resumes) the others instead of retraining them.

Nothing is ever half-written under a final name (each stage writes atomically), so killing a
run at any moment and starting it again loses nothing that was complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from lymph_cv import DEFAULT_CLASSES
from lymph_cv.errors import ConfigError, Interrupted, LymphCVError, TrainingError, signal_name
from lymph_cv.core.devices import CONCRETE_DEVICES, resolve_device
from lymph_cv.core import faults
from lymph_cv.core.locks import folder_lock, target_lock_name
from lymph_cv.core.fsutil import atomic_write_json, make_dirs, remove_stale_temporaries
from lymph_cv.stages.sources import input_fingerprint
from lymph_cv.workdir.records import RUN, read_record
from lymph_cv.workdir.layout import (DB_TEST, DB_TRAIN, DEPLOY_NAME, EVAL_DIR, MANIFEST_NAME, MEAN_FILE, NET_NAME,
                             HEATMAP_DIR, PATCH_DIR, REPORT_HTML, REPORT_MD, RUN_JSON, SOLVER_NAME, SUPERSEDED_DIR,
                             TRAIN_KEY_JSON)

log = logging.getLogger(__name__)

#: Where ``--demo`` writes its synthetic images.
DATA_DIR = "data"
STAGES = ("synth", "patches", "folds", "dbs", "render", "train", "evaluate", "report")
EXECUTORS = ("local", "pbs", "slurm")
#: Image suffixes whose files make up the input fingerprint.


@dataclass(frozen=True)
class DemoData:
    """The synthetic data set ``--demo`` generates (small enough for minutes on 2 cores)."""

    per_class: int = 15
    cases_per_class: int = 5
    width: int = 420
    height: int = 320


#: lymph_cv.net.archs.DEFAULT_ARCH, spelled out: importing the registry loads torch.
TUTORIAL_ARCH = "alexnet32w"


@dataclass(frozen=True)
class RunOptions:
    """Everything that decides what ``lymph-cv run`` computes."""

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
    aggregate: str = "vote"
    heatmaps: bool = False
    workers: Optional[int] = None
    from_stage: Optional[str] = None
    #: stain normalisation: method (None: none), its parameters, and a target (record or image);
    #: without a target it is fitted per fold on the fold's training images (needs ``direct``).
    stain: Optional[str] = None
    stain_params: Dict[str, object] = field(default_factory=dict)
    stain_target: Optional[Path] = None

    @property
    def data_dir(self) -> Path:
        return Path(self.data) if self.data is not None else Path(self.workdir) / DATA_DIR

    @property
    def fold_list(self) -> List[int]:
        return list(self.folds) if self.folds else list(range(1, self.k + 1))


@dataclass
class StageOutcome:
    """What happened to one stage in this run."""

    name: str
    action: str  # "skipped", "resumed", "ran"
    seconds: float = 0.0


@dataclass
class RunResult:
    """The stages' outcomes and the final report (``lymph_cv.stages.report.Report``)."""

    stages: List[StageOutcome]
    report: object = None


# --------------------------------------------------------------------------- the record


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_record(workdir: Path) -> dict:
    """``run.json``, or an empty record when there is none yet."""
    record = read_record(Path(workdir) / RUN_JSON, RUN)
    if record is None:
        return {"stages": {}}
    if record.get("stages") is None:
        record["stages"] = {}
    return record


# --------------------------------------------------------------------------- the stages


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its parameters, whether its outputs are all there, and how to run it."""

    name: str
    params: Callable[[RunOptions], dict]
    complete: Callable[[RunOptions], bool]
    run: Callable[[RunOptions, bool], object]  # (options, fresh) → anything
    enabled: Callable[[RunOptions], bool] = lambda options: True
    fingerprint: Callable[[RunOptions], str] = lambda options: ""
    #: Outputs per fold: the fold list is not part of the key; folds first asked for under the key
    #: run fresh, folds already started under it resume (so adding a fold keeps the others' work).
    per_fold: bool = False


def _where(o: RunOptions, path: Path) -> str:
    """``path`` relative to the workdir when inside it, so a moved workdir stays current."""
    path, workdir = Path(path).resolve(), Path(o.workdir).resolve()
    return os.fspath(path.relative_to(workdir)) if path.is_relative_to(workdir) else os.fspath(path)


def _synth_params(o: RunOptions) -> dict:
    return {**dataclasses.asdict(o.demo), "seed": o.seed, "classes": list(o.classes), "data": _where(o, o.data_dir)}


def _synth_complete(o: RunOptions) -> bool:
    return (o.data_dir / "synth.json").is_file()


def _synth_run(o: RunOptions, fresh: bool) -> None:
    from lymph_cv.stages import synth

    if fresh and o.data_dir.exists() and (o.data_dir / "synth.json").is_file():
        shutil.rmtree(o.data_dir)
    demo = o.demo
    synth.generate(o.data_dir, per_class=demo.per_class, cases_per_class=demo.cases_per_class,
                   width=demo.width, height=demo.height, seed=o.seed, classes=o.classes, workers=o.workers)


def _patch_dir(o: RunOptions) -> Path:
    return Path(o.workdir) / PATCH_DIR


def _stain_params(o: RunOptions) -> dict:
    """The stain part of a stage key (empty without normalisation, so older keys stay valid)."""
    if o.stain is None:
        return {}
    target = None
    if o.stain_target is not None:
        target = {"path": str(o.stain_target), "sha256": hashlib.sha256(Path(o.stain_target).read_bytes()).hexdigest()}
    return {"stain": {"method": o.stain, "params": dict(o.stain_params), "target": target}}


def _stain_record(o: RunOptions):
    from lymph_cv.stages.stain import resolve_target

    return None if o.stain_target is None else resolve_target(o.stain_target, o.stain, o.stain_params or None)


def _patches_params(o: RunOptions) -> dict:
    stain = {} if o.direct else _stain_params(o)  # with --direct the images are normalised by `dbs`
    return {"data": _where(o, o.data_dir), "classes": list(o.classes), "direct": o.direct, **stain}


def _patches_complete(o: RunOptions) -> bool:
    return (_patch_dir(o) / MANIFEST_NAME).is_file()


def _patches_run(o: RunOptions, fresh: bool) -> None:
    from lymph_cv.stages.patches import extract_patches

    if fresh and _patch_dir(o).exists():
        shutil.rmtree(_patch_dir(o))
    extract_patches(o.data_dir, _patch_dir(o), classes=o.classes, workers=o.workers, write_patches=not o.direct,
                    stain=None if o.direct else _stain_record(o))


def _folds_params(o: RunOptions) -> dict:
    return {"k": o.k, "seed": o.seed, "group_by": o.group_by}


def _folds_complete(o: RunOptions) -> bool:
    from lymph_cv.workdir.lists import list_folds

    return set(o.fold_list) <= set(list_folds(o.workdir))


def _folds_run(o: RunOptions, fresh: bool) -> None:
    from lymph_cv.stages.folds import describe, make_folds

    fold_set = make_folds(_patch_dir(o) / MANIFEST_NAME, o.workdir, k=o.k, seed=o.seed, group_by=o.group_by)
    log.info("%s", describe(fold_set))


def _db_paths(o: RunOptions, fold: int) -> List[Path]:
    w = Path(o.workdir)
    return [w / name.format(fold=fold) for name in (DB_TRAIN, DB_TEST, MEAN_FILE)]


def _dbs_params(o: RunOptions) -> dict:
    stain = _stain_params(o) if o.direct else {}
    return {"backend": o.backend, "seed": o.seed, "direct": o.direct, "folds": o.fold_list, **stain}


def _dbs_complete(o: RunOptions) -> bool:
    return all(p.exists() for fold in o.fold_list for p in _db_paths(o, fold))


def _drop_unrecorded_dbs(o: RunOptions) -> None:
    """Before resuming: remove this stage's databases that ``dbs.json`` does not record as built
    from their current list (an interruption can land between a database's rename into place and
    its record), so ``build_dbs`` rebuilds them instead of refusing to overwrite them."""
    from lymph_cv.stages.dbs import list_signature, read_dbs_json
    from lymph_cv.workdir.layout import TEST_LIST, TRAIN_LIST

    w = Path(o.workdir)
    previous = read_dbs_json(w)
    same_settings = previous.get("backend") == o.backend and previous.get("seed") == o.seed
    recorded = previous.get("dbs", {}) if same_settings else {}
    for fold in o.fold_list:
        train_db, test_db, mean = _db_paths(o, fold)
        for db, lst, needs_mean in ((train_db, TRAIN_LIST, True), (test_db, TEST_LIST, False)):
            list_path = w / lst.format(fold=fold)
            done = recorded.get(db.name)
            kept = (done is not None and list_path.is_file() and done.get("list") == list_signature(list_path)
                    and (not needs_mean or mean.is_file()))
            if db.is_dir() and not kept:
                log.info("removing %s: left unrecorded by an interrupted run", db)
                shutil.rmtree(db)


def _dbs_run(o: RunOptions, fresh: bool) -> None:
    from lymph_cv.stages.dbs import build_dbs

    if not fresh:
        _drop_unrecorded_dbs(o)
    stain = dict(stain=o.stain, stain_params=o.stain_params, stain_target=_stain_record(o)) if o.direct else {}
    build_dbs(o.workdir, folds=o.fold_list, backend=o.backend, seed=o.seed,
              images=o.data_dir if o.direct else None, overwrite=fresh, workers=o.workers, **stain)


def training_overrides(o: RunOptions) -> Dict[str, str]:
    """Template variables for ``render``: ``--max-iter`` scales the schedule, ``--set`` wins."""
    values: Dict[str, str] = {"random_seed": str(o.seed)}
    if o.max_iter is not None:
        values["max_iter"] = str(o.max_iter)
        # Test at the start and the end only, snapshot four times (so an interrupted run resumes
        # close to where it stopped), and log twenty times: the tutorial's cadence scaled down.
        values["test_interval"] = str(o.max_iter)
        values["snapshot"] = str(max(1, o.max_iter // 4))
        values["display"] = str(max(1, o.max_iter // 20))
    values.update(o.overrides)
    return values


def _render_params(o: RunOptions) -> dict:
    params = {"overrides": training_overrides(o), "dropout": o.dropout, "folds": o.fold_list,
              "device": _solver_device(o)}
    # Only when not the tutorial's net, so the keys of earlier runs stay valid.
    params.update({k: v for k, v in (("arch", o.arch), ("stem", o.stem)) if v not in (None, TUTORIAL_ARCH)})
    return params


def _solver_device(o: RunOptions) -> str:
    return "cuda" if o.device.startswith("cuda") else "cpu"


def _render_complete(o: RunOptions) -> bool:
    w = Path(o.workdir)
    return all((w / str(k) / name.format(fold=k)).is_file()
               for k in o.fold_list for name in (SOLVER_NAME, NET_NAME, DEPLOY_NAME))


def _render_run(o: RunOptions, fresh: bool) -> None:
    from lymph_cv.stages.render import render_folds

    render_folds(o.workdir, o.fold_list, dropout=o.dropout, overrides=training_overrides(o),
                 device=_solver_device(o), arch=o.arch, stem=o.stem)


def _solver(o: RunOptions, fold: int) -> Path:
    return Path(o.workdir) / str(fold) / SOLVER_NAME.format(fold=fold)


def _snapshots(o: RunOptions, fold: int, suffix: str) -> Dict[int, Path]:
    """The fold's snapshots of the rendered solver's own series by N (plain vs ``_dropout``: the other
    variant's files are neither resumed, evaluated nor deleted)."""
    from lymph_cv.stages.train import solver_snapshots

    solver = _solver(o, fold)
    return solver_snapshots(solver, suffix) if solver.is_file() else {}


def _final_iteration(o: RunOptions, fold: int) -> int:
    from lymph_cv.formats.caffe.prototxt import read_solver

    return int(read_solver(_solver(o, fold)).max_iter)


def _fold_trained(o: RunOptions, fold: int) -> bool:
    solver = _solver(o, fold)
    return solver.is_file() and _final_iteration(o, fold) in _snapshots(o, fold, "caffemodel")


def _train_params(o: RunOptions) -> dict:
    return {"seed": o.seed, "device": o.device, "folds": o.fold_list}


def _train_complete(o: RunOptions) -> bool:
    return all(_fold_trained(o, k) for k in o.fold_list)


def _training_key(o: RunOptions, fold: int) -> str:
    """The fold's training identity (stages.train.training_identity) with the key of the data it reads."""
    from lymph_cv.stages.train import training_identity

    dbs_key = load_record(Path(o.workdir))["stages"].get("dbs", {}).get("key", "")
    return _digest({"solver": training_identity(_solver(o, fold))["key"], "dbs": dbs_key, "device": o.device})


def _supersede(o: RunOptions, fold: int) -> Optional[Path]:
    """Keep the fold's snapshots when what decides its weights changed: move them (with their
    train.log and train.json) under ``K/superseded/<their key>/``; never delete them.  Returns where."""
    from lymph_cv.stages.train import LOG_NAME, RECORD_NAME

    folder = Path(o.workdir) / str(fold)
    key_path = folder / TRAIN_KEY_JSON
    key = _training_key(o, fold)
    try:
        old = json.loads(key_path.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        old = None
    files = [p for suffix in ("caffemodel", "solverstate") for p in _snapshots(o, fold, suffix).values()]
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


def _train_run(o: RunOptions, fresh: bool) -> None:
    # Snapshots are never deleted: those of other settings move aside, those of the same settings
    # (a changed display or snapshot interval, a longer --max-iter) are resumed.
    for k in o.fold_list:
        _supersede(o, k)
    todo = [k for k in o.fold_list if not _fold_trained(o, k)]
    if not todo:
        return
    if o.executor == "local":
        _train_here(o, todo)
    else:
        _train_on_cluster(o, todo)
    unfinished = [k for k in todo if not _fold_trained(o, k)]
    if unfinished:
        raise TrainingError(f"fold(s) {', '.join(map(str, unfinished))} stopped before their last snapshot; "
                            "rerun `lymph-cv run` to resume", o.workdir)


def _train_here(o: RunOptions, folds: Sequence[int]) -> None:
    from lymph_cv.stages.train import train

    from lymph_cv.stages.train import latest_solverstate

    for index, k in enumerate(folds):
        solver = _solver(o, k)
        resume = latest_solverstate(solver)
        log.info("fold %d: training%s", k, f" (resuming from {resume.name})" if resume else "")
        result = train(solver, snapshot=resume, device=o.device, on_estimate=_announce_estimate(k, len(folds) - index))
        if result.stopped_early:
            signum = result.stop_signal or signal.SIGINT
            raise Interrupted(f"fold {k}: training stopped by {signal_name(signum)} at iteration {result.iterations} "
                              f"of {result.max_iter} after its snapshot; rerun `lymph-cv run` to resume", solver,
                              signum=signum)


def _announce_estimate(fold: int, folds_left: int):
    """The estimate of a fold's training, and of the folds still to train in this run."""
    from lymph_cv.core.progress import format_duration
    from lymph_cv.stages.eta import cpu_warning

    def announce(estimate) -> None:
        # Later folds start from iteration 0: each takes about what this one's full run takes.
        per_fold = estimate.seconds * estimate.max_iter / max(estimate.iterations, 1)
        run_seconds = estimate.seconds + per_fold * (folds_left - 1)
        log.info("fold %d: %s; the %d fold(s) left in this run: about %s", fold, estimate.describe(), folds_left,
                 format_duration(run_seconds))
        warning = cpu_warning(estimate, folds_left, run_seconds)
        if warning:
            log.warning("warning: %s", warning)

    return announce


def _train_on_cluster(o: RunOptions, folds: Sequence[int]) -> None:
    from lymph_cv.cluster import jobs

    options = o.job_options or jobs.JobOptions()
    jobs.submit_folds(Path(o.workdir), o.executor, folds, options=options, resubmit=True)
    states = jobs.wait_for_jobs(Path(o.workdir), jobs.TRAIN_TASK, timeout=o.job_timeout)
    failed = {k: s for k, s in states.items() if k in folds and s != jobs.COMPLETED}
    if failed:
        detail = ", ".join(f"fold {k}: {s}" for k, s in sorted(failed.items()))
        raise TrainingError(f"training jobs did not complete ({detail}); see `lymph-cv jobs {o.workdir}`")


def _eval_metrics(o: RunOptions, fold: int) -> Path:
    from lymph_cv.stages.evaluate import fold_output_dir

    return fold_output_dir(o.workdir, fold) / "metrics.json"


def _evaluate_params(o: RunOptions) -> dict:
    params = {"oversample": o.oversample, "aggregate": o.aggregate, "device": o.device, "folds": o.fold_list}
    # Absent when off: earlier runs keep their key.
    if o.tta:
        params["tta"] = True
    if o.heatmaps:
        params["heatmaps"] = True
    return params


def _evaluated(o: RunOptions, k: int) -> bool:
    """Fold k's evaluation is on disk (with its heatmaps, when asked for)."""
    metrics = _eval_metrics(o, k)
    return metrics.is_file() and (not o.heatmaps or (metrics.parent / HEATMAP_DIR).is_dir())


def _evaluate_complete(o: RunOptions) -> bool:
    return all(_evaluated(o, k) for k in o.fold_list)


def _evaluate_run(o: RunOptions, fresh: bool) -> None:
    from lymph_cv.stages.evaluate import evaluate_fold, fold_output_dir
    from lymph_cv.stages.report import write_fold

    for k in o.fold_list:
        if not fresh and _evaluated(o, k):
            continue
        model = _snapshots(o, k, "caffemodel").get(_final_iteration(o, k))
        if model is None:
            raise TrainingError(f"fold {k} has no final snapshot; rerun `lymph-cv run` to train it", _solver(o, k))
        result = evaluate_fold(o.workdir, k, model=model, device=o.device, oversample=o.oversample, tta=o.tta,
                               aggregate=o.aggregate)
        out = fold_output_dir(o.workdir, k)
        # the lock `lymph-cv evaluate` takes for this folder (it is replaced as a whole)
        with folder_lock(out.parent, name=target_lock_name(out), sweep=False):
            record = write_fold(result, out, heatmaps=o.heatmaps)
        log.info("fold %d: accuracy %.3f on %d test images", k, record["accuracy"], len(result.images))


def _report_complete(o: RunOptions) -> bool:
    return all((Path(o.workdir) / EVAL_DIR / name).is_file() for name in (REPORT_MD, REPORT_HTML))


def _report_run(o: RunOptions, fresh: bool):
    from lymph_cv.stages.report import build_report, write_report

    # Only this run's folds: eval/fold_K of other folds may come from another split or other settings.
    report = build_report(o.workdir, o.fold_list)
    write_report(report)
    return report


PIPELINE: Sequence[Stage] = (
    Stage("synth", _synth_params, _synth_complete, _synth_run, enabled=lambda o: o.demo is not None),
    Stage("patches", _patches_params, _patches_complete, _patches_run,
          fingerprint=lambda o: input_fingerprint(o.data_dir, o.classes)),
    Stage("folds", _folds_params, _folds_complete, _folds_run),
    Stage("dbs", _dbs_params, _dbs_complete, _dbs_run, per_fold=True),
    Stage("render", _render_params, _render_complete, _render_run, per_fold=True),
    Stage("train", _train_params, _train_complete, _train_run, per_fold=True),
    Stage("evaluate", _evaluate_params, _evaluate_complete, _evaluate_run, per_fold=True),
    Stage("report", lambda o: {"folds": o.fold_list}, _report_complete, _report_run),
)
assert tuple(s.name for s in PIPELINE) == STAGES


def check_options(o: RunOptions) -> None:
    """Raise :class:`ConfigError` for options that cannot work together."""
    if o.executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {o.executor!r}", valid=EXECUTORS)
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
    if o.stain is not None:
        from lymph_cv.stages.stain import get_normaliser

        get_normaliser(o.stain, **o.stain_params)  # an unknown method or parameter, before any stage
        if o.stain_target is None and not o.direct:
            raise ConfigError("--stain without --stain-target fits a target per fold on its training images, "
                              "which needs --direct (databases built straight from the images)")
        if o.stain_target is not None and not Path(o.stain_target).is_file():
            raise ConfigError("no such file (a stain record or an image)", o.stain_target)
    # Checked here, not hours later when training or evaluation first uses them.
    from lymph_cv.stages.aggregate import parse_aggregate
    from lymph_cv.stages.render import resolve_variables

    resolve_variables(training_overrides(o))  # --set KEY=VALUE: known keys, values of their type
    try:
        parse_aggregate(o.aggregate)
    except ConfigError as exc:
        raise ConfigError(exc.detail, "--aggregate") from None
    try:
        resolve_device(o.device)  # training's choices
        resolve_device(o.device, CONCRETE_DEVICES)  # evaluation's: no auto
    except ConfigError as exc:
        raise ConfigError(exc.detail, "--device") from None
    if o.demo is None and not o.data_dir.is_dir():
        raise ConfigError("data folder not found (expected one sub-folder per class, or use --demo)", o.data_dir)


def run_pipeline(options: RunOptions, on_stage: Optional[Callable[[str, str], None]] = None) -> RunResult:
    """Run (or skip, or resume) every stage in order; returns what each did and the report.

    ``on_stage(name, action)`` is called before each stage with "skip", "resume" or "run".
    """
    check_options(options)
    workdir = Path(options.workdir)
    make_dirs(workdir)
    # One run per work directory (re-entrant: `lymph-cv run` holds it already).
    with folder_lock(workdir):
        return _run_stages(options, on_stage)


def _run_stages(options: RunOptions, on_stage: Optional[Callable[[str, str], None]]) -> RunResult:
    workdir = Path(options.workdir)
    record = load_record(workdir)
    # Leftovers of a killed run: temporaries never renamed into place (their writer is gone).
    for folder in [workdir, *(workdir / str(k) for k in options.fold_list)]:
        for path in remove_stale_temporaries(folder):
            log.info("removed %s, left by an interrupted run", path)
    outcomes: List[StageOutcome] = []
    previous_key = ""
    forced = False
    report = None
    for stage in PIPELINE:
        if not stage.enabled(options):
            continue
        params = stage.params(options)
        keyed = {n: v for n, v in params.items() if n != "folds"} if stage.per_fold else params
        key = _digest({"stage": stage.name, "params": keyed, "input": stage.fingerprint(options),
                       "previous": previous_key})
        previous_key = key
        done = record["stages"].get(stage.name, {})
        forced = forced or options.from_stage == stage.name
        same = done.get("key") == key and not forced
        wanted = list(options.fold_list)
        started = set(done.get("folds_started", done.get("params", {}).get("folds", []))) if same else set()
        have_folds = set(wanted) <= started or not stage.per_fold
        if same and done.get("complete") and have_folds and stage.complete(options):
            action = "skip"
        else:
            action = "resume" if same else "run"
        if on_stage is not None:
            on_stage(stage.name, action)
        if action == "skip":
            outcomes.append(StageOutcome(stage.name, "skipped"))
            if stage.name == "report":
                from lymph_cv.stages.report import build_report

                report = build_report(workdir, options.fold_list)
            continue
        # Record the stage as started (not complete) first: a crash mid-stage then resumes it.
        record["stages"][stage.name] = {"key": key, "params": params, "complete": False}
        if stage.per_fold:
            record["stages"][stage.name]["folds_started"] = sorted(started | set(wanted))
        for later in STAGES[STAGES.index(stage.name) + 1:]:
            record["stages"].get(later, {})["complete"] = False
        atomic_write_json(workdir / RUN_JSON, record)
        clock = time.monotonic()
        if stage.per_fold:
            # Folds new to this key start afresh (outputs on disk are another key's); the others resume.
            fresh = [k for k in wanted if k not in started]
            kept = [k for k in wanted if k in started]
            value = None
            if fresh:
                value = stage.run(dataclasses.replace(options, folds=fresh), True)
            if kept:
                value = stage.run(dataclasses.replace(options, folds=kept), False)
        else:
            value = stage.run(options, action == "run")
        seconds = time.monotonic() - clock
        record["stages"][stage.name].update(complete=True, seconds=round(seconds, 1),
                                            finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(workdir / RUN_JSON, record)
        faults.event("run:stage")
        outcomes.append(StageOutcome(stage.name, "ran" if action == "run" else "resumed", seconds))
        if stage.name == "report":
            report = value
        # A stage that ran anew makes every later stage run anew too: their inputs changed.
        forced = forced or action == "run"
    return RunResult(outcomes, report)


__all__ = ["RunOptions", "DemoData", "RunResult", "StageOutcome", "run_pipeline", "check_options", "STAGES",
           "EXECUTORS", "training_overrides", "input_fingerprint", "load_record", "LymphCVError"]
