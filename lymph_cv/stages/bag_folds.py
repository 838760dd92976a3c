"""Patient-level splits of a bag set: stratified k-fold, or repeated random 50/50 splits.

Per split K the work folder gets ``bags_train_K.txt`` and ``bags_test_K.txt`` (one
``<bag id><TAB><label>`` per line, bags in the set's order) and ``bag_folds.json`` (the method, seeds,
per-split counts, and each bag's patient when it differs from the bag id).  Splits never cut a
patient: every bag of one patient (the images of a case, say) lies on one side.

* ``kfold``: as the patch folds (:func:`lymph_cv.stages.folds.assign_folds`, Matlab's
  ``crossvalind('Kfold')`` class by class): within each class the patients in name order are
  permuted by a generator seeded by ``(seed, class index)`` and the j-th goes to test fold
  ``j mod k + 1``; every patient is tested exactly once.
* ``random``: ``repeats`` splits (the seed's protocol: 10), split r seeded by ``seed + r``: within
  each class half the patients (rounded down) go to test, the rest to train.
* ``folds``: the patch pipeline's folds (its ``train/test_w32_parent_K.txt``), for image, case and
  slide bags: a bag goes where its images went, so a MIL head and the patch CNN see the same split.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from lymph_cv.core.fsutil import atomic_write_json, atomic_write_text, make_dirs
from lymph_cv.errors import ConfigError, InputError
from lymph_cv.stages.bags import BagSet, read_bags
from lymph_cv.stages.folds import DEFAULT_K, assign_folds
from lymph_cv.workdir.layout import (BAG_FOLDS_JSON, BAG_LIST_PATTERN, BAG_TEST_LIST, BAG_TRAIN_LIST, BAGS_JSON,
                                     FOLDS_JSON, TEST_PARENT, TRAIN_PARENT)
from lymph_cv.workdir.lists import bag_list_folds, parent_list_folds, read_labelled_list, read_list_lines
from lymph_cv.workdir.records import BAG_FOLDS, FOLDS, read_record

log = logging.getLogger(__name__)
#: bag_folds.json's digest of the bags.json the splits were made from.
BAGS_DIGEST = "bags_sha256"

SPLIT_METHODS = ("kfold", "random", "folds")
#: Split by patient (no patient on both sides) or by bag (the tutorial's images as their own patients).
SPLIT_GROUPS = ("patient", "bag")
DEFAULT_REPEATS = 10


@dataclass
class BagSplit:
    """One split (``index`` from 1, as in the file names): bag ids on each side."""

    index: int
    train: List[str]
    test: List[str]
    seed: Optional[int] = None  # the random split's own seed


@dataclass
class BagSplits:
    """The splits of a bag set and how they were made."""

    splits: List[BagSplit]
    classes: List[str]
    method: str
    seed: Optional[int]  # None: the patch folds followed had none (published lists)
    group_by: str
    k: Optional[int] = None
    repeats: Optional[int] = None
    patients: Dict[str, str] = field(default_factory=dict)  # bag id → patient, where they differ
    out_dir: Optional[Path] = None
    source: Optional[str] = None  # method "folds": the folder of the patch folds followed

    def to_json(self, bag_set: Optional[BagSet] = None) -> dict:
        labels = {b.id: b.label for b in bag_set.bags} if bag_set is not None else {}
        sizes = {b.id: len(b.instances) for b in bag_set.bags} if bag_set is not None else {}

        def per_class(ids):
            counts = Counter(labels.get(i) for i in ids)
            return {name: counts[index] for index, name in enumerate(self.classes)}

        return {
            "method": self.method, "k": self.k, "repeats": self.repeats, "seed": self.seed, "group_by": self.group_by,
            "classes": self.classes, "patients": self.patients, **({} if self.source is None else {"source": self.source}),
            "folds": [{"fold": s.index, **({} if s.seed is None else {"seed": s.seed}),
                       "train_bags": len(s.train), "test_bags": len(s.test),
                       **({"train_per_class": per_class(s.train), "test_per_class": per_class(s.test),
                           "train_instances": sum(sizes[i] for i in s.train),
                           "test_instances": sum(sizes[i] for i in s.test)} if bag_set is not None else {})}
                      for s in self.splits],
        }


def _groups_by_class(bag_set: BagSet, group_by: str) -> Dict[int, Dict[str, List[str]]]:
    """class label → group (patient or bag) → its bag ids; a patient's class is its bags' most common label."""
    members: Dict[str, List[str]] = {}
    labels: Dict[str, Counter] = {}
    for bag in bag_set.bags:
        key = bag.patient if group_by == "patient" else bag.id
        members.setdefault(key, []).append(bag.id)
        labels.setdefault(key, Counter())[bag.label] += 1
    out: Dict[int, Dict[str, List[str]]] = {label: {} for label in range(len(bag_set.classes))}
    for key in sorted(members):
        label = min(labels[key], key=lambda lab: (-labels[key][lab], lab))
        out[label][key] = members[key]
    return out


def split_bags(bag_set: Union[BagSet, str, os.PathLike], out_dir: Union[str, os.PathLike], *,
               method: str = "kfold", k: int = DEFAULT_K, repeats: int = DEFAULT_REPEATS, seed: int = 0,
               group_by: str = "patient") -> BagSplits:
    """Split the bags by patient and write the bag lists and ``bag_folds.json`` to ``out_dir``.

    Args:
        bag_set: a :class:`BagSet` or the path of its ``bags.json`` (or folder).
        method: ``"kfold"`` (stratified k-fold) or ``"random"`` (``repeats`` stratified 50/50 splits).
        k: folds of ``kfold`` (at least 2).
        repeats: splits of ``random``; split r is seeded by ``seed + r`` (recorded).
        seed: the seed (recorded).
        group_by: ``"patient"`` (no patient on both sides) or ``"bag"``.
    """
    if method not in SPLIT_METHODS[:2]:
        raise ConfigError(f"--method: unknown split method {method!r}" + (" (use splits_from_folds)" if method == "folds"
                                                                          else ""), valid=SPLIT_METHODS[:2])
    if group_by not in SPLIT_GROUPS:
        raise ConfigError(f"--group-by: unknown grouping {group_by!r}", valid=SPLIT_GROUPS)
    if seed < 0:
        raise ConfigError(f"--seed: must be a non-negative integer, got {seed}")
    if method == "kfold" and k < 2:
        raise ConfigError(f"--k: must be at least 2, got {k}")
    if method == "random" and repeats < 1:
        raise ConfigError(f"--repeats: must be at least 1, got {repeats}")
    bag_set = bag_set if isinstance(bag_set, BagSet) else read_bags(bag_set)
    grouped = _groups_by_class(bag_set, group_by)
    noun = "patient" if group_by == "patient" else "bag"
    most = max((len(g) for g in grouped.values()), default=0)
    if method == "kfold" and most < k:  # before the warnings: the error is then the one line
        raise ConfigError(f"--k: {k} folds need at least {k} {noun}s in some class, the largest class has {most}")
    for label, groups in grouped.items():
        if len(groups) < (k if method == "kfold" else 2):
            log.warning("warning: class %s has %d %s(s): some test sides lack it", bag_set.classes[label],
                        len(groups), noun)
    if method == "kfold":
        fold_of: Dict[str, int] = {}
        for label, groups in grouped.items():
            numbers = assign_folds(len(groups), k, np.random.default_rng([seed, label]))
            for key, number in zip(groups, numbers.tolist()):
                for ident in groups[key]:
                    fold_of[ident] = number
        splits = [BagSplit(i, [b.id for b in bag_set.bags if fold_of[b.id] != i],
                           [b.id for b in bag_set.bags if fold_of[b.id] == i]) for i in range(1, k + 1)]
    else:
        splits = []
        for r in range(repeats):
            test: set = set()
            for label, groups in grouped.items():
                keys = list(groups)
                order = np.random.default_rng([seed + r, label]).permutation(len(keys))
                for j in order[: len(keys) // 2].tolist():
                    test.update(groups[keys[j]])
            splits.append(BagSplit(r + 1, [b.id for b in bag_set.bags if b.id not in test],
                                   [b.id for b in bag_set.bags if b.id in test], seed + r))
    patients = {b.id: b.patient for b in bag_set.bags if b.patient != b.id}  # the check knows them either way
    result = BagSplits(splits, list(bag_set.classes), method, seed, group_by,
                       k if method == "kfold" else None, repeats if method == "random" else None, patients)
    write_bag_splits(result, bag_set, out_dir)
    return result


def splits_from_folds(bag_set: Union[BagSet, str, os.PathLike], folds_dir: Union[str, os.PathLike],
                      out_dir: Union[str, os.PathLike]) -> BagSplits:
    """Bag splits following the patch folds in ``folds_dir`` (its parent lists): each image, case or
    slide bag on the side its images are on; InputError for a bag whose images are on both sides of
    a fold or in no list."""
    bag_set = bag_set if isinstance(bag_set, BagSet) else read_bags(bag_set)
    if bag_set.kind == "patient":
        raise ConfigError("--method folds: patient bags have no patch folds; use --method kfold or random")
    folds_dir = Path(folds_dir)
    parents_of = {bag.id: _bag_parents(bag, bag_set.kind) for bag in bag_set.bags}
    splits = []
    for index in parent_list_folds(folds_dir):
        sides = {}
        for side, template in (("train", TRAIN_PARENT), ("test", TEST_PARENT)):
            for line in read_list_lines(folds_dir / template.format(fold=index)):
                sides[line if bag_set.kind != "slide" else Path(line).stem] = side
        train, test = [], []
        for bag in bag_set.bags:
            found = {sides.get(parent) for parent in parents_of[bag.id]}
            if len(found) != 1 or None in found:
                what = "on both sides" if {"train", "test"} <= found else "in no parent list"
                raise InputError(f"fold {index}: bag {bag.id!r} has images {what}", folds_dir)
            (train if found == {"train"} else test).append(bag.id)
        splits.append(BagSplit(index, train, test))
    patients = {b.id: b.patient for b in bag_set.bags if b.patient != b.id}
    seed = (read_record(folds_dir / FOLDS_JSON, FOLDS) or {}).get("seed")
    result = BagSplits(splits, list(bag_set.classes), "folds", seed, "bag", len(splits), None, patients,
                       source=os.fspath(folds_dir.resolve()))
    write_bag_splits(result, bag_set, out_dir)
    return result


def _bag_parents(bag, kind: str) -> set:
    """The parent-list entries a bag covers: ``CLASS/file`` of its images, or its slides' stems."""
    if kind == "slide" or (bag.grid is None and bag.instances and bag.instances[0].parent is not None):
        return {Path(i.parent).stem for i in bag.instances if i.parent is not None}
    return {image["path"] for image in bag.images} if bag.grid is not None else {i.path for i in bag.instances}


def write_bag_splits(splits: BagSplits, bag_set: BagSet, out_dir: Union[str, os.PathLike]) -> None:
    """The two lists of every split and ``bag_folds.json`` (each atomically); lists of splits an
    earlier run wrote beyond these are removed."""
    out = Path(out_dir)
    make_dirs(out)
    label_of = {b.id: b.label for b in bag_set.bags}
    for split in splits.splits:
        for template, ids in ((BAG_TRAIN_LIST, split.train), (BAG_TEST_LIST, split.test)):
            atomic_write_text(out / template.format(fold=split.index), "".join(f"{i}\t{label_of[i]}\n" for i in ids))
    keep = {s.index for s in splits.splits}
    for name in sorted(os.listdir(out)):
        match = BAG_LIST_PATTERN.match(name)
        if match and int(match.group(2)) not in keep:
            (out / name).unlink()
            log.info("bag splits: removed %s (not a split of this run)", out / name)
    record = splits.to_json(bag_set)
    if bag_set.path is not None:
        record["bags"] = os.path.relpath(Path(bag_set.path).resolve(), out.resolve()).replace(os.sep, "/")
        if Path(bag_set.path).is_file():  # the splits are of this bag set: a later `bags make` outdates them
            record[BAGS_DIGEST] = bags_digest(bag_set.path)
    atomic_write_json(out / BAG_FOLDS_JSON, record)
    splits.out_dir = out
    log.info("bag splits: %d %s split(s) by %s written to %s", len(splits.splits), splits.method, splits.group_by, out)


def bags_digest(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a bags.json's bytes (recorded with the splits made from it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_bag_splits(directory: Union[str, os.PathLike]) -> BagSplits:
    """The splits in ``directory``: ``bag_folds.json`` and the bag lists (the lists decide the sides);
    an InputError when the bags.json they were made from has changed since."""
    directory = Path(directory)
    record = read_record(directory / BAG_FOLDS_JSON, BAG_FOLDS, required=True,
                         hint="the bag_folds.json written by `lymph-cv bags split`")
    made_from = directory / str(record.get("bags") or BAGS_JSON)
    if record.get(BAGS_DIGEST) and made_from.is_file() and bags_digest(made_from) != record[BAGS_DIGEST]:
        raise InputError(f"the splits are of an earlier {made_from.name} (it changed since `lymph-cv bags split`); "
                         "split the bags again", directory / BAG_FOLDS_JSON)
    seeds = {int(f["fold"]): f.get("seed") for f in record["folds"] if isinstance(f, dict) and "fold" in f}
    splits = []
    for index in bag_list_folds(directory):
        train, test = ([e.name for e in read_labelled_list(directory / t.format(fold=index))]
                       for t in (BAG_TRAIN_LIST, BAG_TEST_LIST))
        splits.append(BagSplit(index, train, test, seeds.get(index)))
    if not splits:
        raise InputError("no bags_train_K.txt / bags_test_K.txt lists (run `lymph-cv bags split`)", directory)
    seed = record.get("seed")
    return BagSplits(splits, [str(c) for c in record["classes"]], record["method"], None if seed is None else int(seed),
                     str(record.get("group_by") or "patient"), record.get("k"), record.get("repeats"),
                     {str(k): str(v) for k, v in (record.get("patients") or {}).items()}, directory, record.get("source"))


def bags_of_split(bag_set: BagSet, split: BagSplit) -> tuple[list, list]:
    """(train bags, test bags) of one split."""
    return bag_set.subset(split.train), bag_set.subset(split.test)


def describe_splits(splits: BagSplits) -> str:
    """One line per split: bags on each side (and the random split's seed)."""
    return "\n".join(f"split {s.index}: train {len(s.train)} bags, test {len(s.test)} bags"
                     + ("" if s.seed is None else f" (seed {s.seed})") for s in splits.splits)


def bags_json_of(directory: Union[str, os.PathLike]) -> Path:
    """The bag set a splits folder was made from (its record's ``bags``, else ``BAGS_JSON`` beside it)."""
    directory = Path(directory)
    record = read_record(directory / BAG_FOLDS_JSON, BAG_FOLDS) or {}
    return directory / str(record.get("bags") or BAGS_JSON)
