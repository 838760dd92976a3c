"""``stain apply``: normalise every image of a folder, write the record and a before/after montage."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from lymph_cv.core.fsutil import atomic_write_bytes, atomic_write_json, make_dirs
from lymph_cv.errors import InputError
from lymph_cv.stages.stain.records import StainRecord, read_bgr

log = logging.getLogger(__name__)

#: Files normalised (by suffix, any case); OpenCV writes each back in its own format.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
#: Uncompressed TIFFs, like the data set's (OpenCV's default would be LZW).
TIFF_OPTIONS = [cv2.IMWRITE_TIFF_COMPRESSION, 1]
RECORD_NAME = "stain.json"
MONTAGE_NAME = "montage.png"
MONTAGE_IMAGES = 6
MONTAGE_TILE = 240  # pixels, the longer side of each thumbnail
MONTAGE_GAP = 4
MONTAGE_BACKGROUND = 255


@dataclass
class ApplyResult:
    written: list[Path] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    montage: Optional[Path] = None
    record: Optional[Path] = None


def source_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden ones left out), sorted."""
    if not folder.is_dir():
        raise InputError("no such folder", folder)
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not found:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder", folder)
    return found


def encode(bgr: np.ndarray, suffix: str, path: Union[str, os.PathLike]) -> bytes:
    ok, data = cv2.imencode(suffix, bgr, TIFF_OPTIONS if suffix.lower() in (".tif", ".tiff") else [])
    if not ok:
        raise InputError(f"OpenCV cannot write {suffix} images", path)
    return data.tobytes()


def thumbnail(bgr: np.ndarray, size: int = MONTAGE_TILE) -> np.ndarray:
    """``bgr`` on a ``size``×``size`` white tile, longer side scaled to ``size``."""
    height, width = bgr.shape[:2]
    scale = size / max(height, width)
    small = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    tile = np.full((size, size, 3), MONTAGE_BACKGROUND, np.uint8)
    tile[: small.shape[0], : small.shape[1]] = small
    return tile


def make_montage(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Before images in the top row, after images in the bottom row."""
    step = MONTAGE_TILE + MONTAGE_GAP
    canvas = np.full((2 * step + MONTAGE_GAP, len(pairs) * step + MONTAGE_GAP, 3), MONTAGE_BACKGROUND, np.uint8)
    for column, (before, after) in enumerate(pairs):
        x = MONTAGE_GAP + column * step
        canvas[MONTAGE_GAP : MONTAGE_GAP + MONTAGE_TILE, x : x + MONTAGE_TILE] = thumbnail(before)
        canvas[MONTAGE_GAP + step : MONTAGE_GAP + step + MONTAGE_TILE, x : x + MONTAGE_TILE] = thumbnail(after)
    return canvas


def apply_folder(source: Union[str, os.PathLike], out: Union[str, os.PathLike], record: StainRecord,
                 montage: int = MONTAGE_IMAGES) -> ApplyResult:
    """Normalise every image under ``source`` into ``out`` (same relative names) with ``record``'s target.

    ``out/stain.json`` holds the record and the images left unchanged; ``out/montage.png`` shows
    the first ``montage`` images before (top) and after (bottom).
    """
    source, out = Path(source), Path(out)
    paths = source_images(source)
    if out.resolve() == source.resolve():
        raise InputError("is the source folder; write the normalised images elsewhere", out)
    result = ApplyResult()
    pairs = []
    for path in paths:
        bgr = read_bgr(path)
        normalised, changed = record.transform.apply(bgr)
        relative = path.relative_to(source)
        if not changed:
            log.warning("warning: %s: %s", path, "too little tissue, left as it is")
            result.unchanged.append(relative.as_posix())
        final = out / relative
        make_dirs(final.parent)
        atomic_write_bytes(final, encode(normalised, path.suffix, final))
        result.written.append(final)
        if len(pairs) < montage:
            pairs.append((bgr, normalised))
    result.record = out / RECORD_NAME
    atomic_write_json(result.record, {**record.to_json(), "applied_to": os.fspath(source),
                                      "normalised": len(paths) - len(result.unchanged), "unchanged": result.unchanged})
    if pairs:
        result.montage = out / MONTAGE_NAME
        atomic_write_bytes(result.montage, encode(make_montage(pairs), ".png", result.montage))
    return result
