"""``lymph-cv synth --layout bags``: a synthetic lymphocytosis set (patients, cell images, clinical CSV).

``OUT/<patient>/<NNNNNN>.png`` (one centred blood cell per image, ``cell_size`` pixels square) and
``OUT/clinical.csv`` (``ID,LABEL,GENDER,DOB,LYMPH_COUNT``, the layout :func:`lymph_cv.stages.bags.load_bags`
reads), plus ``OUT/synth.json``: the parameters, and per patient its label, its abnormal fraction and
which of its cells are abnormal (the instance-level truth the MIL heads can be checked against).

Reactive patients (label 0) show small, round lymphocytes with a fine, even chromatin and a thin rim of
blue cytoplasm (and a few mildly atypical ones, ``reactive_abnormal``); tumoral patients (label 1) mix
them with a fraction ``abnormal`` of abnormal cells: larger, with lobed or cleft nuclei and coarse,
clumped chromatin with nucleoli, so a bag's label hangs on a minority of its instances.  Each patient
draws its own smear colour (shared distribution for both classes), and its clinical attributes are only
weakly tied to the label (``clinical_signal``: the shift of age and log lymphocyte count between
classes in standard deviations).  Every draw comes from a generator seeded by (seed, patient[, cell]).
"""
from __future__ import annotations

import datetime as dt
import io
import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from lymph_cv.core.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, make_dirs
from lymph_cv.core.workers import imap
from lymph_cv.errors import ConfigError, InputError
from lymph_cv.stages.sources.patients import BAG_CLASSES, DAYS_PER_YEAR, REFERENCE_DATE
from lymph_cv.workdir.layout import SYNTH_JSON
from lymph_cv.workdir.records import read_cache

log = logging.getLogger(__name__)

#: Bumped whenever the drawing changes, so a rerun does not keep cells drawn the old way.
BAGS_RENDER_VERSION = 1
CLINICAL_CSV = "clinical.csv"
CELL_SUFFIX = ".png"
#: Defaults of the issue's synthetic set.
DEFAULT_PATIENTS = 80
DEFAULT_CELLS = (20, 60)
DEFAULT_ABNORMAL = (0.2, 0.4)
DEFAULT_REACTIVE_ABNORMAL = (0.0, 0.05)
DEFAULT_CELL_SIZE = 64
DEFAULT_CLINICAL_SIGNAL = 0.5
DEFAULT_TUMORAL_SHARE = 0.5
#: Age (years) and log lymphocyte count (10^9/L) of reactive patients: mean, sd; tumoral ones are
#: shifted by clinical_signal sds.
AGE_MEAN, AGE_SD = 60.0, 14.0
LOG_COUNT_MEAN, LOG_COUNT_SD = 2.0, 0.6
#: P(male) of reactive patients, and its shift per unit of clinical_signal for tumoral ones.
MALE_SHARE, MALE_SHIFT = 0.45, 0.1
#: The smallest cell image a nucleus, its rim and a red cell or two fit in.
MIN_CELL_SIZE = 24
#: Nucleus radius of a normal lymphocyte as a share of the image side, and the abnormal cells' factor.
NUCLEUS_SHARE = 0.2
ABNORMAL_SCALE = (1.3, 1.6)
_VERTICES = 48


@dataclass(frozen=True)
class _Patient:
    index: int
    ident: str
    label: int
    cells: int
    abnormal: Tuple[int, ...]  # cell numbers (0-based) that are abnormal
    stain: Tuple[float, ...]  # per-channel colour factors (BGR) and brightness
    out_dir: Path
    size: int
    seed: int


def _outline(rng: np.random.Generator, centre: np.ndarray, radius: float, abnormal: bool) -> np.ndarray:
    """A nucleus outline (vertices, 2) in 1/4-pixel fixed point: round, or lobed / cleft when abnormal."""
    theta = np.linspace(0, 2 * np.pi, _VERTICES, endpoint=False)
    wobble = np.convolve(np.tile(rng.normal(0, 1, _VERTICES), 3), np.ones(5) / 5, "same")[_VERTICES:2 * _VERTICES]
    r = radius * (1 + 0.03 * wobble)
    if abnormal:
        lobes = int(rng.integers(2, 5))
        r *= 1 + rng.uniform(0.12, 0.25) * np.cos(lobes * theta + rng.uniform(0, 2 * np.pi))
        cleft = rng.uniform(0, 2 * np.pi)
        r *= 1 - rng.uniform(0.2, 0.4) * np.exp(-((np.angle(np.exp(1j * (theta - cleft)))) / 0.3) ** 2)
    aspect = rng.uniform(1.0, 1.12 if not abnormal else 1.3)
    x, y = r * aspect * np.cos(theta), r / aspect * np.sin(theta)
    phase = rng.uniform(0, 2 * np.pi)
    points = np.stack([x * np.cos(phase) - y * np.sin(phase), x * np.sin(phase) + y * np.cos(phase)], -1) + centre
    return np.round(points * 4).astype(np.int32)


def _mask(shape: Tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    canvas = np.zeros(shape, np.float32)
    cv2.fillPoly(canvas, [polygon], 1.0, cv2.LINE_AA, 2)
    return canvas


def _disc(shape: Tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    canvas = np.zeros(shape, np.float32)
    cv2.circle(canvas, tuple(int(v) for v in np.round(centre * 4)), int(round(radius * 4)), 1.0, -1, cv2.LINE_AA, 2)
    return canvas


def _texture(rng: np.random.Generator, shape: Tuple[int, int], sigma: float) -> np.ndarray:
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return field / max(float(field.std()), 1e-6)


def render_cell(rng: np.random.Generator, size: int, abnormal: bool, stain: Sequence[float]) -> np.ndarray:
    """One centred blood-cell image (size, size, 3) BGR uint8, May-Grünwald-Giemsa-like colours."""
    shape = (size, size)
    # Background plasma with two or three red cells (pink discs with a pale centre) around the cell.
    image = np.empty((size, size, 3), np.float32)
    image[:] = (222.0, 212.0, 236.0)
    for _ in range(int(rng.integers(2, 4))):
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.38, 0.55) * size
        centre = size / 2 + distance * np.array([np.cos(angle), np.sin(angle)])
        radius = rng.uniform(0.17, 0.22) * size
        disc = _disc(shape, centre, radius) - 0.35 * _disc(shape, centre, radius * 0.45)
        image += disc[..., None] * np.array([-40.0, -75.0, -20.0], np.float32)
    centre = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    nucleus_r = NUCLEUS_SHARE * size * rng.uniform(0.9, 1.1) * (rng.uniform(*ABNORMAL_SCALE) if abnormal else 1.0)
    nucleus_r = min(nucleus_r, 0.36 * size)
    cytoplasm = _disc(shape, centre, nucleus_r * rng.uniform(1.18, 1.35 if not abnormal else 1.5))
    image = image * (1 - cytoplasm[..., None]) + cytoplasm[..., None] * np.array([215.0, 170.0, 150.0], np.float32)
    nucleus = _mask(shape, _outline(rng, centre, nucleus_r, abnormal))
    if abnormal:  # coarse clumped chromatin and pale nucleoli
        chromatin = 1 + 0.35 * np.clip(_texture(rng, shape, 1.6), -2, 2)
        for _ in range(int(rng.integers(1, 3))):
            spot = centre + rng.uniform(-0.5, 0.5, 2) * nucleus_r
            chromatin -= 0.6 * _disc(shape, spot, max(1.0, 0.12 * nucleus_r))
    else:  # fine, even chromatin
        chromatin = 1 + 0.08 * np.clip(_texture(rng, shape, 0.7), -2, 2)
    density = np.clip(nucleus * chromatin, 0, 1.4)[..., None]
    purple = np.array([150.0, 60.0, 95.0], np.float32)
    image = image * (1 - np.clip(density, 0, 1)) + np.clip(density, 0, 1) * purple * (1.6 - 0.6 * np.clip(density, 0, 1.4) / 1.4)
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    image *= np.asarray(stain[:3], np.float32) * stain[3]
    image += rng.normal(0, 2.5, image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _render_patient(patient: _Patient) -> int:
    folder = patient.out_dir / patient.ident
    make_dirs(folder)
    abnormal = set(patient.abnormal)
    for number in range(patient.cells):
        rng = np.random.default_rng([patient.seed, patient.index, number])
        bgr = render_cell(rng, patient.size, number in abnormal, patient.stain)
        ok, encoded = cv2.imencode(CELL_SUFFIX, bgr)
        if not ok:
            raise InputError("OpenCV could not encode the cell image", folder)
        atomic_write_bytes(folder / f"{number:06d}{CELL_SUFFIX}", encoded.tobytes(), sync=False)
    return patient.cells


def _check_range(name: str, value: Tuple[float, float], low: float, high: Optional[float] = None) -> None:
    a, b = value
    if not (low <= a <= b and (high is None or b <= high)):
        bound = f"in [{low:g}, {high:g}]" if high is not None else f"at least {low:g}"
        raise ConfigError(f"--{name}: expected LOW-HIGH with LOW ≤ HIGH, both {bound}, got {a:g}-{b:g}")


def generate_bags(out_dir: Union[str, Path], *, patients: int = DEFAULT_PATIENTS,
                  cells: Tuple[int, int] = DEFAULT_CELLS, abnormal: Tuple[float, float] = DEFAULT_ABNORMAL,
                  reactive_abnormal: Tuple[float, float] = DEFAULT_REACTIVE_ABNORMAL,
                  cell_size: int = DEFAULT_CELL_SIZE, clinical_signal: float = DEFAULT_CLINICAL_SIGNAL,
                  tumoral_share: float = DEFAULT_TUMORAL_SHARE, reference_date: dt.date = REFERENCE_DATE,
                  seed: int = 0, workers: Optional[int] = None) -> dict:
    """Write the synthetic patient set to ``out_dir``; returns the synth.json record.

    Args:
        patients: number of patients (both classes get at least one when 2 or more).
        cells: (min, max) cells per patient, drawn uniformly.
        abnormal: (low, high) share of abnormal cells in a tumoral patient, drawn uniformly.
        reactive_abnormal: the same for reactive patients (mildly atypical cells: the same drawing).
        cell_size: the side of each cell image in pixels.
        clinical_signal: shift of age and log lymphocyte count between the classes, in sds.
        tumoral_share: the share of tumoral patients.
        reference_date: dates of birth are written so ages at this date are the drawn ones.
        seed: every draw; the set is the same for any ``workers``.
    """
    out = Path(out_dir)
    if seed < 0:
        raise ConfigError(f"--seed: must be a non-negative integer, got {seed}")
    if patients < 2:
        raise ConfigError(f"--patients: at least 2 are needed (one per class), got {patients}")
    _check_range("cells", cells, 1)
    _check_range("abnormal", abnormal, 0.0, 1.0)
    _check_range("reactive-abnormal", reactive_abnormal, 0.0, 1.0)
    if cell_size < MIN_CELL_SIZE:
        raise ConfigError(f"--cell-size: at least {MIN_CELL_SIZE} pixels, got {cell_size}")
    if not 0.0 < tumoral_share < 1.0:
        raise ConfigError(f"tumoral share must lie strictly between 0 and 1, got {tumoral_share}")
    params = {"layout": "bags", "patients": patients, "cells": list(cells), "abnormal": list(abnormal),
              "reactive_abnormal": list(reactive_abnormal), "cell_size": cell_size,
              "clinical_signal": clinical_signal, "tumoral_share": tumoral_share,
              "reference_date": reference_date.isoformat(), "seed": seed, "classes": list(BAG_CLASSES),
              "render_version": BAGS_RENDER_VERSION}
    previous = read_cache(out / SYNTH_JSON)
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and (previous is None or previous.get("layout") != "bags"):
        raise ConfigError("the folder holds other files; write the synthetic bags to an empty or new folder", out)
    labels = np.zeros(patients, np.int64)
    labels[: max(1, min(patients - 1, round(patients * tumoral_share)))] = 1
    labels = np.random.default_rng([seed, 0xBA65]).permutation(labels)
    todo, rows, truth = [], [], {}
    for index, label in enumerate(labels.tolist()):
        rng = np.random.default_rng([seed, 0xBA65, index])
        ident = f"P{index + 1:03d}"
        count = int(rng.integers(cells[0], cells[1] + 1))
        share = rng.uniform(*(abnormal if label else reactive_abnormal))
        chosen = rng.choice(count, size=int(round(share * count)), replace=False)
        stain = tuple(float(v) for v in rng.uniform(0.92, 1.08, 3)) + (float(rng.uniform(0.9, 1.05)),)
        shift = clinical_signal * label
        age = float(np.clip(rng.normal(AGE_MEAN + shift * AGE_SD, AGE_SD), 18, 100))
        lymph = float(np.exp(rng.normal(LOG_COUNT_MEAN + shift * LOG_COUNT_SD, LOG_COUNT_SD)))
        male = rng.random() < MALE_SHARE + MALE_SHIFT * shift
        born = reference_date - dt.timedelta(days=round(age * DAYS_PER_YEAR))
        rows.append([ident, label, "M" if male else "F", f"{born.month}/{born.day}/{born.year}", f"{lymph:.2f}"])
        todo.append(_Patient(index, ident, label, count, tuple(sorted(int(c) for c in chosen)), stain, out, cell_size, seed))
        truth[ident] = {"label": label, "cells": count, "abnormal_share": round(float(share), 4),
                        "abnormal": [f"{c:06d}{CELL_SUFFIX}" for c in sorted(int(c) for c in chosen)]}
    ours = {p.ident for p in todo}
    foreign = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in ours
                     and not p.name.startswith(".")) if out.is_dir() else []
    if foreign:
        raise ConfigError(f"patient folder {foreign[0]!r} is not part of this set and would mix with it; use an "
                          "empty or new folder", out)
    same = previous is not None and all(previous.get(k) == v for k, v in params.items())
    written = [p for p in todo if not (same and (out / p.ident / f"{p.cells - 1:06d}{CELL_SUFFIX}").is_file())]
    make_dirs(out)
    log.info("synth: %d patients (%d already present) in %s", len(todo), len(todo) - len(written), out)
    for _ in imap(_render_patient, written, workers=workers, desc="synth", unit="patient"):
        pass
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT"])
    writer.writerows(rows)
    atomic_write_text(out / CLINICAL_CSV, buffer.getvalue())
    record = {**params, "clinical_csv": CLINICAL_CSV, "instances": sum(p.cells for p in todo), "truth": truth}
    atomic_write_json(out / SYNTH_JSON, record)
    return record
