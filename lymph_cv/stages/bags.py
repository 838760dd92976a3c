"""Bags for multiple-instance learning (issue 15): the contract every MIL stage reads.

A *bag* is what gets one label and one decision: a patient (the lymphocytosis layout: a folder of
cell images plus a clinical CSV row), or, from the patch pipeline, an image (its windows), a case
(the windows of all its images) or a slide (its tiles).  An *instance* is one image the instance
encoder sees: a whole cell image, or a window (x, y, size, angle) cut from a parent image.

* :class:`Window` (x, y = column, row of the top-left pixel, 0-based; size; angle = degrees
  counter-clockwise, applied after cutting, as the patch step's rotations), :class:`Instance` (the
  image's path relative to :attr:`BagSet.root`, an optional window, and the patch file's name when
  the patch step wrote one), :class:`Bag` (id, label index, patient = the group no split may cut,
  instances, raw clinical values with None for a cell to impute), :class:`BagSet` (classes, bags,
  kind, root, the clinical feature names, and ``record``: how the set was built: source, CSV,
  columns, reference date, impute choice and the imputed cells, grid, seed).
* ``bags.json`` (:func:`write_bags`, :func:`read_bags`): the set as JSON.  A windowed image is
  stored as its size and grid (``{"path", "height", "width"}`` plus the bag's ``grid``:
  size, step, rotations) and its windows are re-derived on reading, in patch-number order, so
  the tutorial's 374 images × 1,376 windows stay a small file; whole-image instances are listed.
* :func:`load_bags` (the lymphocytosis layout), :func:`bags_from_patches` (a patch manifest,
  ``bag="image" | "case" | "slide"``).
* :class:`ClinicalScaler`: medians (for imputed cells), means and standard deviations fitted on
  the TRAINING bags of a split only; stored with the model (``to_json``), applied to any bag.
* :func:`instance_images`: a bag's instances as BGR uint8 arrays (each parent read once).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from lymph_cv.core.grid import window_origins
from lymph_cv.core.images import read_image
from lymph_cv.errors import ConfigError, FormatError, InputError
from lymph_cv.stages.patches import (DEFAULT_CASE_REGEX, ROTATIONS, Manifest, case_of, compile_case_regex,
                                     load_manifest)
from lymph_cv.stages.sources.patients import (BAG_CLASSES, FEATURES, REFERENCE_DATE, ClinicalColumns,
                                              scan_patients)
from lymph_cv.stages.tiles import read_tile_set
from lymph_cv.workdir.layout import BAGS_JSON, SYNTH_JSON, TILE_SET
from lymph_cv.workdir.records import BAGS, read_cache, read_record, write_record

log = logging.getLogger(__name__)

#: What a bag can be: a patient folder, or from the patch pipeline an image, a case or a slide.
BAG_KINDS = ("patient", "image", "case", "slide")
PATCH_BAG_KINDS = ("image", "case", "slide")
#: Version of the bags.json layout.
BAGS_VERSION = 1
#: The patch step's rotation that the default image bags keep (the issue's 1,376 windows an image).
DEFAULT_BAG_ROTATIONS = (0,)


@dataclass(frozen=True)
class Window:
    """A window within a parent image: top-left column x, row y (0-based), side, rotation (° CCW)."""

    x: int
    y: int
    size: int
    angle: int = 0


@dataclass(frozen=True)
class Instance:
    """One instance: its image file (relative to the set's root), where it lies, its patch file name.

    Without ``parent`` the pixels are ``window`` cut from ``path`` (the whole file when ``window`` is
    None); with ``parent`` (a slide tile) ``path`` is the instance's own file and ``window`` says where
    it lies in the parent, in the parent's level-0 pixels (for heatmaps).
    """

    path: str
    window: Optional[Window] = None
    patch: Optional[str] = None  # the patch step's file name (``<stem>_sub_<i>.tif``), when windowed
    parent: Optional[str] = None  # the slide file a tile was read from


@dataclass
class Bag:
    """One bag: id, label index, the patient it belongs to (splits keep a patient on one side),
    its instances, and raw clinical values (feature → value, None = to impute)."""

    id: str
    label: int
    patient: str
    instances: List[Instance]
    clinical: Dict[str, Optional[float]] = field(default_factory=dict)
    #: windowed image bags: the grid their windows follow ({"size", "step", "rotations"}) and the
    #: parent images' sizes, so bags.json stores them compactly.
    grid: Optional[dict] = None
    images: List[dict] = field(default_factory=list)


@dataclass
class BagSet:
    """Bags, their classes and kind, the folder instance paths are relative to, and how it was built."""

    classes: List[str]
    bags: List[Bag]
    kind: str
    root: str
    clinical_columns: List[str] = field(default_factory=list)  # feature names, in feature order
    record: dict = field(default_factory=dict)
    path: Optional[Path] = None

    def instance_path(self, instance: Instance) -> Path:
        """The instance's image file."""
        return Path(self.root) / instance.path

    def by_id(self) -> Dict[str, Bag]:
        return {bag.id: bag for bag in self.bags}

    def labels(self) -> np.ndarray:
        return np.array([bag.label for bag in self.bags], dtype=np.int64)

    def subset(self, ids: Iterable[str]) -> List[Bag]:
        """The bags of ``ids``, in that order; InputError for an id not in the set."""
        index = self.by_id()
        missing = [i for i in ids if i not in index]
        if missing:
            raise InputError(f"bag {missing[0]!r} is not in the bag set", self.path)
        return [index[i] for i in ids]

    def to_json(self) -> dict:
        return {"version": BAGS_VERSION, "kind": self.kind, "classes": self.classes, "root": self.root,
                "clinical_columns": self.clinical_columns, "record": self.record,
                "bags": [_bag_json(bag) for bag in self.bags]}

    @classmethod
    def from_json(cls, obj: dict, path: Optional[Path] = None) -> "BagSet":
        """Inverse of :meth:`to_json`; FormatError naming ``path`` when ``obj`` is not a bag set."""
        try:
            if obj["version"] != BAGS_VERSION:
                raise ValueError(f"version {obj['version']}, expected {BAGS_VERSION}")
            classes = [str(c) for c in obj["classes"]]
            bags = [_bag_from_json(b, len(classes)) for b in obj["bags"]]
            kind = str(obj["kind"])
            if kind not in BAG_KINDS:
                raise ValueError(f"kind {kind!r}")
            return cls(classes, bags, kind, str(obj["root"]), [str(c) for c in obj.get("clinical_columns", [])],
                       dict(obj.get("record") or {}), path)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise FormatError(f"not a bags.json written by lymph-cv ({type(exc).__name__}: {exc})", path) from exc


def _bag_json(bag: Bag) -> dict:
    out = {"id": bag.id, "label": bag.label, "patient": bag.patient, "clinical": bag.clinical}
    if bag.grid is not None:
        out.update(grid=bag.grid, images=bag.images)
    else:
        out["instances"] = [[i.path] if i.window is None else
                            [i.path, i.window.x, i.window.y, i.window.size, i.window.angle, i.patch, i.parent]
                            for i in bag.instances]
    return out


def _bag_from_json(obj: dict, n_classes: int) -> Bag:
    label = int(obj["label"])
    if not 0 <= label < n_classes:
        raise ValueError(f"bag {obj['id']!r}: label {label} outside 0-{n_classes - 1}")
    clinical = {str(k): (None if v is None else float(v)) for k, v in (obj.get("clinical") or {}).items()}
    if obj.get("grid") is not None:
        grid = dict(obj["grid"])
        images = [dict(i) for i in obj["images"]]
        instances = [inst for image in images for inst in grid_instances(
            str(image["path"]), int(image["height"]), int(image["width"]), int(grid["size"]), int(grid["step"]),
            [int(a) for a in grid["rotations"]])]
        return Bag(str(obj["id"]), label, str(obj["patient"]), instances, clinical, grid, images)
    instances = []
    for row in obj["instances"]:
        if len(row) == 1:
            instances.append(Instance(str(row[0])))
        else:
            patch, parent = (None if v is None else str(v) for v in row[5:7])
            instances.append(Instance(str(row[0]), Window(int(row[1]), int(row[2]), int(row[3]), int(row[4])),
                                      patch, parent))
    return Bag(str(obj["id"]), label, str(obj["patient"]), instances, clinical)


def write_bags(path: Union[str, os.PathLike], bags: BagSet) -> Path:
    """Write ``bags.json`` (a folder gets ``BAGS_JSON`` inside) atomically; returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / BAGS_JSON
    write_record(path, bags.to_json())
    bags.path = path
    return path


def read_bags(path: Union[str, os.PathLike]) -> BagSet:
    """Read ``bags.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / BAGS_JSON
    obj = read_record(path, BAGS, required=True, hint="the bags.json written by `lymph-cv bags make` (or `run --mil`)")
    return BagSet.from_json(obj, path)


# --------------------------------------------------------------------------- building


def load_bags(data_dir: Union[str, os.PathLike], *, clinical: Optional[Union[str, os.PathLike]] = None,
              classes: Sequence[str] = BAG_CLASSES, columns: ClinicalColumns = ClinicalColumns(),
              reference_date: dt.date = REFERENCE_DATE, impute: str = "none") -> BagSet:
    """The lymphocytosis layout ``DATA/<patient_id>/*.jpg|png|tif`` + clinical CSV → one bag per patient.

    Args:
        data_dir: one folder of cell images per patient.
        clinical: the clinical CSV (default: the one ``*.csv`` in ``data_dir``).
        classes: class names in label order (LABEL holds a name or an index).
        columns: the CSV's column names (None drops a clinical column).
        reference_date: ages are computed from dates of birth at this date (recorded).
        impute: ``"none"`` (a missing or malformed value is an error naming row and column) or
            ``"median"`` (left None and listed in the record; :class:`ClinicalScaler` fills it with
            the training bags' median).
    """
    scan = scan_patients(data_dir, classes, clinical=clinical, columns=columns,
                         reference_date=reference_date, impute=impute)
    root = Path(data_dir).resolve()
    bags = [Bag(p.id, p.label, p.id, [Instance(path.relative_to(Path(data_dir)).as_posix()) for path in p.images],
                dict(p.values)) for p in scan.patients]
    for cell in scan.imputed:
        log.warning("warning: %s row %d, column %s: %r imputed (median of the training bags)",
                    scan.csv_path, cell["row"], cell["column"], cell["value"])
    record = scan.record()
    record["clinical_csv"] = os.fspath(Path(scan.csv_path).resolve())
    synthetic = read_cache(Path(data_dir) / SYNTH_JSON)
    if synthetic is not None and synthetic.get("layout") == "bags":  # a synthetic set: its seed and parameters
        record["synth"] = {k: v for k, v in synthetic.items() if k != "truth"}
    return BagSet(list(classes), bags, "patient", os.fspath(root), list(columns.feature_columns()), record)


def grid_instances(path: str, height: int, width: int, size: int, step: int, rotations: Sequence[int],
                   all_rotations: Sequence[int] = ROTATIONS) -> List[Instance]:
    """The windows of one image in patch-number order (window by window, rotations in the patch step's
    order), keeping those at ``rotations``; patch names as the patch step writes them."""
    stem = Path(path).stem
    out = []
    for w, (row, col) in enumerate(window_origins(height, width, size, step).tolist()):
        for r, angle in enumerate(all_rotations):
            if angle in rotations:
                number = w * len(all_rotations) + r + 1
                out.append(Instance(path, Window(int(col), int(row), size, int(angle)), f"{stem}_sub_{number}.tif"))
    return out


def bags_from_patches(manifest: Union[Manifest, str, os.PathLike], bag: str = "image", *,
                      case_regex: str = DEFAULT_CASE_REGEX,
                      rotations: Sequence[int] = DEFAULT_BAG_ROTATIONS) -> BagSet:
    """Bags from the patch step's manifest: one per image (its windows), per case (the windows of all
    its images), or per slide (a tile manifest's slides: the manifest beside a ``tiles.json``).

    Every bag's patient is its case (``case_regex`` on the image stem), so a split by patient never
    puts two images of one case on opposite sides. ``rotations`` picks which of the patch step's
    rotations are instances (default 0° only: the 1,376 windows of a 1388×1040 image).
    """
    if bag not in PATCH_BAG_KINDS:
        raise ConfigError(f"--bag: unknown bag kind {bag!r}", valid=PATCH_BAG_KINDS)
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if manifest.path is not None and (Path(manifest.path).parent / TILE_SET).is_file():
        return bags_from_tiles(Path(manifest.path).parent, "case" if bag == "case" else "slide")
    if bag == "slide":
        raise ConfigError("--bag slide: the manifest lists images, not slide tiles; slide bags need the tile "
                          "manifest of `lymph-cv slides tile` (or use --bag image or --bag case)", manifest.path)
    case_regex = compile_case_regex(case_regex)
    bad = [a for a in rotations if a not in ROTATIONS]
    if bad or not rotations:
        raise ConfigError(f"--rotations: {list(rotations)} must be some of the patch step's {list(ROTATIONS)}")
    if manifest.data_dir is None:
        raise InputError("the manifest records no data folder (data_dir); rerun `lymph-cv patches`", manifest.path)
    grid = {"size": manifest.patch_size, "step": manifest.step, "rotations": list(rotations)}
    grouped: Dict[str, List] = defaultdict(list)
    for image in manifest.images:
        case = case_of(image.stem, case_regex)
        grouped[image.parent_name if bag == "image" else case].append((case, image))
    bags = []
    for ident, members in grouped.items():
        labels = {image.label for _, image in members}
        if len(labels) > 1:
            names = sorted({image.cls for _, image in members})
            raise InputError(f"case {ident!r} has images of several classes ({', '.join(names)}); "
                             "a case bag needs one label (use --bag image)", manifest.path)
        images = [{"path": image.parent_name, "height": image.height, "width": image.width} for _, image in members]
        instances = [inst for info in images for inst in grid_instances(
            info["path"], info["height"], info["width"], grid["size"], grid["step"], rotations)]
        bags.append(Bag(ident, members[0][1].label, members[0][0], instances, {}, dict(grid), images))
    record = {"source": "patches", "manifest": None if manifest.path is None else os.fspath(Path(manifest.path).resolve()),
              "bag": bag, "case_regex": case_regex, "grid": grid}
    return BagSet(list(manifest.classes), bags, bag, manifest.data_dir, [], record)


def bags_from_tiles(folder: Union[str, os.PathLike], bag: str = "slide") -> BagSet:
    """Bags from a tiling folder (``tiles.json`` + tile files): one per slide (its tiles), or per case
    (the tiles of all its slides).  Instances are the tile files; their windows locate them in the slide."""
    if bag not in ("slide", "case"):
        raise ConfigError(f"--bag: tile bags are per slide or per case, got {bag!r}", valid=("slide", "case"))
    folder = Path(folder)
    if folder.is_file():  # its tiles.json
        folder = folder.parent
    tile_set = read_tile_set(folder)
    if tile_set.db_backend is not None:
        raise ConfigError(f"the tiles were written to {tile_set.db_backend} databases, not files; slide bags read "
                          "tile files (tile again without --db)", folder)
    grouped: Dict[str, List] = defaultdict(list)
    for slide in tile_set.slides:
        grouped[slide.slide if bag == "slide" else slide.case].append(slide)
    by_slide: Dict[str, List] = defaultdict(list)
    for tile in tile_set.tiles:
        by_slide[tile.slide].append(tile)
    bags = []
    for ident, slides in grouped.items():
        if len({s.label for s in slides}) > 1:
            raise InputError(f"case {ident!r} has slides of several classes; a case bag needs one label "
                             "(use --bag slide)", folder)
        instances = [Instance(tile.name, Window(tile.x, tile.y, tile.extent, 0), tile.name, s.path)
                     for s in slides for tile in by_slide[s.slide]]
        if not instances:
            log.warning("warning: %s: no tiles kept, left out of the bags", ident)
            continue
        bags.append(Bag(ident, slides[0].label, slides[0].case, instances))
    record = {"source": "tiles", "tiles": os.fspath(folder.resolve() / TILE_SET), "bag": bag,
              "tile_params": tile_set.params.to_json()}
    return BagSet(list(tile_set.classes), bags, bag, os.fspath(folder.resolve()), [], record)


# --------------------------------------------------------------------------- clinical features


@dataclass
class ClinicalScaler:
    """Standardisation of the clinical features, fitted on training bags: (value − mean) / sd, a
    missing value first filled with the training median. Stored with the model (``to_json``)."""

    columns: List[str]
    median: List[float]
    mean: List[float]
    sd: List[float]

    @classmethod
    def fit(cls, bags: Sequence[Bag], columns: Sequence[str]) -> "ClinicalScaler":
        """Fit on ``bags`` (the training side of a split only); InputError when a column has no value."""
        medians, means, sds = [], [], []
        for column in columns:
            values = np.array([b.clinical.get(column) for b in bags if b.clinical.get(column) is not None], float)
            if values.size == 0:
                raise InputError(f"clinical column {column!r}: no training bag has a value to fit on")
            median = float(np.median(values))
            filled = np.array([median if b.clinical.get(column) is None else b.clinical[column] for b in bags], float)
            sd = float(filled.std())
            medians.append(median)
            means.append(float(filled.mean()))
            sds.append(sd if sd > 0 else 1.0)  # a constant column carries no information: leave it at 0
        return cls(list(columns), medians, means, sds)

    def transform(self, bags: Sequence[Bag]) -> np.ndarray:
        """(len(bags), len(columns)) float32 standardised features."""
        out = np.empty((len(bags), len(self.columns)), np.float32)
        for i, bag in enumerate(bags):
            for j, column in enumerate(self.columns):
                value = bag.clinical.get(column)
                out[i, j] = ((self.median[j] if value is None else value) - self.mean[j]) / self.sd[j]
        return out

    def to_json(self) -> dict:
        return {"columns": self.columns, "median": self.median, "mean": self.mean, "sd": self.sd}

    @classmethod
    def from_json(cls, obj: dict) -> "ClinicalScaler":
        try:
            scaler = cls([str(c) for c in obj["columns"]], *[[float(v) for v in obj[k]] for k in ("median", "mean", "sd")])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"not a clinical scaler record ({type(exc).__name__}: {exc})") from exc
        if not len(scaler.columns) == len(scaler.median) == len(scaler.mean) == len(scaler.sd):
            raise FormatError("not a clinical scaler record (columns and statistics differ in length)")
        return scaler


def clinical_features(train: Sequence[Bag], bags: Sequence[Bag], columns: Sequence[str] = FEATURES
                      ) -> tuple[np.ndarray, ClinicalScaler]:
    """``bags``' standardised clinical features with the scaler fitted on ``train`` (store the scaler)."""
    scaler = ClinicalScaler.fit(train, columns)
    return scaler.transform(bags), scaler


# --------------------------------------------------------------------------- pixels


def cut_window(image: np.ndarray, window: Window) -> np.ndarray:
    """The window of an (H, W, C) image, rotated as the patch step rotates (np.rot90, counter-clockwise)."""
    patch = image[window.y: window.y + window.size, window.x: window.x + window.size]
    if patch.shape[:2] != (window.size, window.size):
        raise InputError(f"window at x={window.x}, y={window.y}, size {window.size} lies outside the "
                         f"{image.shape[1]}x{image.shape[0]} image")
    if window.angle % 90:
        raise ConfigError(f"window angle {window.angle}: only multiples of 90 degrees are supported")
    turns = (window.angle // 90) % 4
    return np.ascontiguousarray(np.rot90(patch, turns, axes=(0, 1))) if turns else patch


def instance_images(bags: BagSet, bag: Bag, indices: Optional[Sequence[int]] = None) -> List[np.ndarray]:
    """The BGR uint8 pixels of a bag's instances (all, or those at ``indices``), each parent read once."""
    chosen = bag.instances if indices is None else [bag.instances[i] for i in indices]
    parents: Dict[str, np.ndarray] = {}
    out = []
    for instance in chosen:
        if instance.parent is not None:  # a tile: its own file, the window only locates it
            out.append(read_image(bags.instance_path(instance)).bgr)
            continue
        if instance.path not in parents:
            parents[instance.path] = read_image(bags.instance_path(instance)).bgr
        image = parents[instance.path]
        out.append(image if instance.window is None else cut_window(image, instance.window))
    return out
