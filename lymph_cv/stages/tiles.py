"""The tile manifest: which square tiles of which whole slides, and how to read one (issue 14).

The contract later stages build on.  ``lymph-cv slides tile DATA OUT`` (:mod:`.tiling`) writes::

    OUT/<stem>_sub_<i>.tif   tile i (1-based, row-major over the kept tiles) of slide <stem>, BGR TIFF
    OUT/manifest.json        the patch manifest of :mod:`.patches`: classes → cases → slides, each slide an
                             "image" whose patches are its tiles (patch_size = the written tile side, step =
                             the stride), so ``folds``, ``dbs``, ``render`` and ``train`` read it unchanged
    OUT/tiles.json           the :class:`TileSet`: the parameters, one :class:`SlideRecord` per slide
    OUT/tiles.csv            one :class:`Tile` per row (:data:`TILE_COLUMNS`), slides in manifest order
    OUT/qc/<stem>_mask.png, OUT/qc/<stem>_grid.png   tissue mask, tile grid over the thumbnail
    OUT/.tiles/<stem>.json   a slide's completion record (resume: a rerun skips complete slides)

A tile's file name is its patch name (``<stem>_sub_<index>.tif``, :func:`patches.patch_names`), and
with ``--db`` its database key is ``<index:08d>_<name>`` in the slide's own database.  Coordinates
are level-0 pixels; a tile covers ``extent`` level-0 pixels square, read as ``read_size`` pixels
at pyramid level ``level`` and resampled to ``size`` (the written side).  :func:`read_tile` reads
one tile back from the slide exactly as the tiler did (for evaluation straight from slides).
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from lymph_cv.core.fsutil import atomic_write_json, atomic_write_text
from lymph_cv.core.images import ColourTransform
from lymph_cv.errors import ConfigError, FormatError, InputError
from lymph_cv.formats import slides as slide_format
from lymph_cv.stages.patches import ImageEntry, Manifest, case_of, patch_names
from lymph_cv.stages.tissue import (DEFAULT_MASK_SIDE, DEFAULT_METHOD, DEFAULT_MIN_TISSUE, METHODS, TissueMask,
                                    detect_tissue)
from lymph_cv.workdir.layout import MANIFEST_NAME, TILE_DONE_DIR, TILE_SET, TILE_TABLE
from lymph_cv.workdir.records import RecordSpec, read_record

PathLike = Union[str, os.PathLike]

#: tiles.json's format version (bumped when a field changes meaning).
TILE_FORMAT = 1
#: A level whose downsample exceeds the wanted one by less than this share still counts as sufficient
#: (pyramid downsamples are rounded: 4.0002 for a wanted 4).
LEVEL_TOLERANCE = 1e-3
#: A slide's mpp-x and mpp-y may differ by this share before the tiler refuses non-square pixels.
MPP_SQUARE_TOLERANCE = 0.02
#: Database key of a tile (Caffe's convert_imageset numbering before the name).
DB_KEY = "{index:08d}_{name}"

TILE_RECORD = RecordSpec(TILE_SET, "the tile manifest", "not a tiles.json written by `lymph-cv slides tile`",
                         fields={"params": dict, "slides": list, "classes": list})


def from_fields(kind, obj: dict):
    """A dataclass ``kind`` from a JSON object, keys it does not know left out (newer writers)."""
    names = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in obj.items() if k in names})


@dataclass(frozen=True)
class TileParams:
    """How a slide set was tiled (the options of ``slides tile``); tiles of other parameters are redone."""

    size: int  # tile side in pixels at ``mpp`` (or at ``level``): the field of view
    mpp: Optional[float] = None  # microns per pixel of the tile (None: tiles at ``level``)
    level: Optional[int] = None  # pyramid level read as is (None with ``mpp``; neither: level 0)
    stride: Optional[int] = None  # origin step in the same pixels as ``size`` (None: ``size``, no overlap)
    min_tissue: float = DEFAULT_MIN_TISSUE  # a tile is kept when at least this share of it is tissue
    resize: Optional[int] = None  # written side (None: ``size``)
    mask_side: int = DEFAULT_MASK_SIDE  # longer side of the view tissue is detected on
    tissue_method: str = DEFAULT_METHOD  # tissue measure Otsu thresholds: saturation or od (optical density)

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"--size: must be a positive number of pixels, got {self.size}")
        if self.mpp is not None and self.level is not None:
            raise ConfigError("--mpp and --level are alternatives; give one")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ConfigError(f"--mpp: must be a positive number of microns per pixel, got {self.mpp}")
        if self.level is not None and self.level < 0:
            raise ConfigError(f"--level: must be a pyramid level (0, 1, …), got {self.level}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"--stride: must be a positive number of pixels, got {self.stride}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue: must be a fraction in [0, 1], got {self.min_tissue}")
        if self.resize is not None and self.resize < 1:
            raise ConfigError(f"--resize: must be a positive number of pixels, got {self.resize}")
        if self.mask_side < 1:
            raise ConfigError(f"mask side must be positive, got {self.mask_side}")
        if self.tissue_method not in METHODS:
            raise ConfigError(f"--tissue-method: unknown {self.tissue_method!r}", valid=METHODS)

    @property
    def step(self) -> int:
        return self.size if self.stride is None else self.stride

    @property
    def out_size(self) -> int:
        return self.size if self.resize is None else self.resize

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tile:
    """One tile of one slide (a row of tiles.csv)."""

    slide: str  # slide id: the file stem (patch names start with it)
    path: str  # the slide file
    cls: str  # class name
    label: int  # class index
    case: str  # case (patient) id
    index: int  # 1-based number among the slide's kept tiles (row-major)
    level: int  # pyramid level read
    x: int  # level-0 left
    y: int  # level-0 top
    extent: int  # level-0 pixels the tile covers (square)
    read_size: int  # pixels read at ``level``
    size: int  # side written (after resampling)
    mpp: Optional[float]  # microns per pixel of the written tile (None when the slide has none)
    tissue: float  # tissue share of the tile (0-1)
    name: str  # patch file name; the database key is DB_KEY of it

    @property
    def key(self) -> str:
        """The tile's key in its slide's database."""
        return DB_KEY.format(index=self.index, name=self.name)

    def outside(self, width: int, height: int) -> bool:
        """Whether the tile's level-0 square leaves a ``width`` × ``height`` slide."""
        return self.x < 0 or self.y < 0 or self.x + self.extent > width or self.y + self.extent > height

    def describe(self) -> str:
        """The tile in an error message: its number, name and level-0 square."""
        return f"tile {self.index} ({self.name}: x {self.x}, y {self.y}, extent {self.extent})"


#: tiles.csv's columns, in order.
TILE_COLUMNS = tuple(f.name for f in fields(Tile))


@dataclass(frozen=True)
class SlideRecord:
    """One slide of a tiled set."""

    slide: str  # id (file stem)
    path: str
    name: str  # file name (the manifest's image name)
    cls: str
    label: int
    case: str
    width: int  # level 0
    height: int
    mpp: Optional[float]  # level-0 microns per pixel (x)
    level: int  # level read
    extent: int  # level-0 pixels per tile
    tiles: int  # kept tiles
    candidates: int  # whole tiles on the grid before the tissue filter
    tissue_fraction: float  # tissue share of the whole slide
    complete: bool = True

    def to_json(self) -> dict:
        return asdict(self)

    def image_entry(self) -> ImageEntry:
        """This slide as an image of the patch manifest (its tiles are the patches)."""
        return ImageEntry(self.cls, self.label, self.name, self.case, self.height, self.width, self.tiles)


@dataclass
class TileSet:
    """A tiled slide set: parameters, slides (label then name order) and every tile."""

    params: TileParams
    classes: List[str]
    slides: List[SlideRecord]
    tiles: List[Tile] = field(default_factory=list)
    data: Optional[str] = None  # the data folder or CSV the slides came from
    db_backend: Optional[str] = None  # tiles were written to per-slide databases of this backend, not files
    stain: Optional[dict] = None  # the stain normalisation the tiles were written with
    files: bool = True  # tile files were written (False: per-slide databases, or the manifests only)

    def tiles_of(self, slide: str) -> List[Tile]:
        return [tile for tile in self.tiles if tile.slide == slide]

    def to_json(self) -> dict:
        return {"format": TILE_FORMAT, "params": self.params.to_json(), "classes": list(self.classes),
                "data": self.data, "db_backend": self.db_backend, "stain": self.stain, "files": self.files,
                "slides": [s.to_json() for s in self.slides], "total_tiles": len(self.tiles)}

    def patch_manifest(self, out_dir: PathLike) -> Manifest:
        """The patch manifest (``OUT/manifest.json``) of these tiles, which ``folds`` reads."""
        out_dir = Path(out_dir)
        return Manifest(list(self.classes), sorted((s.image_entry() for s in self.slides), key=lambda e: (e.label, e.name)),
                        self.params.out_size, self.params.step, self.data, [], out_dir / MANIFEST_NAME, self.stain)


def _csv_value(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def tiles_csv(tiles: Sequence[Tile]) -> str:
    """tiles.csv's text: a header of :data:`TILE_COLUMNS`, one row per tile."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TILE_COLUMNS)
    for tile in tiles:
        writer.writerow([_csv_value(getattr(tile, name)) for name in TILE_COLUMNS])
    return buffer.getvalue()


_INT_COLUMNS = {"label", "index", "level", "x", "y", "extent", "read_size", "size"}


def read_tiles_csv(path: PathLike) -> List[Tile]:
    """The tiles of a tiles.csv; FormatError naming the file and line when a row is not a tile."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("no such file; expected the tiles.csv written by `lymph-cv slides tile`", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read the tile table ({exc})", path) from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or tuple(header) != TILE_COLUMNS:
        raise FormatError(f"not a tile table: expected the header {','.join(TILE_COLUMNS)}", path)
    tiles = []
    for number, row in enumerate(rows, 2):
        try:
            values = dict(zip(TILE_COLUMNS, row, strict=True))
            typed = {k: (int(v) if k in _INT_COLUMNS else float(v) if k == "tissue" else
                         (None if v == "" else float(v)) if k == "mpp" else v) for k, v in values.items()}
        except ValueError as exc:
            raise FormatError(f"line {number}: not a tile row ({exc})", path) from None
        tiles.append(Tile(**typed))
    return tiles


def write_tile_set(out_dir: PathLike, tile_set: TileSet) -> None:
    """tiles.csv, then tiles.json and the patch manifest.json, each atomically (the JSON last: a
    reader that finds it finds the table it counts)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / TILE_TABLE, tiles_csv(tile_set.tiles))
    atomic_write_json(out_dir / TILE_SET, tile_set.to_json())
    manifest = tile_set.patch_manifest(out_dir)
    atomic_write_json(manifest.path, {**manifest.to_json(), "tiles": TILE_SET})


def read_tile_set(path: PathLike) -> TileSet:
    """The tile set in ``path`` (the tiling folder or its tiles.json), with its tiles."""
    path = Path(path)
    json_path = path / TILE_SET if path.is_dir() else path
    obj = read_record(json_path, TILE_RECORD, required=True, hint="the tiles.json written by `lymph-cv slides tile`")
    try:
        tile_set = TileSet(from_fields(TileParams, obj["params"]), list(obj["classes"]),
                           [from_fields(SlideRecord, s) for s in obj["slides"]], [], obj.get("data"),
                           obj.get("db_backend"), obj.get("stain"), bool(obj.get("files", True)))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise FormatError(f"not a tile manifest ({type(exc).__name__}: {exc})", json_path) from None
    table = json_path.parent / TILE_TABLE
    tile_set.tiles = read_tiles_csv(table)
    sizes = {record.slide: (record.width, record.height) for record in tile_set.slides}
    for number, tile in enumerate(tile_set.tiles, 2):
        width, height = sizes.get(tile.slide, (None, None))
        if width is not None and tile.outside(width, height):
            raise FormatError(f"line {number}: {tile.describe()} lies outside slide {tile.slide!r}, "
                              f"{width}x{height} level-0 pixels in {TILE_SET}", table)
    return tile_set


def done_record_path(out_dir: PathLike, slide: str) -> Path:
    """Where a slide's completion record lies."""
    return Path(out_dir) / TILE_DONE_DIR / f"{slide}.json"


# --------------------------------------------------------------------------- planning and reading


@dataclass(frozen=True)
class Geometry:
    """How one slide is read for tiles of given parameters."""

    level: int
    extent: int  # level-0 pixels per tile side
    stride0: int  # level-0 pixels between origins
    read_size: int  # pixels read at ``level``
    size: int  # written side
    mpp: Optional[float]  # of the written tile
    slide_mpp: Optional[float]  # of level 0


def slide_mpp(slide, path: PathLike) -> Optional[float]:
    """Level-0 microns per pixel (x), None when the slide does not say; InputError for non-square pixels."""
    props = slide.properties
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            values.append(float(props.get(key, "")))
        except ValueError:
            values.append(None)
    mpp_x, mpp_y = values
    if mpp_x is None or not mpp_x > 0:
        return None
    if mpp_y is not None and mpp_y > 0 and abs(mpp_x - mpp_y) > MPP_SQUARE_TOLERANCE * mpp_x:
        raise InputError(f"pixels are not square ({mpp_x:g} x {mpp_y:g} microns); cannot cut square tiles", path)
    return mpp_x


def best_level(downsamples: Sequence[float], wanted: float) -> int:
    """The coarsest level whose downsample is at most ``wanted`` (level-0 pixels per output pixel):
    the least to read without upsampling."""
    chosen = 0
    for level, down in enumerate(downsamples):
        if down <= wanted * (1 + LEVEL_TOLERANCE):
            chosen = level
    return chosen


def geometry(slide, path: PathLike, params: TileParams) -> Geometry:
    """The level, extents and read size of ``params``' tiles on ``slide``."""
    mpp0 = slide_mpp(slide, path)
    downsamples = [float(d) for d in slide.level_downsamples]
    out = params.out_size
    if params.mpp is not None:
        if mpp0 is None:
            raise InputError("the slide records no microns per pixel (openslide.mpp-x); tile it with --level "
                             "instead of --mpp", path)
        extent = max(1, round(params.size * params.mpp / mpp0))
        stride0 = max(1, round(params.step * params.mpp / mpp0))
        level = best_level(downsamples, extent / out)
    else:
        level = 0 if params.level is None else params.level
        if level >= len(downsamples):
            raise InputError(f"--level {level}: the slide has levels 0 to {len(downsamples) - 1}", path)
        extent = max(1, round(params.size * downsamples[level]))
        stride0 = max(1, round(params.step * downsamples[level]))
    read_size = max(1, round(extent / downsamples[level]))
    mpp = None if mpp0 is None else mpp0 * extent / out
    return Geometry(level, extent, stride0, read_size, out, mpp, mpp0)


def grid_origins(width: int, height: int, extent: int, stride0: int) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys): level-0 origins of every whole tile, as :meth:`TissueMask.tile_fractions` lays them."""
    def axis(length: int) -> np.ndarray:
        return np.arange(0, length - extent + 1, stride0, dtype=np.int64) if length >= extent else np.zeros(0, np.int64)

    return axis(width), axis(height)


def plan_tiles(slide_path: PathLike, size: int, mpp: Optional[float] = None, level: Optional[int] = None,
               stride: Optional[int] = None, min_tissue: float = DEFAULT_MIN_TISSUE, *, resize: Optional[int] = None,
               cls: str = "", label: int = -1, case: Optional[str] = None, mask: Optional[TissueMask] = None,
               mask_side: int = DEFAULT_MASK_SIDE, tissue_method: str = DEFAULT_METHOD) -> List[Tile]:
    """The tiles of the slide at ``slide_path`` kept by ``min_tissue`` (tissue detected on a view
    ``mask_side`` pixels long unless ``mask`` is given), row-major."""
    params = TileParams(size, mpp, level, stride, min_tissue, resize, mask_side, tissue_method)
    return plan_slide(slide_path, params, cls=cls, label=label, case=case, mask=mask)[1]


def plan_slide(slide_path: PathLike, params: TileParams, *, cls: str = "", label: int = -1,
               case: Optional[str] = None, mask: Optional[TissueMask] = None
               ) -> tuple[SlideRecord, List[Tile], TissueMask, Geometry]:
    """:func:`plan_tiles` with the slide's record, its tissue mask and the read geometry."""
    path = Path(slide_path)
    with slide_format.open_slide(path) as slide:
        geo = geometry(slide, path, params)
        width, height = (int(v) for v in slide.level_dimensions[0])
    if mask is None:
        mask = detect_tissue(path, max_side=params.mask_side, method=params.tissue_method)
    xs, ys = grid_origins(width, height, geo.extent, geo.stride0)
    fractions = (mask.tile_fractions(geo.extent, geo.stride0) if len(xs) and len(ys)
                 else np.zeros((len(ys), len(xs))))
    fractions = fractions[:len(ys), :len(xs)]  # the mask's float extent may round up by one origin
    rows, cols = np.nonzero(fractions >= params.min_tissue - 1e-12)
    stem = path.stem
    case = case_of(stem) if case is None else case
    names = patch_names(stem, len(rows))
    tiles = [Tile(stem, os.fspath(path), cls, label, case, i + 1, geo.level, int(xs[c]), int(ys[r]), geo.extent,
                  geo.read_size, geo.size, geo.mpp, round(float(fractions[r, c]), 6), names[i])
             for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist()))]
    record = SlideRecord(stem, os.fspath(path), path.name, cls, label, case, width, height, geo.slide_mpp, geo.level,
                         geo.extent, len(tiles), int(fractions.size), round(mask.fraction, 6))
    return record, tiles, mask, geo


def read_tile(slide, tile: Tile, transform: Optional[ColourTransform] = None) -> np.ndarray:
    """Tile ``tile`` of the open OpenSlide ``slide`` as (size, size, 3) BGR uint8: read at its level,
    resampled to its size (area averaging down, linear up), then ``transform`` (the colour hook).
    InputError naming the tile's slide when the tile is not within ``slide`` (OpenSlide would pad
    what lies outside with transparent pixels: a tile set of another slide, or an edited tiles.csv)."""
    import cv2

    if not 0 <= tile.level < slide.level_count:
        raise InputError(f"{tile.describe()} is read at level {tile.level}; the slide has levels 0 to "
                         f"{slide.level_count - 1}", tile.path)
    width, height = slide.dimensions
    if tile.outside(width, height):
        raise InputError(f"{tile.describe()} lies outside the slide's {width}x{height} level-0 pixels", tile.path)
    region = slide.read_region((tile.x, tile.y), tile.level, (tile.read_size, tile.read_size))
    rgba = np.asarray(region)
    if rgba.ndim == 3 and rgba.shape[2] == 4 and rgba[..., 3].min() == 255:
        bgr = np.ascontiguousarray(rgba[..., 2::-1])  # wholly scanned (most tiles): one copy, no blending
    else:
        bgr = np.ascontiguousarray(slide_format.rgb_of(region)[..., ::-1])
    if tile.read_size != tile.size:
        shrink = tile.read_size > tile.size
        bgr = cv2.resize(bgr, (tile.size, tile.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return bgr if transform is None else transform(bgr)

