"""A work folder's databases (``build_dbs``): which to build or keep (``dbs.json`` records what each was
built from, stain normalisation included), built in parallel; and the run's dbs stage."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from lymph_cv.formats import store
from lymph_cv.errors import ConfigError, InputError, LymphCVError, StoreError
from lymph_cv.core import faults
from lymph_cv.core.fsutil import atomic_write_json, remove_path, remove_stale_temporaries
from lymph_cv.core.workers import imap
from lymph_cv.stages.patches import BadInputs
from lymph_cv.stages.stage import PatchPipelineStage, RunOptions, stain_key, stain_target_record
from lymph_cv.stages.stain import StainRecord, StainTransform, fit_record, write_record
from lymph_cv.stages.dbs.cache import PatchCache, build_from_cache, digest_of_manifest, is_tile_manifest
from lymph_cv.stages.dbs.convert import DEFAULT_BACKEND, DEFAULT_SEED, DbResult, DbTask, build_from_files
from lymph_cv.workdir.layout import (DB_TEST, DB_TRAIN, DBS_JSON, FOLD_STAIN_RECORD, FOLDS_JSON, MEAN_FILE, TEST_LIST,
                                     TRAIN_LIST, TRAIN_PARENT)
from lymph_cv.workdir.lists import list_folds, read_list_lines
from lymph_cv.workdir.records import FOLDS, read_cache, read_record

log = logging.getLogger(__name__)


def folds_record(workdir: Path) -> dict:
    return read_record(workdir / FOLDS_JSON, FOLDS) or {}


def list_signature(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def build_dbs(
    workdir: Union[str, os.PathLike],
    *,
    folds: Optional[Sequence[int]] = None,
    backend: str = DEFAULT_BACKEND,
    seed: Optional[int] = DEFAULT_SEED,
    root: Union[str, os.PathLike, None] = None,
    images: Union[str, os.PathLike, None] = None,
    overwrite: bool = False,
    workers: Optional[int] = None,
    skip_bad: bool = False,
    stain: Optional[str] = None,
    stain_params: Optional[Mapping[str, Any]] = None,
    stain_target: Optional[StainRecord] = None,
) -> list[DbResult]:
    """Step 3: ``DB_train_K``, ``DB_test_K`` and ``DB_train_w32_K.binaryproto`` for every fold.

    Args:
        workdir: holds ``train_w32_K.txt`` / ``test_w32_K.txt`` (folds found from these files).
        folds: only these fold numbers.
        backend: ``"leveldb"`` (the tutorial's) or ``"lmdb"``.
        seed: shuffles every database (recorded in ``dbs.json``); same seed, same order;
            None keeps the list order (no shuffle).
        root: folder the list names are relative to (default: ``list_root`` of ``folds.json``,
            i.e. ``workdir`` when the patch folder is inside it).
        images: build straight from the source images in this folder (``CLASS/file.tif``)
            instead of reading patch files; needs the manifest named in ``folds.json``.
        overwrite: replace existing databases; without it an existing database is an error,
            unless ``dbs.json`` shows it was built from the same list, patches, backend and seed (kept).
        workers: processes, one database at a time each (``None`` = all cores).
        skip_bad: skip unreadable/missing images with a warning instead of stopping.
        stain: with ``images``, normalise every whole image with this method as it is read:
            with ``stain_target`` as given, else fitted per fold on that fold's training images
            only (its train parent list); the record goes to ``stain_K.json`` (evaluate reads it).
        stain_params: the method's parameters (for fitting per fold).
    """
    workdir = Path(workdir)
    backend = store.check_backend(backend)
    if seed is not None and seed < 0:  # numpy's generators take non-negative seeds only
        raise ConfigError(f"--seed: must be a non-negative integer, got {seed}")
    found = list_folds(workdir)
    if not found:
        raise InputError("no train_w32_K.txt / test_w32_K.txt lists found (run `lymph-cv folds` first)", workdir)
    selected = list(found if folds is None else dict.fromkeys(folds))  # `--fold 1 --fold 1`: built once
    missing = [k for k in selected if k not in found]
    if missing:
        raise ConfigError(f"--fold: fold {missing[0]} has no lists in {workdir}", valid=[str(k) for k in found])
    record = folds_record(workdir)
    classes = record.get("classes")
    num_labels = len(classes) if classes else None
    root_dir = Path(root) if root is not None else workdir / record.get("list_root", ".")
    for path in remove_stale_temporaries(workdir):  # databases of a killed run (they can be large)
        log.info("dbs: removed %s, left by an interrupted run", path)
    previous = read_dbs_json(workdir)
    same_settings = previous.get("backend") == backend and previous.get("seed") == seed
    manifest_digest = digest_of_manifest(workdir, record)
    transforms = _fold_stains(workdir, selected, images, record, stain, stain_params, stain_target)

    tasks: list[DbTask] = []
    kept: list[DbResult] = []
    for side, list_template, db_template in (("train", TRAIN_LIST, DB_TRAIN), ("test", TEST_LIST, DB_TEST)):
        for fold in selected:
            list_path = workdir / list_template.format(fold=fold)
            db_path = workdir / db_template.format(fold=fold)
            mean_path = workdir / MEAN_FILE.format(fold=fold) if side == "train" else None
            if db_path.exists() and not overwrite:
                done = previous.get("dbs", {}).get(db_path.name)
                if isinstance(done, dict) and store_kind(db_path) is None:
                    raise StoreError(f"not a LevelDB/LMDB database, though {DBS_JSON} records one built here; "
                                     "pass --overwrite to rebuild it", db_path)
                if (same_settings and isinstance(done, dict) and done.get("list") == list_signature(list_path)
                        and done.get("manifest") == manifest_digest and (mean_path is None or mean_path.is_file())
                        and done.get("stain") == _stain_json(transforms[fold])):
                    log.info("dbs: keeping %s (built from the same list, patches, backend and seed)", db_path)
                    kept.append(DbResult(os.fspath(db_path), done["records"], done["lines"], 0.0,
                                         None if mean_path is None else os.fspath(mean_path)))
                    continue
                if isinstance(done, dict) and done.get("stain") != _stain_json(transforms[fold]):
                    raise StoreError("was built with another stain normalisation; pass --overwrite to rebuild it", db_path)
                if isinstance(done, dict):
                    raise StoreError("was built from another list, patch set, backend or seed; "
                                     "pass --overwrite to rebuild it", db_path)
                if store_kind(db_path) is not None:
                    # Renamed into place by a run killed before it recorded the database (or by an
                    # orphaned worker): never taken as complete, rebuilt.
                    log.info("dbs: rebuilding %s: %s does not record it as complete", db_path, DBS_JSON)
                    remove_path(db_path)
                else:
                    raise StoreError("already exists; pass --overwrite to replace it", db_path)
            tasks.append(DbTask(fold, side, list_path, db_path, mean_path, backend, seed, root_dir, num_labels, skip_bad))

    bad = BadInputs(skip_bad)
    results: list[DbResult] = list(kept)
    dbs_record = {"backend": backend, "seed": seed, "shuffle": seed is not None,
                  "source": "files" if images is None else "images",
                  "root": os.fspath(root_dir), "images": None if images is None else os.fspath(images),
                  "dbs": dict(previous.get("dbs", {})) if same_settings else {}}
    def note_built(task: DbTask, result: DbResult) -> None:
            # Written after every database (and for those finished when another failed), so a
            # rerun keeps finished databases instead of asking for --overwrite.
            dbs_record["dbs"][task.db_path.name] = {
                "fold": task.fold, "side": task.side, "records": result.records, "lines": result.lines,
                "list": list_signature(task.list_path), "manifest": manifest_digest,
                "mean": None if task.mean_path is None else task.mean_path.name,
                "channel_means": result.channel_means, "stain": _stain_json(transforms[task.fold]),
            }
            atomic_write_json(workdir / DBS_JSON, dbs_record)

    # One patch array per stain target: folds normalised with their own targets cut their own patches.
    groups: dict[str, list[DbTask]] = {}
    for task in tasks:
        groups.setdefault(json.dumps(_stain_json(transforms[task.fold]), sort_keys=True), []).append(task)
    for group in groups.values():
        cache = None
        try:
            if images is not None:
                cache = PatchCache.build(workdir, Path(images), [(t.list_path, t.num_labels) for t in group], record,
                                          workers, bad, transforms[group[0].fold])
                group = [dataclasses.replace(t, cache=cache) for t in group]
            function = build_from_files if cache is None else build_from_cache
            weights = [t.list_path.stat().st_size for t in group]
            for task, result in zip(group, imap(function, group, workers=workers, desc="dbs", unit="B", weights=weights,
                                                salvage=note_built)):
                faults.event("dbs:built")  # in place, not yet recorded
                bad.merge(result.problems, result.conversions)
                results.append(result)
                note_built(task, result)
                faults.event("dbs:recorded")
        finally:
            if cache is not None:
                cache.remove()
    bad.finish("building databases")
    atomic_write_json(workdir / DBS_JSON, dbs_record)
    for result in sorted(results, key=lambda r: r.path):
        log.debug("dbs: %s: %d records", result.path, result.records)
    return results


def _stain_json(transform: Optional[StainTransform]) -> Optional[dict]:
    return None if transform is None else transform.to_json()


def _fold_stains(workdir: Path, folds: Sequence[int], images, record: dict, method: Optional[str],
                 params: Optional[Mapping[str, Any]], target: Optional[StainRecord]) -> dict[int, Optional[StainTransform]]:
    """Per fold, the stain normalisation its databases are built with (None: none), records written.

    Without a given target each fold's is fitted on that fold's training images only (never on
    its test images) and written to ``stain_K.json``; a fold built without one loses its record.
    """
    if method is None or method == "none":
        for fold in folds:
            (workdir / FOLD_STAIN_RECORD.format(fold=fold)).unlink(missing_ok=True)
        return {fold: None for fold in folds}
    if images is None:
        raise ConfigError("--stain: applies with --images (patch files keep the normalisation `patches --stain` "
                          "gave them)")
    if target is None and is_tile_manifest(workdir, record):
        raise ConfigError("--stain over slides needs --stain-target (a record or an image): a target is not "
                          "fitted on whole slides")
    transforms = {}
    for fold in folds:
        if target is not None:
            fitted = target
        else:
            parents = workdir / TRAIN_PARENT.format(fold=fold)
            names = read_list_lines(parents)
            if not names:
                raise InputError("no training images to fit the stain target on", parents)
            log.info("dbs: fitting the %s stain target of fold %d on its %d training images", method, fold, len(names))
            fitted = fit_record([Path(images) / name for name in names], method, params)
        write_record(workdir / FOLD_STAIN_RECORD.format(fold=fold), fitted, fold=fold,
                     fitted_for="given target" if target is not None else "this fold's training images")
        transforms[fold] = fitted.transform
    return transforms


def store_kind(path: Path) -> Optional[str]:
    """The backend of the database at ``path``, None when it is not one."""
    try:
        return store.detect_backend(path)
    except LymphCVError:
        return None


def read_dbs_json(workdir: Path) -> dict:
    record = read_cache(workdir / DBS_JSON) or {}
    # Anything else than our record: nothing is known to be current (databases are rebuilt or refused).
    return record if isinstance(record, dict) and isinstance(record.get("dbs", {}), dict) else {}


class DbsStage(PatchPipelineStage):
    """Step 3: each fold's training and test databases and its mean file (from patch files, or with
    ``--direct`` straight from the images)."""

    name = "dbs"
    reads = (TRAIN_LIST, TEST_LIST, FOLDS_JSON)
    writes = (DB_TRAIN, DB_TEST, MEAN_FILE, DBS_JSON)
    per_fold = True

    @staticmethod
    def paths(o: RunOptions, fold: int) -> list[Path]:
        """The fold's training database, test database and mean file."""
        w = Path(o.workdir)
        return [w / name.format(fold=fold) for name in (DB_TRAIN, DB_TEST, MEAN_FILE)]

    def params(self, o: RunOptions) -> dict:
        stain = stain_key(o) if o.direct else {}
        return {"backend": o.backend, "seed": o.seed, "direct": o.direct, "folds": o.fold_list, **stain}

    def complete(self, o: RunOptions) -> bool:
        return all(p.exists() for fold in o.fold_list for p in self.paths(o, fold))

    def drop_unrecorded(self, o: RunOptions) -> None:
        """Before resuming: remove this stage's databases that ``dbs.json`` does not record as built
        from their current list (an interruption can land between a database's rename into place and
        its record), so ``build_dbs`` rebuilds them instead of refusing to overwrite them."""
        w = Path(o.workdir)
        previous = read_dbs_json(w)
        same_settings = previous.get("backend") == o.backend and previous.get("seed") == o.seed
        recorded = previous.get("dbs", {}) if same_settings else {}
        for fold in o.fold_list:
            train_db, test_db, mean = self.paths(o, fold)
            for db, lst, needs_mean in ((train_db, TRAIN_LIST, True), (test_db, TEST_LIST, False)):
                list_path = w / lst.format(fold=fold)
                done = recorded.get(db.name)
                kept = (done is not None and list_path.is_file() and done.get("list") == list_signature(list_path)
                        and (not needs_mean or mean.is_file()))
                if db.is_dir() and not kept:
                    log.info("removing %s: left unrecorded by an interrupted run", db)
                    shutil.rmtree(db)

    def run(self, o: RunOptions, fresh: bool) -> None:
        if not fresh:
            self.drop_unrecorded(o)
        stain = dict(stain=o.stain, stain_params=o.stain_params, stain_target=stain_target_record(o)) if o.direct else {}
        build_dbs(o.workdir, folds=o.fold_list, backend=o.backend, seed=o.seed,
                  images=o.data_dir if o.direct else None, overwrite=fresh, workers=o.workers, **stain)


STAGE = DbsStage()
