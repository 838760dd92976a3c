"""Synthetic whole slides (``lymph-cv synth --layout slides``): pyramidal tiled TIFFs OpenSlide opens.

``OUT/<CLASS>/<case>_<NNN>.tiff``: tissue islands (with holes) on white glass, the tissue drawn by
the image generator of :mod:`.synth` (its class morphology, Beer-Lambert H&E) render tile by render
tile, each case with its own stain.  Several pyramid levels (halved until the longer side is at
most :data:`SMALLEST_SIDE`), JPEG or deflate tiles, and the microns per pixel as TIFF resolution
(OpenSlide's generic-tiff reader reports it as ``openslide.mpp-x``).  Every draw is seeded by
(seed, class, case, slide[, render tile]), recorded in ``OUT/synth.json``; slides present from a
run with the same parameters are kept.  Each level is composed in a memory-mapped scratch file
beside the slide (file pages the kernel writes back, not heap), so a slide of 20,000² pixels fits
on a small machine (about 5 minutes one core; its resident size counts the mapped pages).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from lymph_cv import DEFAULT_CLASSES
from lymph_cv.core.fsutil import atomic_path, atomic_write_json, make_dirs, temp_sibling, write_error
from lymph_cv.core.workers import imap
from lymph_cv.errors import ConfigError
from lymph_cv.stages.synth import Stain, case_ids, draw_stain, refuse_other_layout, render_image
from lymph_cv.workdir.layout import SYNTH_JSON
from lymph_cv.workdir.records import read_cache

log = logging.getLogger(__name__)

#: Bumped whenever the drawing changes, so a rerun does not keep slides drawn the old way.
SLIDE_RENDER_VERSION = 1
SLIDE_SUFFIX = ".tiff"
#: Defaults of ``synth --layout slides``.
DEFAULT_SLIDES_PER_CLASS = 6
DEFAULT_SLIDE_CASES = 3
DEFAULT_SLIDE_SIDE = 4096
DEFAULT_MPP = 0.5
COMPRESSIONS = ("jpeg", "deflate")
#: TIFF tile side, and the side of the blocks the tissue is rendered in.
TIFF_TILE = 256
RENDER_TILE = 512
#: Pyramid levels are halved down to this longer side.
SMALLEST_SIDE = 1024
#: JPEG quality of the tiles.
JPEG_QUALITY = 90
#: Level-0 pixels per pixel of the coarse island map.
ISLAND_CELL = 32
#: Islands per slide (inclusive range), holes per island, share of the slide an island spans.
ISLANDS = (1, 3)
HOLES = (1, 4)
ISLAND_SPAN = (0.3, 0.65)
#: Smooth-noise amplitude that makes island edges ragged (in units of the ellipse's radius).
EDGE_NOISE = 0.25
#: Glass: a little sensor noise (grey levels).
GLASS_NOISE = 1.5


@dataclass(frozen=True)
class _SlideTask:
    path: Path
    cls: str
    label: int
    seed_key: tuple
    width: int
    height: int
    mpp: float
    compression: str
    stain: Stain


def island_map(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A coarse float map (1 tissue, 0 glass) of a few ragged elliptic islands with holes; one cell
    per :data:`ISLAND_CELL` level-0 pixels."""
    cols, rows = max(8, -(-width // ISLAND_CELL)), max(8, -(-height // ISLAND_CELL))
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    noise = cv2.GaussianBlur(rng.standard_normal((rows, cols)).astype(np.float32), (0, 0), max(rows, cols) / 30)
    noise /= max(float(noise.std()), 1e-6)
    tissue = np.zeros((rows, cols), bool)

    def ellipse(cx, cy, ax, ay, angle) -> np.ndarray:
        c, s = np.cos(angle), np.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        return np.sqrt((u / ax) ** 2 + (v / ay) ** 2)

    for _ in range(int(rng.integers(ISLANDS[0], ISLANDS[1] + 1))):
        ax, ay = (rng.uniform(*ISLAND_SPAN, 2) * (cols, rows) / 2)
        cx, cy = rng.uniform(ax, cols - ax), rng.uniform(ay, rows - ay)
        angle = rng.uniform(0, np.pi)
        tissue |= ellipse(cx, cy, ax, ay, angle) + EDGE_NOISE * noise < 1
        for _ in range(int(rng.integers(HOLES[0], HOLES[1] + 1))):
            r = rng.uniform(0.05, 0.15) * min(ax, ay)
            hx, hy = cx + rng.uniform(-0.5, 0.5) * ax, cy + rng.uniform(-0.5, 0.5) * ay
            tissue &= ellipse(hx, hy, r, r * rng.uniform(0.6, 1.4), angle) >= 1
    return tissue.astype(np.float32)


def _block_mask(islands: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The island map over level-0 block (x, y, w, h), bilinear, as a soft 0-1 alpha."""
    # map cell centres: level-0 pixel p lies at cell (p + 0.5) / ISLAND_CELL - 0.5
    gx = (np.arange(x, x + w, dtype=np.float32) + 0.5) / ISLAND_CELL - 0.5
    gy = (np.arange(y, y + h, dtype=np.float32) + 0.5) / ISLAND_CELL - 0.5
    map_x, map_y = np.meshgrid(gx, gy)
    soft = cv2.remap(islands, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.clip((soft - 0.5) * 8 + 0.5, 0, 1)  # a sharp but anti-aliased edge


def _glass(rng: np.random.Generator, h: int, w: int, stain: Stain) -> np.ndarray:
    glass = np.asarray(stain.background, np.float32) + rng.standard_normal((h, w, 3), dtype=np.float32) * GLASS_NOISE
    return glass


def _pyramid_sides(width: int, height: int) -> list[tuple[int, int]]:
    sides = [(width, height)]
    while max(sides[-1]) > SMALLEST_SIDE and min(sides[-1]) >= 2 * 16:
        w, h = sides[-1]
        sides.append((max(1, w // 2), max(1, h // 2)))
    return sides


def _render_slide(task: _SlideTask) -> Path:
    import tifffile

    rng = np.random.default_rng(task.seed_key)
    islands = island_map(rng, task.width, task.height)
    sides = _pyramid_sides(task.width, task.height)
    scratch = [temp_sibling(task.path.with_name(f"{task.path.name}.level{index}")) for index in range(len(sides))]
    try:
        level0 = np.lib.format.open_memmap(scratch[0], mode="w+", dtype=np.uint8, shape=(task.height, task.width, 3))
        for y in range(0, task.height, RENDER_TILE):
            for x in range(0, task.width, RENDER_TILE):
                h, w = min(RENDER_TILE, task.height - y), min(RENDER_TILE, task.width - x)
                block_rng = np.random.default_rng((*task.seed_key, y // RENDER_TILE, x // RENDER_TILE))
                alpha = _block_mask(islands, x, y, w, h)
                out = _glass(block_rng, h, w, task.stain)
                if alpha.any():
                    tissue = render_image(task.cls, task.label, w, h, task.stain, block_rng).astype(np.float32)
                    out += alpha[..., None] * (tissue - out)
                level0[y:y + h, x:x + w] = np.clip(out + 0.5, 0, 255).astype(np.uint8)
        level0.flush()
        options = {"compression": task.compression, "tile": (TIFF_TILE, TIFF_TILE), "photometric": "rgb",
                   "resolutionunit": "CENTIMETER"}
        if task.compression == "jpeg":
            options["compressionargs"] = {"level": JPEG_QUALITY}
        with atomic_path(task.path) as temp:
            with tifffile.TiffWriter(temp, bigtiff=task.width * task.height * 3 > 2 ** 31) as writer:
                current = level0
                for index, (w, h) in enumerate(sides):
                    if index:
                        shrunk = np.lib.format.open_memmap(scratch[index], mode="w+", dtype=np.uint8, shape=(h, w, 3))
                        _shrink_into(current, shrunk)
                        current = shrunk
                    down = task.width / w
                    resolution = 1e4 / (task.mpp * down)  # pixels per centimetre
                    writer.write(current, subfiletype=0 if index == 0 else 1, resolution=(resolution, resolution),
                                 **options)
    except OSError as exc:
        raise write_error(exc, task.path, "slide") from None
    finally:
        for path in scratch:
            path.unlink(missing_ok=True)
    return task.path


def _shrink_into(source: np.ndarray, target: np.ndarray) -> None:
    """``source`` halved by area averaging into ``target``, in bands (both may be memory maps)."""
    band = 2 * RENDER_TILE
    h, w = target.shape[:2]
    for top in range(0, h, band // 2):
        bottom = min(h, top + band // 2)
        rows = source[2 * top:2 * bottom, :2 * w]
        target[top:bottom] = cv2.resize(np.ascontiguousarray(rows), (w, bottom - top), interpolation=cv2.INTER_AREA)


def generate_slides(
    out_dir: Union[str, Path],
    *,
    per_class: Union[int, Sequence[int]] = DEFAULT_SLIDES_PER_CLASS,
    cases_per_class: int = DEFAULT_SLIDE_CASES,
    width: int = DEFAULT_SLIDE_SIDE,
    height: int = DEFAULT_SLIDE_SIDE,
    mpp: float = DEFAULT_MPP,
    compression: str = COMPRESSIONS[0],
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    workers: Optional[int] = None,
) -> list[Path]:
    """Write a synthetic slide set to ``out_dir`` (``<CLASS>/<case>_<NNN>.tiff``, ``synth.json``) and
    return the slide paths in class, case, number order.  Slides are spread evenly over the cases."""
    out = Path(out_dir)
    classes = list(classes)
    if seed < 0:
        raise ConfigError(f"--seed: must be a non-negative integer, got {seed}")
    for name in classes:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
            raise ConfigError(f"--classes: {name!r} is not a plain folder name")
    counts = [int(per_class)] * len(classes) if isinstance(per_class, int) else [int(c) for c in per_class]
    if len(counts) != len(classes) or min(counts) < 1:
        raise ConfigError(f"--per-class: expected one positive count or one per class, got {counts}")
    if cases_per_class < 1:
        raise ConfigError(f"--cases-per-class: must be at least 1, got {cases_per_class}")
    if min(width, height) < RENDER_TILE // 2:
        raise ConfigError(f"--width/--height: a slide needs at least {RENDER_TILE // 2} pixels a side, got {width}x{height}")
    if not (np.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"--mpp: must be a positive number of microns per pixel, got {mpp}")
    if compression not in COMPRESSIONS:
        raise ConfigError(f"unknown slide compression {compression!r}", valid=COMPRESSIONS)
    params = {"layout": "slides", "classes": classes, "slides_per_class": counts, "cases_per_class": cases_per_class,
              "width": width, "height": height, "mpp": mpp, "compression": compression, "seed": seed,
              "render_version": SLIDE_RENDER_VERSION}
    record = out / SYNTH_JSON
    refuse_other_layout(out, "slides")
    previous = read_cache(record)
    resumable = previous is not None and all(previous.get(k) == v for k, v in params.items())
    ids = case_ids(cases_per_class * len(classes), np.random.default_rng([seed, 0x511D]))
    tasks: list[_SlideTask] = []
    cases: dict[str, dict] = {}
    for label, name in enumerate(classes):
        make_dirs(out / name)
        for case_index in range(cases_per_class):
            case = ids[label * cases_per_class + case_index]
            stain = draw_stain(np.random.default_rng([seed, label, case_index, 0x511D]))
            slides = [n for n in range(counts[label]) if n % cases_per_class == case_index]
            if slides:
                cases[case] = {"class": name, "stain": stain.__dict__, "slides": len(slides)}
            for number, _ in enumerate(slides, 1):
                path = out / name / f"{case}_{number:03d}{SLIDE_SUFFIX}"
                tasks.append(_SlideTask(path, name, label, (seed, label, case_index, number), width, height, mpp,
                                        compression, stain))
    todo = [t for t in tasks if not (resumable and t.path.is_file())]
    log.info("synth: %d slides of %dx%d (%d already present) in %s", len(tasks), width, height,
             len(tasks) - len(todo), out)
    atomic_write_json(record, {**params, "complete": False})  # slides drawn now are not vouched for until the end
    for path in imap(_render_slide, todo, workers=workers, desc="synth slides", unit="slide"):
        log.info("synth: %s", path)
    atomic_write_json(record, {**params, "complete": True, "slides": len(tasks), "cases": cases})
    return [t.path for t in tasks]

