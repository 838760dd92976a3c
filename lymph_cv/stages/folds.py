"""Step 2: k-fold train/test lists (patch lists and parent lists), the published split, leak checks.
Per fold K the tutorial's four files: ``train_w32_K.txt`` / ``test_w32_K.txt`` with one
``<patch file><TAB><label>`` per line, and ``train_w32_parent_K.txt`` / ``test_w32_parent_K.txt``
with one ``CLASS/file.tif`` per line; plus ``folds.json`` with the parameters.

The split mirrors Matlab's ``crossvalind('Kfold', N, k)`` applied class by class: within each
class the groups (images, or cases with ``group_by="case"``) are taken in name order, permuted
with a generator seeded by ``(seed, class index)``, and the j-th group of the permutation goes
to test fold ``j mod k + 1``.  Every class is therefore spread over all folds, fold sizes per
class differ by at most one group, and the result depends only on the seed and the names.
Lines are written in the tutorial's order: class by class, image by image (name order), each
image's patches in number order.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from lymph_cv.errors import ConfigError, FormatError, InputError
from lymph_cv.core.fsutil import atomic_write_json, atomic_write_text, make_dirs
from lymph_cv.stages.synth import read_case_sites
from lymph_cv.stages.patches import DEFAULT_CASE_REGEX, ImageEntry, Manifest, case_of, compile_case_regex, load_manifest
from lymph_cv.workdir.layout import (BAG_FOLDS_JSON, BAG_TEST_LIST, BAG_TRAIN_LIST, FOLDS_JSON, LIST_PATTERN,
                                     MANIFEST_NAME, PARENT_PATTERN, PATCH_DIR, TEST_LIST, TEST_PARENT, TRAIN_LIST,
                                     TRAIN_PARENT)
from lymph_cv.workdir.records import BAG_FOLDS, FOLDS, read_record
from lymph_cv.workdir.lists import (bag_list_folds, list_folds, parent_list_folds,  # noqa: F401 - list_folds: the folds' API
                                    read_labelled_list, read_list_lines)
from lymph_cv.stages.stage import PatchPipelineStage, RunOptions

log = logging.getLogger(__name__)

GROUP_BY = ("image", "case", "site")
DEFAULT_K = 5
_LABEL_PATTERN = re.compile(rb"\s(-?\d+)\r?\n")


@dataclass
class Fold:
    """One train/test split (``index`` counts from 1, as in the file names)."""

    index: int
    train: list[ImageEntry]
    test: list[ImageEntry]


@dataclass
class FoldSet:
    """The k folds and how they were made."""

    folds: list[Fold]
    classes: list[str]
    k: int
    seed: Optional[int]
    group_by: str
    case_regex: str
    source: str  # "crossvalind", "sites" or the parent-list folder
    out_dir: Optional[Path] = None
    #: with group_by "site": the site each fold holds out (fold K tests on held_out[K-1]).
    held_out: Optional[list[str]] = None

    def to_json(self) -> dict:
        return {
            "k": self.k,
            "seed": self.seed,
            "group_by": self.group_by,
            "case_regex": self.case_regex,
            "source": self.source,
            "classes": self.classes,
            "folds": [
                {
                    "fold": f.index,
                    "train_images": len(f.train),
                    "test_images": len(f.test),
                    "train_patches": sum(e.patches for e in f.train),
                    "test_patches": sum(e.patches for e in f.test),
                    **({} if self.held_out is None else {"test_site": self.held_out[f.index - 1]}),
                }
                for f in self.folds
            ],
        }


def _as_manifest(manifest: Union[Manifest, str, os.PathLike]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


def _case(image: ImageEntry, case_regex: str) -> str:
    """The image's case: the manifest's (a slide CSV's case column) under the default regex, else the regex's."""
    return image.case if case_regex == DEFAULT_CASE_REGEX else case_of(image.stem, case_regex)


def assign_folds(count: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """crossvalind('Kfold')-style fold numbers (1..k) for ``count`` groups of one class."""
    folds = np.empty(count, dtype=np.int64)
    folds[rng.permutation(count)] = np.arange(count) % k + 1
    return folds


def make_folds(
    manifest: Union[Manifest, str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    k: int = DEFAULT_K,
    seed: int = 0,
    group_by: str = "image",
    case_regex: str = DEFAULT_CASE_REGEX,
) -> FoldSet:
    """Split the manifest's images into ``k`` folds class by class and write the lists to ``out_dir``.

    Args:
        manifest: a :class:`Manifest` or the path of ``manifest.json`` (or its folder).
        out_dir: the work folder; gets the four lists per fold and ``folds.json``.
        k: number of folds (at least 2).
        seed: seeds the per-class permutations (recorded in ``folds.json``).
        group_by: ``"image"`` (the tutorial: each image its own patient) or ``"case"`` (all
            images of a case on the same side, so no patient leaks between train and test).
        case_regex: how to get the case id from an image stem (group ``case`` or the first).
    """
    if k < 2:
        raise ConfigError(f"--k must be at least 2, got {k}")
    if seed < 0:  # numpy's generators take non-negative seeds only
        raise ConfigError(f"--seed: must be a non-negative integer, got {seed}")
    if group_by not in GROUP_BY:
        raise ConfigError(f"unknown --group-by {group_by!r}", valid=GROUP_BY)
    case_regex = compile_case_regex(case_regex)
    manifest = _as_manifest(manifest)
    if group_by == "site":
        return make_site_folds(manifest, out_dir, case_regex=case_regex, k=k)
    fold_of: dict[str, int] = {}
    keys_of = {}
    for name, images in manifest.by_class().items():
        keys_of[name] = [image.name if group_by == "image" else _case(image, case_regex) for image in images]
    most_groups = max((len(set(keys)) for keys in keys_of.values()), default=0)
    if most_groups < k:
        # crossvalind numbers a class's groups 1, 2, …: fold k would have no test image at all
        # (and its databases nothing to hold), so refuse before writing any list.
        raise ConfigError(f"--k: {k} folds need at least {k} {group_by}s in some class, the largest class has "
                          f"{most_groups} (use --k {most_groups} or less)" if most_groups >= 2 else
                          f"--k: every class has a single {group_by}; at least 2 are needed for a train/test split")
    for label, (name, images) in enumerate(manifest.by_class().items()):
        keys = keys_of[name]
        groups = sorted(set(keys))
        if len(groups) < k:
            log.warning("warning: class %s has %d %s(s), fewer than %d folds: some test folds lack it",
                        name, len(groups), group_by, k)
        numbers = assign_folds(len(groups), k, np.random.default_rng([seed, label]))
        group_fold = dict(zip(groups, numbers.tolist()))
        for image, key in zip(images, keys):
            fold_of[image.parent_name] = group_fold[key]
    folds = [
        Fold(
            index,
            [e for e in manifest.images if fold_of[e.parent_name] != index],
            [e for e in manifest.images if fold_of[e.parent_name] == index],
        )
        for index in range(1, k + 1)
    ]
    fold_set = FoldSet(folds, list(manifest.classes), k, seed, group_by, case_regex, "crossvalind")
    write_folds(fold_set, manifest, out_dir)
    return fold_set


def image_sites(manifest: Manifest, case_regex: str = DEFAULT_CASE_REGEX,
                sites: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Site of every image (``CLASS/file``): ``sites`` (case → site), else the data set's ``synth.json``."""
    if sites is None:
        sites = read_case_sites(manifest.data_dir) if manifest.data_dir else None
    if not sites:
        raise InputError("--by-site: no sites recorded for these images (synth.json's case_sites, "
                         "written by `lymph-cv synth --sites N`)", manifest.data_dir or manifest.path)
    found = {}
    for image in manifest.images:
        case = case_of(image.stem, case_regex)
        if case not in sites:
            raise InputError(f"--by-site: case {case!r} of {image.parent_name} has no site in synth.json",
                             manifest.data_dir)
        found[image.parent_name] = sites[case]
    return found


def make_site_folds(
    manifest: Union[Manifest, str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    case_regex: str = DEFAULT_CASE_REGEX,
    sites: Optional[dict[str, str]] = None,
    k: Optional[int] = None,
) -> FoldSet:
    """One fold per site, in site-name order: fold K tests on every image of site K, trains on the others.

    Whole sites are held out, so a model is always tested on a staining it never saw in training
    (the situation of a new lab). ``sites`` maps case → site (default: the set's ``synth.json``);
    ``k``, when given, must be the number of sites.
    """
    manifest = _as_manifest(manifest)
    site_of = image_sites(manifest, case_regex, sites)
    names = sorted(set(site_of.values()))
    if len(names) < 2:
        raise ConfigError(f"--by-site: at least 2 sites are needed, the images come from {len(names)} ({names[0]})")
    if k is not None and k != len(names):
        raise ConfigError(f"--k: the images come from {len(names)} sites, one fold each; use --k {len(names)}")
    folds = [Fold(index, [e for e in manifest.images if site_of[e.parent_name] != site],
                  [e for e in manifest.images if site_of[e.parent_name] == site])
             for index, site in enumerate(names, start=1)]
    fold_set = FoldSet(folds, list(manifest.classes), len(names), None, "site", case_regex, "sites", held_out=names)
    write_folds(fold_set, manifest, out_dir)
    return fold_set


def _resolve_parent(line: str, number: int, path: Path, by_name: dict[str, ImageEntry]) -> ImageEntry:
    if "/" not in line:
        raise InputError(f"line {number}: {line!r} is not CLASS/file.tif", path)
    entry = by_name.get(line) or by_name.get(line + ".tif")
    if entry is None:
        stem_key = line.rsplit(".", 1)[0] if line.lower().endswith((".tif", ".tiff")) else line
        entry = by_name.get(stem_key)
    if entry is None:
        raise InputError(f"line {number}: {line!r} is not an image of the manifest", path)
    return entry


def folds_from_parent_lists(
    manifest: Union[Manifest, str, os.PathLike],
    parent_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
) -> FoldSet:
    """Reproduce a published split: folds from ``train/test_w32_parent_K.txt`` in ``parent_dir``.

    The parent lists are written back unchanged in content and order (one ``CLASS/file.tif``
    per line), and the patch lists follow the parent lists' image order.
    """
    manifest = _as_manifest(manifest)
    parent_dir = Path(parent_dir)
    by_name: dict[str, ImageEntry] = {}
    for entry in manifest.images:
        by_name[entry.parent_name] = entry
        by_name[f"{entry.cls}/{entry.stem}"] = entry
    folds = []
    for index in parent_list_folds(parent_dir):
        sides = []
        for template in (TRAIN_PARENT, TEST_PARENT):
            path = parent_dir / template.format(fold=index)
            sides.append([_resolve_parent(line, n, path, by_name) for n, line in enumerate(read_list_lines(path), 1)])
        train, test = sides
        both = {e.parent_name for e in train} & {e.parent_name for e in test}
        if both:
            raise InputError(f"fold {index}: {sorted(both)[0]} is in both the train and the test parent list", parent_dir)
        folds.append(Fold(index, train, test))
    fold_set = FoldSet(folds, list(manifest.classes), len(folds), None, "image", DEFAULT_CASE_REGEX,
                       os.fspath(parent_dir.resolve()))
    write_folds(fold_set, manifest, out_dir)
    return fold_set


def _list_root(manifest: Manifest, out_dir: Path) -> tuple[str, str]:
    """(prefix of the patch names in the lists, the folder they are relative to).

    Names are relative to the work folder (``subs/…``, so the tutorial's ``./`` root works)
    when the patch folder lies inside it; otherwise plain names relative to the patch folder
    (names may not climb out of their root with ``..``).
    """
    if manifest.path is None:
        return "", "."
    patch_dir, out = manifest.path.parent.resolve(), out_dir.resolve()
    if not patch_dir.is_relative_to(out):
        return "", os.fspath(patch_dir)
    relative = patch_dir.relative_to(out).as_posix()
    return ("" if relative == "." else relative + "/"), "."


def _write_if_changed(path: Path, text: str) -> None:
    """Write atomically unless the file already holds ``text`` (a same-seed rerun keeps the
    lists' dates, so databases built from them are still recognised as current)."""
    data = text.encode("utf-8")
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write_text(path, text)


def _remove_other_folds(out: Path, keep: set) -> None:
    """Delete the lists of folds an earlier run with a larger k wrote (``dbs`` and ``render``
    take every fold with lists, so a stale fold 5 next to a new 4-fold split would be built)."""
    for name in sorted(os.listdir(out)):
        match = LIST_PATTERN.match(name) or PARENT_PATTERN.match(name)
        if match and int(match.group(2)) not in keep:
            (out / name).unlink()
            log.info("folds: removed %s (not a fold of this split)", out / name)


def write_folds(fold_set: FoldSet, manifest: Manifest, out_dir: Union[str, os.PathLike]) -> None:
    """Write the four lists of every fold and ``folds.json`` (each file atomically)."""
    out = Path(out_dir)
    make_dirs(out)
    prefix, list_root = _list_root(manifest, out)
    lines_of: dict[str, str] = {}
    for entry in manifest.images:
        lines_of[entry.parent_name] = "".join(f"{prefix}{name}\t{entry.label}\n" for name in entry.patch_names())
    for fold in fold_set.folds:
        for side, patch_template, parent_template in (
            (fold.train, TRAIN_LIST, TRAIN_PARENT),
            (fold.test, TEST_LIST, TEST_PARENT),
        ):
            _write_if_changed(out / patch_template.format(fold=fold.index), "".join(lines_of[e.parent_name] for e in side))
            _write_if_changed(out / parent_template.format(fold=fold.index), "".join(f"{e.parent_name}\n" for e in side))
    if (out / FOLDS_JSON).is_file():  # only in a folder an earlier `folds` wrote (never other lists)
        _remove_other_folds(out, {fold.index for fold in fold_set.folds})
    record = fold_set.to_json()
    if manifest.path is not None:
        # Where the images and patch sizes are recorded, for building DBs straight from images.
        record["manifest"] = os.path.relpath(manifest.path.resolve(), out.resolve()).replace(os.sep, "/")
    record["data_dir"] = manifest.data_dir
    record["list_root"] = list_root  # the folder the patch lists' names are relative to
    atomic_write_json(out / FOLDS_JSON, record)
    fold_set.out_dir = out
    log.info("folds: %d folds (%s) written to %s", fold_set.k, fold_set.group_by, out)


# --------------------------------------------------------------------------- checking


@dataclass
class FoldCheck:
    """What ``folds check`` finds for one fold."""

    index: int
    train_images: Counter  # class → images
    test_images: Counter
    train_patches: Optional[Counter]  # label → patches (None when the patch list is absent)
    test_patches: Optional[Counter]
    leaked_cases: list[str]  # cases with images on both sides
    leaked_images: list[str]  # images on both sides (never acceptable)


@dataclass
class CheckReport:
    """Per-fold leaks and class balance, plus images never tested / tested twice."""

    folds: list[FoldCheck]
    classes: list[str]
    case_regex: str
    untested: list[str] = field(default_factory=list)
    tested_twice: list[str] = field(default_factory=list)
    #: what the sides hold and what must not be cut: images and cases, or (bag splits) bags and patients.
    unit: str = "image"
    group: str = "case"

    @property
    def leaks(self) -> bool:
        return any(f.leaked_cases or f.leaked_images for f in self.folds)


def _count_labels(path: Path) -> Optional[Counter]:
    if not path.is_file():
        return None
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    labels = _LABEL_PATTERN.findall(data)
    if len(labels) != data.count(b"\n"):
        # blank lines, or one that is not `<file> <label>`: the list reader skips the former and names the latter
        return Counter(entry.label for entry in read_labelled_list(path))
    return Counter(int(m) for m in labels)


def _cases(parent_lines: Sequence[str], regex: str) -> set[str]:
    return {case_of(Path(line.split("/", 1)[1]).stem, regex) for line in parent_lines}


def check_folds(directory: Union[str, os.PathLike], case_regex: Optional[str] = None) -> CheckReport:
    """Check the folds in ``directory``: cases on both sides of a fold, class balance, coverage.

    The parent lists say which image is on which side; the case of an image is its stem
    matched by ``case_regex`` (default: the one in ``folds.json``, else ``<case>_NNN``).
    Class balance counts images per class from the parent lists and patches per label from
    the patch lists when present.
    """
    directory = Path(directory)
    record = read_record(directory / FOLDS_JSON, FOLDS) or {}
    if case_regex:
        regex = compile_case_regex(case_regex)
    else:
        try:
            regex = compile_case_regex(record.get("case_regex") or DEFAULT_CASE_REGEX)
        except ConfigError as exc:
            raise FormatError(f"case_regex: {exc.detail.split(': ', 1)[1]}", directory / FOLDS_JSON) from None
    checks = []
    tested: Counter = Counter()
    everything: set[str] = set()
    class_names: list[str] = list(record.get("classes") or [])
    for index in parent_list_folds(directory):
        sides = []
        for template in (TRAIN_PARENT, TEST_PARENT):
            path = directory / template.format(fold=index)
            lines = read_list_lines(path)
            for n, line in enumerate(lines, 1):
                if "/" not in line:
                    raise InputError(f"line {n}: {line!r} is not CLASS/file.tif", path)
            sides.append(lines)
        train, test = sides
        everything.update(train, test)
        tested.update(test)
        leaked_cases = sorted(_cases(train, regex) & _cases(test, regex))
        leaked_images = sorted(set(train) & set(test))
        for line in train + test:
            cls = line.split("/", 1)[0]
            if cls not in class_names:
                class_names.append(cls)
        checks.append(FoldCheck(
            index,
            Counter(x.split("/", 1)[0] for x in train),
            Counter(x.split("/", 1)[0] for x in test),
            _count_labels(directory / TRAIN_LIST.format(fold=index)),
            _count_labels(directory / TEST_LIST.format(fold=index)),
            leaked_cases,
            leaked_images,
        ))
    return CheckReport(
        checks, class_names, regex,
        untested=sorted(everything - set(tested)),
        tested_twice=sorted(x for x, n in tested.items() if n > 1),
    )


def check_bag_folds(directory: Union[str, os.PathLike]) -> CheckReport:
    """Check the bag splits in ``directory`` (``bag_folds.json`` + ``bags_train/test_K.txt``): patients
    and bags on both sides of a split, bags per class; for k-fold splits also bags never or twice tested
    (repeated random splits test each bag in about half of them)."""
    directory = Path(directory)
    record = read_record(directory / BAG_FOLDS_JSON, BAG_FOLDS, required=True,
                         hint="the bag_folds.json written by `lymph-cv bags split`")
    classes = [str(c) for c in record["classes"]]
    patients = {str(k): str(v) for k, v in (record.get("patients") or {}).items()}
    checks = []
    tested: Counter = Counter()
    everything: set[str] = set()
    for index in bag_list_folds(directory):
        train, test = (read_labelled_list(directory / t.format(fold=index)) for t in (BAG_TRAIN_LIST, BAG_TEST_LIST))
        for entry in train + test:
            if not 0 <= entry.label < len(classes):
                raise InputError(f"line {entry.line}: label {entry.label} is not a class of bag_folds.json "
                                 f"({', '.join(classes)})", directory / BAG_TRAIN_LIST.format(fold=index))
        train_ids, test_ids = [e.name for e in train], [e.name for e in test]
        everything.update(train_ids, test_ids)
        tested.update(test_ids)
        checks.append(FoldCheck(
            index, Counter(classes[e.label] for e in train), Counter(classes[e.label] for e in test), None, None,
            sorted({patients.get(i, i) for i in train_ids} & {patients.get(i, i) for i in test_ids}),
            sorted(set(train_ids) & set(test_ids))))
    if not checks:
        raise InputError("no bags_train_K.txt / bags_test_K.txt lists (run `lymph-cv bags split`)", directory)
    kfold = record.get("method") == "kfold"
    return CheckReport(checks, classes, f"{record.get('method')}, by {record.get('group_by') or 'patient'}",
                       untested=sorted(everything - set(tested)) if kfold else [],
                       tested_twice=sorted(x for x, n in tested.items() if n > 1) if kfold else [],
                       unit="bag", group="patient")


def check_directory(directory: Union[str, os.PathLike], case_regex: Optional[str] = None) -> list[CheckReport]:
    """``folds check``: the patch folds (when there are parent lists, or no bag splits) and the bag splits
    (when there is a ``bag_folds.json``)."""
    directory = Path(directory)
    has_bags = (directory / BAG_FOLDS_JSON).is_file()
    has_parents = directory.is_dir() and any(PARENT_PATTERN.match(name) for name in os.listdir(directory))
    reports = [check_folds(directory, case_regex)] if has_parents or not has_bags else []
    return reports + ([check_bag_folds(directory)] if has_bags else [])


def format_check(report: CheckReport) -> str:
    """The check as a plain-text table, one fold per line, then the leaks."""
    unit, group = report.unit, report.group
    table = [["fold", "counts", *[f"{c} train/test" for c in report.classes], f"{group}s on both sides"]]
    for fold in report.folds:
        table.append([str(fold.index), f"{unit}s",
                      *[f"{fold.train_images[c]}/{fold.test_images[c]}" for c in report.classes],
                      str(len(fold.leaked_cases))])
        if fold.train_patches is not None and fold.test_patches is not None:
            table.append(["", "patches",
                          *[f"{fold.train_patches[k]}/{fold.test_patches[k]}" for k in range(len(report.classes))], ""])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [f"case id regex: {report.case_regex}" if unit == "image" else f"bag splits ({report.case_regex})"]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    for fold in report.folds:
        if fold.leaked_cases:
            lines.append(f"fold {fold.index}: {len(fold.leaked_cases)} {group}(s) on both sides: {', '.join(fold.leaked_cases)}")
        if fold.leaked_images:
            lines.append(f"fold {fold.index}: {len(fold.leaked_images)} {unit}(s) on both sides: {', '.join(fold.leaked_images)}")
    if report.untested:
        lines.append(f"{len(report.untested)} {unit}(s) in no test fold, e.g. {report.untested[0]}")
    if report.tested_twice:
        lines.append(f"{len(report.tested_twice)} {unit}(s) in several test folds, e.g. {report.tested_twice[0]}")
    lines.append("leaks: " + ("yes" if report.leaks else "none"))
    return "\n".join(lines)


def describe(fold_set: FoldSet) -> str:
    """One line per fold: images and patches on each side."""
    rows = []
    for f in fold_set.folds:
        rows.append(
            f"fold {f.index}: train {len(f.train)} images / {sum(e.patches for e in f.train)} patches, "
            f"test {len(f.test)} images / {sum(e.patches for e in f.test)} patches"
            + ("" if fold_set.held_out is None else f" (held-out site: {fold_set.held_out[f.index - 1]})")
        )
    return "\n".join(rows)


class FoldsStage(PatchPipelineStage):
    """Step 2: the k folds' patch and parent lists (and ``folds.json``)."""

    name = "folds"
    reads = (f"{PATCH_DIR}/{MANIFEST_NAME}",)
    writes = (TRAIN_LIST, TEST_LIST, TRAIN_PARENT, TEST_PARENT, FOLDS_JSON)

    def params(self, o: RunOptions) -> dict:
        return {"k": o.k, "seed": o.seed, "group_by": o.group_by}

    def complete(self, o: RunOptions) -> bool:
        return set(o.fold_list) <= set(list_folds(o.workdir))

    def run(self, o: RunOptions, fresh: bool) -> None:
        fold_set = make_folds(Path(o.workdir) / PATCH_DIR / MANIFEST_NAME, o.workdir, k=o.k, seed=o.seed,
                              group_by=o.group_by)
        log.info("%s", describe(fold_set))


STAGE = FoldsStage()
