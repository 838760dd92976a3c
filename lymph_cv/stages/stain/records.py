"""Fitting a stain target on one or many images, and the JSON record that carries it to later stages."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from lymph_cv.core.fsutil import atomic_write_json
from lymph_cv.core.images import read_image
from lymph_cv.errors import ConfigError, FormatError, InputError, naming
from lymph_cv.workdir.layout import FOLD_STAIN_RECORD, FOLDS_JSON, MANIFEST_NAME, PATCH_DIR, STAIN_RECORD
from lymph_cv.stages.stain.registry import StainTransform, get_normaliser

log = logging.getLogger(__name__)

#: ``format`` field of a record (tells it apart from any other JSON).
RECORD_FORMAT = "lymph-cv stain target"
RECORD_VERSION = 1
TARGET_SUFFIX = ".json"


@dataclass(frozen=True)
class StainRecord:
    """A fitted method and where its target came from."""

    transform: StainTransform
    fitted_on: list[str] = field(default_factory=list)
    #: images that held too little tissue to measure (left out of the medians).
    unusable: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.transform.method

    def to_json(self) -> dict:
        return {"format": RECORD_FORMAT, "version": RECORD_VERSION, **self.transform.to_json(),
                "fitted_on": list(self.fitted_on), "images": len(self.fitted_on), "unusable": list(self.unusable)}


def read_bgr(path: Union[str, os.PathLike]) -> np.ndarray:
    """An image file as 8-bit BGR through the one image reader (a one-level Aperio SVS included)."""
    return read_image(path).bgr


def fit_images(images: Iterable[tuple[str, np.ndarray]], method: str, params: Optional[Mapping[str, Any]] = None) -> StainRecord:
    """Fit ``method`` on (name, BGR image) pairs: the medians of the usable images' statistics."""
    normaliser = get_normaliser(method, **dict(params or {}))
    stats, used, unusable = [], [], []
    for name, bgr in images:
        measured = normaliser.statistics(bgr)
        if measured is None:
            log.warning("warning: stain fit: %s holds too little tissue; left out of the target", name)
            unusable.append(name)
            continue
        stats.append(measured)
        used.append(name)
    if not stats:
        raise InputError(f"stain fit: none of the {len(unusable)} image(s) holds enough tissue to fit {method}"
                         + (f" (first: {unusable[0]})" if unusable else ""))
    target = normaliser.combine(stats)
    return StainRecord(StainTransform(method, dict(normaliser.params), target), used, unusable)


def fit_record(paths: Sequence[Union[str, os.PathLike]], method: str, params: Optional[Mapping[str, Any]] = None) -> StainRecord:
    """Fit ``method`` on image files (read one at a time)."""
    if not paths:
        raise ConfigError("stain fit: no images given")
    return fit_images(((os.fspath(p), read_bgr(p)) for p in paths), method, params)


def write_record(path: Union[str, os.PathLike], record: StainRecord, **extra: Any) -> Path:
    """Write the record (plus ``extra`` fields, e.g. the images left unchanged) atomically; returns its path."""
    atomic_write_json(path, {**record.to_json(), **extra})
    return Path(path)


def read_record(path: Union[str, os.PathLike], method: Optional[str] = None) -> StainRecord:
    """A record written by :func:`write_record`; ConfigError when ``method`` is given and differs."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("no such stain target (expected a JSON record from `lymph-cv stain fit`)", path) from None
    except (OSError, ValueError) as exc:
        raise FormatError(f"cannot read as JSON ({exc})", path) from None
    if not isinstance(obj, dict) or obj.get("format") != RECORD_FORMAT:
        raise FormatError(f"not a stain target record (expected \"format\": \"{RECORD_FORMAT}\")", path)
    found = obj.get("method")
    if method is not None and found != method:
        raise ConfigError(f"--stain {method}: this target was fitted for {found!r}", path)
    params = obj.get("params")
    if not isinstance(params, dict):
        raise FormatError("stain target record without its \"params\" object", path)
    try:
        normaliser = get_normaliser(str(found), **params)
    except ConfigError as exc:  # the record's parameters: its file is what to fix
        naming(exc, path)
        raise
    target = normaliser.check_target(obj.get("target") or {}, os.fspath(path))
    return StainRecord(StainTransform(str(found), dict(normaliser.params), target),
                       list(obj.get("fitted_on", [])), list(obj.get("unusable", [])))


def resolve_target(spec: Union[str, os.PathLike], method: str, params: Optional[Mapping[str, Any]] = None) -> StainRecord:
    """``--stain-target``: a record (``.json``, its method must match) or an image to fit on."""
    spec = Path(spec)
    if spec.suffix.lower() == TARGET_SUFFIX:
        record = read_record(spec, method)
        if params and any(record.transform.params.get(k) != v for k, v in params.items()):
            raise ConfigError(f"--stain-target: fitted with {record.transform.params}, asked for {dict(params)}", spec)
        return record
    return fit_record([spec], method, params)


def recorded_stain_path(workdir: Union[str, os.PathLike], fold: int) -> Optional[Path]:
    """The stain record a work directory holds for ``fold``: ``stain_K.json`` (written by ``dbs``),
    else the patch folder's ``stain.json`` (written by ``patches --stain``), else None."""
    workdir = Path(workdir)
    per_fold = workdir / FOLD_STAIN_RECORD.format(fold=fold)
    if per_fold.is_file():
        return per_fold
    patch_dir = workdir / PATCH_DIR
    try:
        manifest = json.loads((workdir / FOLDS_JSON).read_text()).get("manifest")
        if isinstance(manifest, str):
            patch_dir = (workdir / manifest).parent
    except (OSError, ValueError, AttributeError):
        pass  # no folds record: the default patch folder
    patches = patch_dir / STAIN_RECORD
    return patches if patches.is_file() and (patch_dir / MANIFEST_NAME).is_file() else None
