"""MIL over a work directory's bag splits: ``WORKDIR/bags.json`` and ``bags_train/test_K.txt`` (written by
``lymph-cv bags make`` / ``bags split``) → per split a trained model and its evaluation in
``WORKDIR/mil/NAME/K/``, and the pooled figures in ``WORKDIR/mil/NAME/mil_metrics.json``.

A split is done when its ``mil.json`` is complete, was trained with the same configuration and its
metrics exist; reruns keep done splits (``redo`` retrains them) and go on with a stopped one from
where it stopped."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from lymph_cv.core.fsutil import atomic_write_json
from lymph_cv.errors import InputError
from lymph_cv.core.images import read_image
from lymph_cv.stages.bag_folds import bags_of_split, read_bag_splits
from lymph_cv.stages.bags import BagSet, read_bags
from lymph_cv.stages.mil.data import bag_data
from lymph_cv.stages.mil.evaluate import METRICS_JSON, evaluate_bags, pooled_metrics
from lymph_cv.stages.mil.train import (CONFIG_JSON, MIL_RECORD, MILConfig, load_model, resumable, save_model,
                                       stop_error, train_mil)
from lymph_cv.workdir.records import read_cache, read_record

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
MIL_DIR = "mil"


def run_name(config: MILConfig) -> str:
    """The default NAME of a configuration: the method, ``+FUSION`` with clinical attributes."""
    return config.method + (f"+{config.fusion}" if config.fusion else "")


def mil_dir(workdir: PathLike, name: str) -> Path:
    return Path(workdir) / MIL_DIR / name


def _parent_reader(path: str):
    return read_image(path).bgr


def _stride(bag_set: BagSet) -> Optional[int]:
    grid = bag_set.record.get("grid") or {}
    return int(grid["step"]) if grid.get("step") else None


def fold_done(folder: Path, config: MILConfig) -> bool:
    record = read_record(folder / CONFIG_JSON, MIL_RECORD)
    return bool(record and record.get("complete") and record.get("config") == config.to_json()
                and (folder / METRICS_JSON).is_file())


def train_folds(workdir: PathLike, config: MILConfig, *, name: Optional[str] = None,
                folds: Optional[Sequence[int]] = None, weights: Optional[PathLike] = None, device: str = "cpu",
                redo: bool = False, on_fold: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train and evaluate every split (or ``folds``); returns the pooled metrics (also written)."""
    config.check()
    bag_set = read_bags(workdir)
    splits = read_bag_splits(workdir)
    clinical = config.fusion is not None
    if clinical and not bag_set.clinical_columns:
        raise InputError("--fusion needs clinical attributes, and the bag set has none (make it with a clinical CSV)",
                         bag_set.path)
    chosen = [s for s in splits.splits if folds is None or s.index in folds]
    missing = sorted(set(folds or ()) - {s.index for s in chosen})
    if missing:
        raise InputError(f"no split {missing[0]} (the splits are {', '.join(str(s.index) for s in splits.splits)})",
                         Path(workdir))
    base = mil_dir(workdir, name or run_name(config))
    for split in chosen:
        folder = base / str(split.index)
        if not redo and fold_done(folder, config):
            log.info("split %d: done (%s)", split.index, folder)
            continue
        train, test = bags_of_split(bag_set, split)
        train_data = bag_data(bag_set, train, config.crop, clinical)
        resume = folder if not redo and resumable(folder, config) else None
        if resume is not None:
            log.info("split %d: going on from where it stopped (%s)", split.index, folder)
        trained = train_mil(train_data, bag_set.classes, config, bag_set.clinical_columns if clinical else None,
                            weights, device, resume=resume)
        save_model(trained, folder)
        if trained.stopped is not None:
            raise stop_error(trained, folder)
        metrics = evaluate_bags(trained, bag_data(bag_set, test, config.crop, clinical), folder,
                                parent_reader=_parent_reader, stride=_stride(bag_set))
        if on_fold is not None:
            on_fold(split.index, metrics)
    return pool(base, bag_set.classes)


def pool(base: Path, classes: Sequence[str]) -> dict:
    """The pooled metrics of every evaluated split under ``base``, written to its ``mil_metrics.json``."""
    per_fold: Dict[str, dict] = {}
    for folder in sorted((p for p in base.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        record = read_cache(folder / METRICS_JSON)
        if record is not None:
            per_fold[folder.name] = record
    if not per_fold:
        raise InputError("no evaluated split (run `lymph-cv mil train` first)", base)
    pooled = pooled_metrics(per_fold, classes)
    atomic_write_json(base / METRICS_JSON, pooled)
    return pooled


def evaluate_folds(workdir: PathLike, name: str, folds: Optional[Sequence[int]] = None) -> dict:
    """Evaluate the saved models of ``WORKDIR/mil/NAME`` on their test bags again; pooled metrics."""
    bag_set = read_bags(workdir)
    splits = read_bag_splits(workdir)
    base = mil_dir(workdir, name)
    evaluated: List[int] = []
    for split in splits.splits:
        if folds is not None and split.index not in folds:
            continue
        folder = base / str(split.index)
        if not (folder / CONFIG_JSON).is_file():
            continue
        trained = load_model(folder)
        _, test = bags_of_split(bag_set, split)
        evaluate_bags(trained, bag_data(bag_set, test, trained.config.crop, trained.clinical_names is not None),
                      folder, parent_reader=_parent_reader, stride=_stride(bag_set))
        evaluated.append(split.index)
    if not evaluated:
        raise InputError(f"no trained MIL model under {base} (run `lymph-cv mil train`)", Path(workdir))
    return pool(base, bag_set.classes)
