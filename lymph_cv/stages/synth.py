"""A synthetic stand-in for the lymphoma data set (CLL, FL, MCL H&E images), in the real layout.

``OUT/<CLASS>/<case>_<NNN>.tif`` with case ids shaped like the real ones (``sj-03-2810``,
``sj-05-5269-R10``), several images per case, 8-bit RGB TIFFs.

What tells the classes apart is morphology at the 32-pixel scale, loosely after the
histology: CLL = small, round, dark, densely packed lymphocytes with clumped chromatin;
FL = a mix of cleaved centrocytes and large vesicular centroblasts (pale nucleus, dark rim,
nucleoli) in follicle-like clusters; MCL = a monotonous sheet of medium, angulated, elongated
nuclei with fine chromatin and scattered pale pink histiocytes.  Colour does not: each case
draws its own H&E stain (stain vectors, intensities, background) from one distribution shared
by all classes, and each image's mean haematoxylin and eosin density is rescaled to a target
drawn from that same distribution, so a colour-only classifier is near chance.

Images are rendered with the Beer-Lambert stain model (optical density = concentration ×
stain vector, intensity = background · exp(−OD)), which keeps the colours plausible.
Every random draw comes from a generator seeded by (seed, class, case[, image]), so the
output is identical for any number of workers.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import cv2
import numpy as np

from lymph_cv import DEFAULT_CLASSES
from lymph_cv.errors import ConfigError, InputError
from lymph_cv.core.fsutil import atomic_write_bytes, atomic_write_json, make_dirs
from lymph_cv.core.workers import imap
from lymph_cv.workdir.layout import SYNTH_JSON
from lymph_cv.workdir.records import read_cache
from lymph_cv.stages.stage import DEMO_DATA_DIR, RunOptions, Stage

log = logging.getLogger(__name__)

#: Images per class in the published data set (374 in all).
REAL_IMAGES_PER_CLASS: tuple[int, ...] = (113, 139, 122)
#: Cases (patients) per class in the published data set.
REAL_CASES_PER_CLASS = 10
#: Size of the published images.
REAL_WIDTH, REAL_HEIGHT = 1388, 1040
#: Record of the parameters, written next to the class folders.
#: Bumped whenever the drawing changes, so a rerun does not keep images drawn the old way.
RENDER_VERSION = 2
IMAGE_SUFFIX = ".tif"
#: OpenCV's TIFF options for uncompressed files, like the published images (1388×1040×3 ≈ 4.3 MB).
TIFF_UNCOMPRESSED = [cv2.IMWRITE_TIFF_COMPRESSION, 1]

# Stain vectors in optical-density space (Ruifrok & Johnston), RGB order.
_HAEMATOXYLIN = np.array([0.650, 0.704, 0.286])
_EOSIN = np.array([0.072, 0.990, 0.105])
_MAX_OD = 3.0  # keeps exp(−OD) away from pure black
# Uneven staining within an image: relative amplitude, length scale (pixels), lowest factor.
_UNEVEN, _UNEVEN_SCALE, _UNEVEN_FLOOR = 0.25, 90.0, 0.4


@dataclass(frozen=True)
class Stain:
    """One case's H&E appearance (shared distribution for every class)."""

    haematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    h_level: float  # target mean haematoxylin OD of an image
    e_level: float  # target mean eosin OD of an image
    background: tuple[float, float, float]  # bright-field intensity, RGB 0..255
    noise: float  # sensor noise (grey levels)


@dataclass(frozen=True)
class _Task:
    path: Path
    label: int
    seed_key: tuple[int, ...]
    width: int
    height: int
    stain: Stain


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


@dataclass(frozen=True)
class SiteStyle:
    """How one site's staining departs from the shared distribution (``synth --sites``)."""

    name: str
    description: str
    h_scale: float = 1.0  # haematoxylin density factor
    e_scale: float = 1.0  # eosin density factor
    h_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added to the H OD vector (RGB)
    e_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    tint: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added to the background (RGB grey levels)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


#: Sites 1, 2, 3, … in turn; beyond these a site's style is drawn at random (seeded by the site).
SITE_STYLES: tuple[SiteStyle, ...] = (
    SiteStyle("site1", "standard H&E"),
    SiteStyle("site2", "pale pink: weak haematoxylin, strong eosin", h_scale=0.65, e_scale=1.5,
              e_shift=(-0.05, 0.05, -0.06), tint=(6.0, -2.0, 2.0)),
    SiteStyle("site3", "dark blue-purple: strong, bluish haematoxylin, weak eosin", h_scale=1.8, e_scale=0.7,
              h_shift=(0.18, -0.12, -0.05), tint=(-6.0, -4.0, 4.0)),
    SiteStyle("site4", "faded, yellowish: low densities, yellow background", h_scale=0.7, e_scale=0.7,
              h_shift=(-0.05, 0.05, 0.15), tint=(4.0, 2.0, -18.0)),
)


def site_style(index: int, seed: int) -> SiteStyle:
    """The style of site ``index`` (0-based): a preset, or drawn from ``(seed, index)`` beyond them."""
    if index < len(SITE_STYLES):
        return SITE_STYLES[index]
    rng = np.random.default_rng([seed, 0x517E, index])
    return SiteStyle(f"site{index + 1}", "drawn at random", float(rng.uniform(0.5, 1.8)), float(rng.uniform(0.6, 1.6)),
                     tuple(float(v) for v in rng.normal(0, 0.08, 3)), tuple(float(v) for v in rng.normal(0, 0.05, 3)),
                     tuple(float(v) for v in rng.normal(0, 6, 3)))


def draw_stain(rng: np.random.Generator, style: Optional[SiteStyle] = None) -> Stain:
    """A random H&E stain; the same distribution for every class (shifted by a site's ``style``)."""
    # Moderate spread (one lab, one scanner): cases differ in colour less than patches of
    # one slide do (see _UNEVEN), so colour is no shortcut for the CNN.
    style = style or SITE_STYLES[0]
    h = _unit(np.clip(_HAEMATOXYLIN + np.asarray(style.h_shift) + rng.normal(0, 0.03, 3), 0.02, None))
    e = _unit(np.clip(_EOSIN + np.asarray(style.e_shift) + rng.normal(0, 0.03, 3), 0.02, None))
    tint = rng.normal(0, 2, 3) + np.asarray(style.tint)
    background = np.clip(rng.uniform(234, 246) + tint, 200, 255)
    return Stain(
        haematoxylin=tuple(float(v) for v in h),
        eosin=tuple(float(v) for v in e),
        h_level=float(rng.uniform(0.27, 0.35) * style.h_scale),
        e_level=float(rng.uniform(0.22, 0.30) * style.e_scale),
        background=tuple(float(v) for v in background),
        noise=float(rng.uniform(1.5, 4.0)),
    )


def case_ids(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct case ids shaped like the real ones (``sj-05-5269-R10``)."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        name = f"sj-{int(rng.integers(3, 6)):02d}-{int(rng.integers(100, 7000))}"
        if rng.random() < 0.5:
            name += f"-R{int(rng.integers(1, 11))}"
        if name not in seen:
            seen.add(name)
            ids.append(name)
    return ids


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise smoothed at scale ``sigma`` (pixels), float32."""
    # Draw at reduced resolution and upsample for large sigmas: same look, far cheaper.
    factor = max(1, int(sigma // 4))
    small = (max(2, shape[0] // factor + 2), max(2, shape[1] // factor + 2))
    field = rng.standard_normal(small, dtype=np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigma / factor)
    if factor > 1:
        field = cv2.resize(field, (small[1] * factor, small[0] * factor), interpolation=cv2.INTER_LINEAR)
    field = field[: shape[0], : shape[1]]
    std = float(field.std())
    return (field - float(field.mean())) / (std if std > 0 else 1.0)


def _centres(rng: np.random.Generator, height: int, width: int, spacing: float, keep: np.ndarray | float) -> np.ndarray:
    """Jittered-grid nucleus centres (x, y); ``keep`` is a probability (map or scalar)."""
    ys = np.arange(spacing / 2, height + spacing, spacing)
    xs = np.arange(spacing / 2, width + spacing, spacing)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    grid += rng.uniform(-0.45, 0.45, grid.shape) * spacing
    grid = grid[(grid[:, 0] > -spacing) & (grid[:, 0] < width + spacing)]
    grid = grid[(grid[:, 1] > -spacing) & (grid[:, 1] < height + spacing)]
    if isinstance(keep, np.ndarray):
        ix = np.clip(grid[:, 0].astype(int), 0, width - 1)
        iy = np.clip(grid[:, 1].astype(int), 0, height - 1)
        p = keep[iy, ix]
    else:
        p = np.full(len(grid), keep)
    return grid[rng.random(len(grid)) < p]


def _polygons(
    rng: np.random.Generator,
    centres: np.ndarray,
    radius: tuple[float, float],
    aspect: tuple[float, float],
    roughness: float,
    notch: float = 0.0,
    vertices: int = 14,
) -> np.ndarray:
    """Nucleus outlines (N, vertices, 2) in 1/4-pixel fixed point for ``cv2.fillPoly(shift=2)``.

    ``roughness`` perturbs the radius per vertex (angulated shapes); ``notch`` cuts a cleft
    into a fraction of the nuclei (cleaved centrocytes).
    """
    n = len(centres)
    theta = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    r = rng.uniform(*radius, (n, 1))
    a = rng.uniform(*aspect, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    rr = r * (1 + roughness * rng.uniform(-1, 1, (n, vertices)))
    if notch > 0:
        cleft = (rng.random((n, 1)) < notch) * np.exp(-(((theta - np.pi) / 0.35) ** 2))
        rr = rr * (1 - 0.55 * cleft)
    x = rr * a * np.cos(theta)
    y = rr / a * np.sin(theta)
    xr = x * np.cos(phase) - y * np.sin(phase) + centres[:, :1]
    yr = x * np.sin(phase) + y * np.cos(phase) + centres[:, 1:]
    return np.round(np.stack([xr, yr], -1) * 4).astype(np.int32)


def _fill(canvas: np.ndarray, polygons: np.ndarray, values: np.ndarray, outline: int = 0) -> None:
    """Draw each polygon with its own value (filled, or as an outline of that thickness)."""
    # One call per polygon: cv2 fills overlapping polygons of one call with even-odd holes.
    for polygon, value in zip(polygons, values.tolist()):
        if outline:
            cv2.polylines(canvas, [polygon], True, value, outline, cv2.LINE_AA, 2)
        else:
            cv2.fillPoly(canvas, [polygon], value, cv2.LINE_AA, 2)


def _nucleoli(rng: np.random.Generator, canvas: np.ndarray, centres: np.ndarray, offset: float, value: float) -> None:
    spots = centres + rng.uniform(-offset, offset, centres.shape)
    polys = _polygons(rng, spots, (1.0, 1.6), (1.0, 1.2), 0.1, vertices=6)
    _fill(canvas, polys, np.full(len(polys), value))


def _draw_cll(rng: np.random.Generator, h: int, w: int, nuclei: np.ndarray, eosin: np.ndarray) -> None:
    centres = _centres(rng, h, w, 8.0, 0.95)
    prolymph = rng.random(len(centres)) < 0.04
    small = _polygons(rng, centres[~prolymph], (2.8, 3.4), (1.0, 1.1), 0.06)
    _fill(nuclei, small, rng.uniform(0.85, 1.0, len(small)))
    large = _polygons(rng, centres[prolymph], (4.5, 5.2), (1.0, 1.1), 0.05)
    _fill(nuclei, large, rng.uniform(0.45, 0.6, len(large)))
    _nucleoli(rng, nuclei, centres[prolymph], 1.5, 0.95)
    # Clumped ("soccer-ball") chromatin: coarse dark blotches inside the nuclei.
    nuclei *= 0.6 + 0.4 * np.clip(_smooth_noise(rng, (h, w), 1.0), -1.5, 1.5)
    eosin += 0.35


def _draw_fl(rng: np.random.Generator, h: int, w: int, nuclei: np.ndarray, eosin: np.ndarray) -> None:
    follicles = np.clip(0.7 + 0.4 * _smooth_noise(rng, (h, w), 60.0), 0.35, 1.0)
    centres = _centres(rng, h, w, 14.5, follicles)
    blast = rng.random(len(centres)) < 0.5
    cytes = _polygons(rng, centres[~blast], (3.6, 4.8), (1.1, 1.4), 0.12, notch=0.8)
    _fill(nuclei, cytes, rng.uniform(0.75, 0.95, len(cytes)))
    blasts = _polygons(rng, centres[blast], (8.0, 10.5), (1.0, 1.2), 0.05)
    # Vesicular nuclei: pale interior, dark membrane, nucleoli near the membrane.
    _fill(nuclei, blasts, rng.uniform(0.2, 0.3, len(blasts)))
    _fill(nuclei, blasts, rng.uniform(0.9, 1.0, len(blasts)), outline=2)
    _nucleoli(rng, nuclei, centres[blast], 5.0, 1.0)
    _nucleoli(rng, nuclei, centres[blast], 5.0, 1.0)
    nuclei *= 0.9 + 0.1 * np.clip(_smooth_noise(rng, (h, w), 0.8), -2, 2)
    eosin += 0.55 + 0.25 * (1 - follicles)


def _draw_mcl(rng: np.random.Generator, h: int, w: int, nuclei: np.ndarray, eosin: np.ndarray) -> None:
    centres = _centres(rng, h, w, 16.0, 0.92)
    histio = rng.random(len(centres)) < 0.04
    cells = _polygons(rng, centres[histio], (11.0, 15.0), (1.0, 1.3), 0.15, vertices=9)
    _fill(eosin, cells, rng.uniform(0.2, 0.35, len(cells)))
    cells = _polygons(rng, centres[histio], (3.0, 4.0), (1.3, 1.6), 0.05)
    _fill(nuclei, cells, rng.uniform(0.35, 0.5, len(cells)))
    shapes = _polygons(rng, centres[~histio], (6.0, 7.5), (1.35, 1.8), 0.3, notch=0.5, vertices=8)
    _fill(nuclei, shapes, rng.uniform(0.55, 0.7, len(shapes)))
    # Fine, evenly dispersed chromatin.
    nuclei *= 0.92 + 0.08 * np.clip(_smooth_noise(rng, (h, w), 0.6), -2, 2)
    eosin += 0.45


#: Renderers by class name.  Classes beyond these reuse them in turn (label modulo 3).
_RENDERERS = {"CLL": _draw_cll, "FL": _draw_fl, "MCL": _draw_mcl}
_ORDER = (_draw_cll, _draw_fl, _draw_mcl)


def render_image(name: str, label: int, width: int, height: int, stain: Stain, rng: np.random.Generator) -> np.ndarray:
    """One synthetic H&E image of class ``name`` as an RGB uint8 array (height, width, 3)."""
    draw = _RENDERERS.get(name, _ORDER[label % len(_ORDER)])
    nuclei = np.zeros((height, width), np.float32)
    eosin = np.zeros((height, width), np.float32)
    draw(rng, height, width, nuclei, eosin)
    nuclei = cv2.GaussianBlur(nuclei, (0, 0), 0.7)
    # Stroma / cytoplasm texture, then the per-image normalisation that removes colour cues.
    eosin *= np.clip(1 + 0.3 * _smooth_noise(rng, (height, width), 6.0), 0.2, None)
    eosin *= 1 - np.clip(nuclei, 0, 1)
    nuclei *= stain.h_level / max(float(nuclei.mean()), 1e-6)
    eosin *= stain.e_level / max(float(eosin.mean()), 1e-6)
    # Uneven staining across the slide: slow fields around the case's levels, so the colour
    # of a patch varies as much within a case as between cases and says little about its class.
    nuclei *= np.clip(1 + _UNEVEN * _smooth_noise(rng, (height, width), _UNEVEN_SCALE), _UNEVEN_FLOOR, None)
    eosin *= np.clip(1 + _UNEVEN * _smooth_noise(rng, (height, width), _UNEVEN_SCALE), _UNEVEN_FLOOR, None)
    od = nuclei[..., None] * np.asarray(stain.haematoxylin, np.float32)
    od += eosin[..., None] * np.asarray(stain.eosin, np.float32)
    np.minimum(od, _MAX_OD, out=od)
    rgb = np.exp(-od) * np.asarray(stain.background, np.float32)
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * stain.noise
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _render_task(task: _Task) -> Path:
    rng = np.random.default_rng(task.seed_key)
    name = task.path.parent.name
    rgb = render_image(name, task.label, task.width, task.height, task.stain, rng)
    ok, encoded = cv2.imencode(IMAGE_SUFFIX, rgb[..., ::-1], TIFF_UNCOMPRESSED)
    if not ok:
        raise InputError("OpenCV could not encode the image", task.path)
    atomic_write_bytes(task.path, encoded.tobytes())
    return task.path


def _split(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` groups, as even as possible (larger groups first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def generate(
    out_dir: Union[str, Path],
    *,
    per_class: Union[int, Sequence[int], None] = None,
    cases_per_class: int = REAL_CASES_PER_CLASS,
    width: int = REAL_WIDTH,
    height: int = REAL_HEIGHT,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    workers: Optional[int] = None,
    sites: int = 1,
) -> list[Path]:
    """Write a synthetic data set to ``out_dir`` and return the image paths (class, case, number order).

    Args:
        out_dir: output folder; gets one sub-folder per class and ``synth.json``.
        per_class: images per class — one number for all, one per class, or ``None`` for the
            published counts (113, 139, 122 for CLL, FL, MCL).
        cases_per_class: cases (patients) per class; images are spread evenly over them.
        width, height: image size in pixels (the published 1388 × 1040 by default).
        seed: makes the whole set reproducible, independent of ``workers``.
        classes: class folder names, in label order.
        workers: processes (``None`` = all cores).
        sites: draw the cases from this many sites whose stains differ strongly (see
            :data:`SITE_STYLES`); case ``i`` of every class comes from site ``i mod sites``, so
            each site holds every class. ``synth.json`` records each site and each case's site.

    Images already present from a run with the same parameters are kept (resumable).
    """
    out = Path(out_dir)
    classes = list(classes)
    if seed < 0:  # numpy's generators take non-negative seeds only
        raise ConfigError(f"--seed: must be a non-negative integer, got {seed}")
    for name in classes:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
            raise ConfigError(f"--classes: {name!r} is not a plain folder name")
    counts = _images_per_class(per_class, classes)
    if cases_per_class < 1:
        raise ConfigError(f"--cases-per-class: must be at least 1, got {cases_per_class}")
    if width < 1 or height < 1:
        raise ConfigError(f"--width/--height: image size must be positive, got {width}x{height}")
    if sites < 1:
        raise ConfigError(f"--sites: must be at least 1, got {sites}")
    if sites > cases_per_class:
        raise ConfigError(f"--sites: {sites} sites need at least {sites} cases per class (every site holds every "
                          f"class), got --cases-per-class {cases_per_class}")
    params = {
        "classes": classes,
        "images_per_class": counts,
        "cases_per_class": cases_per_class,
        "width": width,
        "height": height,
        "seed": seed,
        "sites": sites,
        "render_version": RENDER_VERSION,
    }
    record = out / SYNTH_JSON
    refuse_other_layout(out, "tutorial")
    resumable = _same_params(record, params)

    ids = case_ids(cases_per_class * len(classes), np.random.default_rng([seed, 0xCA5E]))
    tasks: list[_Task] = []
    styles = [site_style(index, seed) for index in range(sites)]
    case_sites: dict[str, str] = {}
    for label, name in enumerate(classes):
        make_dirs(out / name)
        cases = ids[label * cases_per_class : (label + 1) * cases_per_class]
        for case_index, (case, images) in enumerate(zip(cases, _split(counts[label], cases_per_class))):
            style = styles[case_index % sites]
            case_sites[case] = style.name
            stain = draw_stain(np.random.default_rng([seed, label, case_index]), style)
            for number in range(1, images + 1):
                path = out / name / f"{case}_{number:03d}{IMAGE_SUFFIX}"
                tasks.append(_Task(path, label, (seed, label, case_index, number), width, height, stain))
    _refuse_foreign_images(out, classes, {t.path for t in tasks})
    todo = [t for t in tasks if not (resumable and t.path.is_file())]
    log.info("synth: %d images (%d already present) in %s", len(tasks), len(tasks) - len(todo), out)
    for _ in imap(_render_task, todo, workers=workers, desc="synth", unit="img"):
        pass
    cases: dict[str, list[str]] = {name: [] for name in classes}
    for task in tasks:  # cases that got images (more cases than images leaves some empty)
        case = task.path.stem.rsplit("_", 1)[0]
        if case not in cases[task.path.parent.name]:
            cases[task.path.parent.name].append(case)
    site_record = {"site_styles": [style.to_json() for style in styles],
                   "case_sites": {case: case_sites[case] for names in cases.values() for case in names}}
    atomic_write_json(record, {**params, "images": len(tasks), "cases": cases, **site_record})
    return [t.path for t in tasks]


def read_case_sites(data_dir: Union[str, Path]) -> Optional[dict[str, str]]:
    """case id → site name from a set's ``synth.json`` (None when it has no record or no sites)."""
    record = read_cache(Path(data_dir) / SYNTH_JSON)
    sites = record.get("case_sites") if record is not None else None
    return {str(k): str(v) for k, v in sites.items()} if isinstance(sites, dict) else None


def refuse_other_layout(out: Path, layout: str) -> None:
    """A ConfigError when ``out`` holds a synthetic set of another layout: its synth.json (the truth of
    that set) would be overwritten (the tutorial's records name no layout)."""
    previous = read_cache(out / SYNTH_JSON)
    other = None if previous is None else previous.get("layout", "tutorial")
    if other is not None and other != layout:
        raise ConfigError(f"holds a synthetic {other} set (synth.json); write the synthetic {layout} set to an "
                          "empty or new folder", out)


def _refuse_foreign_images(out: Path, classes: Sequence[str], ours: set) -> None:
    """Refuse a folder whose class folders hold files this set would not write.

    They would mix with the new images (an earlier set with other parameters, or real data):
    ``patches`` would cut them all and ``synth.json`` would not describe the folder.
    """
    for name in classes:
        folder = out / name
        if not folder.is_dir():
            continue
        foreign = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p not in ours)
        if foreign:
            raise ConfigError(f"{name}/{foreign[0]} and {len(foreign) - 1} more file(s) are not part of this set "
                              "and would mix with it; use an empty or new folder", out)


def _images_per_class(per_class: Union[int, Sequence[int], None], classes: Sequence[str]) -> list[int]:
    if per_class is None:
        if len(classes) != len(REAL_IMAGES_PER_CLASS):
            raise ConfigError(f"--per-class: give --per-class for {len(classes)} classes (the published counts are for 3)")
        return list(REAL_IMAGES_PER_CLASS)
    counts = [int(per_class)] * len(classes) if isinstance(per_class, int) else [int(c) for c in per_class]
    if len(counts) != len(classes):
        raise ConfigError(f"--per-class: counts {counts} do not match the {len(classes)} classes {list(classes)}")
    if min(counts) < 1:
        raise ConfigError(f"--per-class: every class needs at least one image, got {counts}")
    return counts


def _same_params(record: Path, params: Mapping[str, object]) -> bool:
    previous = read_cache(record)
    return previous is not None and all(previous.get(key) == value for key, value in params.items())



class SynthStage(Stage):
    """``--demo``: the synthetic data set the run trains on (only when no ``--data`` is given)."""

    name = "synth"
    writes = (DEMO_DATA_DIR + "/", f"{DEMO_DATA_DIR}/{SYNTH_JSON}")

    def enabled(self, o: RunOptions) -> bool:
        return o.demo is not None

    def params(self, o: RunOptions) -> dict:
        return {**dataclasses.asdict(o.demo), "seed": o.seed, "classes": list(o.classes), "data": o.where(o.data_dir)}

    def complete(self, o: RunOptions) -> bool:
        return (o.data_dir / SYNTH_JSON).is_file()

    def run(self, o: RunOptions, fresh: bool) -> None:
        if fresh and o.data_dir.exists() and (o.data_dir / SYNTH_JSON).is_file():
            shutil.rmtree(o.data_dir)
        demo = o.demo
        generate(o.data_dir, per_class=demo.per_class, cases_per_class=demo.cases_per_class,
                 width=demo.width, height=demo.height, seed=o.seed, classes=o.classes, workers=o.workers)


STAGE = SynthStage()
