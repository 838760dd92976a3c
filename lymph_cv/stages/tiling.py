"""Whole-slide tiling (``lymph-cv slides tile``): tissue tiles of every slide to patch files or to
one database per slide, with the tile manifest of :mod:`.tiles`.

Streaming: a slide is never read whole.  Tissue is detected on a low-resolution view
(:func:`formats.slides.read_low_resolution`, read band by band), and tiles are read region by
region in chunks of at most :data:`CHUNK_PIXELS` written pixels, one chunk per worker task (with
``--db`` smaller, so the records in flight stay under :data:`DB_IN_FLIGHT_PIXELS`), so memory stays
bounded whatever the slide size.  Work is parallel over
slides (planning) and over regions of a slide (chunks).  Resumable per slide: a slide's completion
record (``.tiles/<stem>.json``: parameters, source size and date, its tiles) is written when its
last tile is; a rerun with the same parameters skips it.  Several processes may tile the same
folder at once (a Slurm/PBS array, one slide each): each slide is locked while it is tiled.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import cv2
import numpy as np

from lymph_cv import DEFAULT_CLASSES
from lymph_cv.core import faults, locks
from lymph_cv.core.fsutil import atomic_write_bytes, atomic_write_json, check_writable, make_dirs
from lymph_cv.core.workers import imap, resolve_workers
from lymph_cv.errors import ConfigError, InputError, LymphCVError
from lymph_cv.formats import slides as slide_format
from lymph_cv.formats import store
from lymph_cv.formats.caffe.datum import serialize_datum
from lymph_cv.stages import tissue
from lymph_cv.stages.sources.slides import SlideSource, scan_slides
from lymph_cv.stages.stain import StainRecord, StainTransform, write_record
from lymph_cv.stages.stain import hook as stain_hook
from lymph_cv.stages.patches import PATCH_SUFFIX
from lymph_cv.stages.synth import TIFF_UNCOMPRESSED
from lymph_cv.stages.tiles import (SlideRecord, Tile, TileParams, TileSet, done_record_path, from_fields,
                                   plan_slide, read_tile, write_tile_set)
from lymph_cv.stages.sources import input_fingerprint
from lymph_cv.stages.stage import RunOptions, Stage, check_stain, stain_key, stain_target_record
from lymph_cv.workdir.layout import STAIN_RECORD, TILE_DB, TILE_DONE_DIR, TILE_GRID_PNG, TILE_MASK_PNG, TILE_QC_DIR
from lymph_cv.workdir.layout import MANIFEST_NAME, PATCH_DIR, TILE_SET, TILE_TABLE
from lymph_cv.workdir.records import read_cache

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Written pixels per worker task (a chunk of tiles): 4 Mpx is 12 MiB of BGR.
CHUNK_PIXELS = 4 * 1024 * 1024
#: With --db the chunks' records come back to the writing process, up to LOOKAHEAD chunks per worker
#: (core.workers.imap): their pixels together stay under this (64 Mpx: 192 MiB), however many workers.
DB_IN_FLIGHT_PIXELS = 64 * 1024 * 1024
LOOKAHEAD = 4
#: The data source of a run over slides (stages.sources.slides).
SLIDE_SOURCE = "slides"
#: Tile-grid overlay colours (BGR): kept tiles, grid tiles dropped by --min-tissue, the tissue outline.
KEPT_COLOUR = (0, 200, 0)
DROPPED_COLOUR = (0, 0, 220)
OUTLINE_COLOUR = (220, 120, 0)


@dataclass(frozen=True)
class _Plan:
    source: SlideSource
    out_dir: Path
    params: TileParams
    qc: bool


@dataclass(frozen=True)
class _Planned:
    record: Optional[SlideRecord]
    tiles: List[Tile]
    problem: Optional[str] = None


@dataclass(frozen=True)
class _Chunk:
    tiles: List[Tile]
    out_dir: Path
    to_db: bool
    stain: Optional[StainTransform]


@dataclass(frozen=True)
class _ChunkDone:
    slide: str
    count: int
    records: Optional[list]  # (key, value) pairs for the slide's database
    unchanged: int = 0  # tiles the stain normalisation left as they were


def source_signature(path: Path) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def grid_overlay(rgb: np.ndarray, mask: tissue.TissueMask, kept: Sequence[Tile], dropped: Sequence[tuple]) -> np.ndarray:
    """The thumbnail (BGR) with the tissue outline, kept tiles green and dropped grid tiles red."""
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    contours, _ = cv2.findContours(mask.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(bgr, contours, -1, OUTLINE_COLOUR, 1)
    sx, sy = mask.downsample

    def box(x: int, y: int, extent: int, colour) -> None:
        cv2.rectangle(bgr, (int(x / sx), int(y / sy)), (int((x + extent) / sx) - 1, int((y + extent) / sy) - 1), colour, 1)

    for x, y, extent in dropped:
        box(x, y, extent, DROPPED_COLOUR)
    for tile in kept:
        box(tile.x, tile.y, tile.extent, KEPT_COLOUR)
    return bgr


def _png(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise LymphCVError("cannot encode the image as PNG", path)
    atomic_write_bytes(path, data, sync=False)


def _plan_one(job: _Plan) -> _Planned:
    source = job.source
    try:
        with slide_format.open_slide(source.path) as slide:
            rgb, downsample = slide_format.read_low_resolution(slide, job.params.mask_side)
        found, threshold = tissue.tissue_mask(rgb, method=job.params.tissue_method)
        mask = tissue.TissueMask(found, downsample, threshold)
        record, tiles, _, geo = plan_slide(source.path, job.params, cls=source.cls, label=source.label,
                                           case=source.case, mask=mask)
    except LymphCVError as exc:
        return _Planned(None, [], problem=str(exc))
    if job.qc:
        qc = make_dirs(job.out_dir / TILE_QC_DIR)
        tissue.write_mask_png(qc / TILE_MASK_PNG.format(slide=source.slide), mask.mask)
        kept = {(t.x, t.y) for t in tiles}
        width, height = record.width, record.height
        dropped = [(x, y, geo.extent) for y in range(0, height - geo.extent + 1, geo.stride0)
                   for x in range(0, width - geo.extent + 1, geo.stride0) if (x, y) not in kept]
        _png(qc / TILE_GRID_PNG.format(slide=source.slide), grid_overlay(rgb, mask, tiles, dropped))
    return _Planned(record, tiles)


def _tile_chunk(job: _Chunk) -> _ChunkDone:
    transform = stain_hook(job.stain)
    records: Optional[list] = [] if job.to_db else None
    unchanged = 0
    with slide_format.open_slide(job.tiles[0].path) as slide:
        for tile in job.tiles:
            bgr = read_tile(slide, tile, transform)
            unchanged += bool(transform is not None and transform.unchanged)
            if records is not None:
                records.append((tile.key.encode(), serialize_datum(bgr.transpose(2, 0, 1), tile.label)))
                continue
            ok, encoded = cv2.imencode(".tif", bgr, TIFF_UNCOMPRESSED)
            if not ok:
                raise LymphCVError("cannot encode the tile as TIFF", job.out_dir / tile.name)
            atomic_write_bytes(job.out_dir / tile.name, encoded, sync=False)
    return _ChunkDone(job.tiles[0].slide, len(job.tiles), records, unchanged)


def chunks_of(tiles: Sequence[Tile], size: int, pixels: int = CHUNK_PIXELS) -> Iterator[List[Tile]]:
    """The tiles in runs of at most ``pixels`` written pixels (one tile at least)."""
    per_chunk = max(1, pixels // (size * size))
    for start in range(0, len(tiles), per_chunk):
        yield list(tiles[start:start + per_chunk])


def _done_content(params: TileParams, source: SlideSource, db_backend: Optional[str],
                  stain: Optional[StainTransform], write_tiles: bool = True) -> dict:
    return {"params": params.to_json(), "source": source_signature(source.path), "db_backend": db_backend,
            "write_tiles": write_tiles,
            "stain": None if stain is None else stain.to_json()}


def _read_done(out_dir: Path, source: SlideSource, expected: dict) -> Optional[tuple[SlideRecord, List[Tile]]]:
    """A slide's completion record when it matches ``expected`` (and its outputs are there)."""
    done = read_cache(done_record_path(out_dir, source.slide))
    if done is None or any(done.get(key) != value for key, value in expected.items()):
        return None
    try:
        record = from_fields(SlideRecord, done["slide"])
        tiles = [Tile(**t) for t in done["tiles"]]
    except (KeyError, TypeError, ValueError):
        return None
    files = expected["db_backend"] is None and expected["write_tiles"]
    if files and not all((out_dir / t.name).is_file() for t in tiles):
        return None
    return record, tiles


def _collect_done(out_dir: Path, sources: Sequence[SlideSource], expected: dict, done: dict) -> None:
    """Add to ``done`` the slides not in it whose completion record matches."""
    for source in sources:
        if source.slide not in done:
            found = _read_done(out_dir, source, expected[source.slide])
            if found is not None:
                done[source.slide] = found


def _select(sources: List[SlideSource], only: Optional[Sequence[int]]) -> List[SlideSource]:
    if not only:
        return sources
    bad = [i for i in only if not 1 <= i <= len(sources)]
    if bad:
        raise InputError(f"--slide {bad[0]}: the data set has slides 1 to {len(sources)}")
    return [sources[i - 1] for i in sorted(set(only))]


def tile_slides(
    data: PathLike,
    out_dir: PathLike,
    params: TileParams,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    workers: Optional[int] = None,
    db_backend: Optional[str] = None,
    stain: Optional[StainRecord] = None,
    only: Optional[Sequence[int]] = None,
    qc: bool = True,
    write_tiles: bool = True,
) -> Optional[TileSet]:
    """Tile every slide of ``data`` (class folders or a ``slide,label[,case]`` CSV) into ``out_dir``.

    Args:
        params: tile size, microns per pixel or level, stride, --min-tissue, --resize.
        db_backend: ``leveldb`` or ``lmdb``: each slide's tiles go to ``<stem>_<backend>`` (Caffe
            Datums keyed ``<index:08d>_<name>``) instead of tile files.
        stain: a fitted stain normalisation applied to every tile as it is read (its record goes
            to ``out_dir/stain.json`` and into the manifests).
        only: 1-based slide numbers (in manifest order) to tile now: one array task's share.
        qc: write ``qc/<stem>_mask.png`` and ``qc/<stem>_grid.png``.
        write_tiles: False plans the tiles and writes the manifests only (no tile files, no
            databases): ``dbs --images`` then cuts the tiles straight from the slides.

    Returns the tile set once every slide is complete (tiles.json, tiles.csv and manifest.json
    written), else None (other slides are left to other tasks or a rerun).
    """
    out_dir = Path(out_dir)
    if db_backend is not None:
        db_backend = store.check_backend(db_backend)
        if not write_tiles:
            raise ConfigError("--db and --manifest-only are alternatives: the databases hold the tiles")
    sources = scan_slides(data, classes)
    check_writable(out_dir)
    transform = None if stain is None else stain.transform
    selected = _select(sources, only)
    done: dict[str, tuple[SlideRecord, List[Tile]]] = {}
    expected = {s.slide: _done_content(params, s, db_backend, transform, write_tiles) for s in sources}
    _collect_done(out_dir, sources, expected, done)
    todo = [s for s in selected if s.slide not in done]
    if len(todo) < len(selected):
        log.info("tiles: %d slide(s) complete from an earlier run, kept", len(selected) - len(todo))
    unchanged = 0
    with contextlib.ExitStack() as held:
        todo = [s for s in todo if _lock_slide(held, out_dir, s)]
        plans = [_Plan(s, out_dir, params, qc) for s in todo]
        planned: list[tuple[SlideSource, SlideRecord, List[Tile]]] = []
        for source, result in zip(todo, imap(_plan_one, plans, workers=workers, desc="tissue", unit="slide")):
            if result.problem:
                raise InputError(result.problem)
            assert result.record is not None
            planned.append((source, result.record, result.tiles))
            log.info("tiles: %s: %d of %d grid tiles with tissue >= %g (%.1f%% tissue)", source.slide,
                     result.record.tiles, result.record.candidates, params.min_tissue,
                     100 * result.record.tissue_fraction)
            if not result.tiles:  # it stays in the manifest (a slide of the set), with no patches to train on
                log.warning("warning: %s: no tile has tissue >= %g (see %s/%s)", source.path, params.min_tissue,
                            TILE_QC_DIR, TILE_GRID_PNG.format(slide=source.slide))
        for source, record, tiles in planned:
            unchanged += _write_slide(out_dir, source, record, tiles if write_tiles else [], params, db_backend,
                                      transform, workers, expected[source.slide], tiles)
            done[source.slide] = (record, tiles)
            log.info("tiles: %s: %d tiles written (%d of %d slides complete)", source.slide, len(tiles),
                     len(done), len(sources))
    # slides other processes completed meanwhile: each reads after writing its own, so the last of
    # several array tasks to finish sees them all and writes the manifest
    _collect_done(out_dir, sources, expected, done)
    missing = [s.slide for s in sources if s.slide not in done]
    if missing:
        log.info("tiles: %d of %d slides complete; %s and %d more to go (rerun or other array tasks)",
                 len(done), len(sources), missing[0], len(missing) - 1)
        return None
    stain_json = None if transform is None else {**transform.to_json(), "unchanged_tiles": unchanged}
    records = [done[s.slide][0] for s in sources]
    tile_set = TileSet(params, list(classes), records, [t for s in sources for t in done[s.slide][1]],
                       os.fspath(Path(data).resolve()), db_backend, stain_json, files=write_tiles and db_backend is None)
    if stain is not None:
        write_record(out_dir / STAIN_RECORD, stain)
    else:
        (out_dir / STAIN_RECORD).unlink(missing_ok=True)
    write_tile_set(out_dir, tile_set)
    log.info("tiles: %d slides, %d tiles in %s", len(records), len(tile_set.tiles), out_dir)
    return tile_set


def _lock_slide(held: contextlib.ExitStack, out_dir: Path, source: SlideSource) -> bool:
    """Lock ``source`` for this process; False (and a note) when another process is tiling it."""
    try:
        held.enter_context(locks.folder_lock(out_dir / TILE_DONE_DIR, wait=False,
                                             name=locks.target_lock_name(source.slide)))
    except locks.LockError as exc:
        log.info("tiles: %s: left to the process tiling it now (%s)", source.slide, exc)
        return False
    return True


def remove_extra_tiles(out_dir: Path, slide: str, keep: int) -> None:
    """Remove ``slide``'s tile files numbered above ``keep``, left by a tiling with other parameters
    (the manifest would not list them, but they would mix with the new ones in the folder)."""
    prefix = f"{slide}_sub_"
    for path in out_dir.glob(glob.escape(prefix) + "*" + PATCH_SUFFIX):
        number = path.name[len(prefix):-len(PATCH_SUFFIX)]
        if number.isdigit() and int(number) > keep:
            path.unlink(missing_ok=True)


def _write_slide(out_dir: Path, source: SlideSource, record: SlideRecord, tiles: List[Tile], params: TileParams,
                 db_backend: Optional[str], transform: Optional[StainTransform], workers: Optional[int],
                 expected: dict, planned: List[Tile]) -> int:
    """Write one slide's ``tiles`` (files or its database; none: manifest only) and then its
    completion record of the ``planned`` ones; the count of tiles the stain normalisation left unchanged."""
    done_path = done_record_path(out_dir, source.slide)
    done_path.unlink(missing_ok=True)  # an older record must not vouch for tiles being rewritten
    remove_extra_tiles(out_dir, source.slide, 0 if db_backend is not None else len(tiles))
    pixels = CHUNK_PIXELS
    if db_backend is not None:
        pixels = min(pixels, DB_IN_FLIGHT_PIXELS // (LOOKAHEAD * resolve_workers(workers, len(tiles))))
    jobs = [_Chunk(chunk, out_dir, db_backend is not None, transform)
            for chunk in chunks_of(tiles, params.out_size, pixels)]
    unchanged = 0
    weights = [len(job.tiles) for job in jobs]
    results = imap(_tile_chunk, jobs, workers=workers, desc=f"tiles {source.slide}", unit="tile", weights=weights)
    if db_backend is None or not tiles:
        for result in results:
            unchanged += result.unchanged
    else:
        db_path = out_dir / TILE_DB.format(slide=source.slide, backend=db_backend)
        with store.open_writer(db_path, db_backend, overwrite=True) as writer:
            for result in results:
                for key, value in result.records:
                    writer.put(key, value)
                unchanged += result.unchanged
    atomic_write_json(done_path, {**expected, "slide": record.to_json(), "tiles": [t.__dict__ for t in planned]})
    faults.event("tiles:slide")
    return unchanged


# --------------------------------------------------------------------------- the run's stage
def run_tile_params(o: RunOptions) -> TileParams:
    """The tile parameters of a run over slides (``--tile-size`` and friends)."""
    extra = {} if o.min_tissue is None else {"min_tissue": o.min_tissue}
    return TileParams(o.tile_size, mpp=o.tile_mpp, level=o.tile_level, stride=o.tile_stride, resize=o.tile_resize,
                      **extra)


class TilesStage(Stage):
    """Step 1 for whole slides: the tissue tiles of every slide as patch files (with ``--direct``
    none: the databases are built from the slides) and the tile manifest (``subs/``), which folds,
    dbs, render and train read as they read patches."""

    name = "tiles"
    reads = ("DATA/CLASS/*.svs|tif|…",)
    writes = (f"{PATCH_DIR}/{TILE_SET}", f"{PATCH_DIR}/{TILE_TABLE}", f"{PATCH_DIR}/{MANIFEST_NAME}",
              f"{PATCH_DIR}/*_sub_N.tif")

    def enabled(self, o: RunOptions) -> bool:
        return o.slides

    def check(self, o: RunOptions) -> None:
        try:
            run_tile_params(o)  # the tile options' one-line errors, before any stage
        except ConfigError as exc:  # named as `run` spells them (--tile-mpp for the tiler's --mpp)
            raise ConfigError(re.sub(r"--(size|mpp|level|stride|resize)\b", r"--tile-\1", exc.detail)) from None
        check_stain(o, "tiles", "slides")

    def params(self, o: RunOptions) -> dict:
        stain = {} if o.direct else stain_key(o)  # with --direct the tiles are normalised by `dbs`
        return {"data": o.where(o.data_dir), "classes": list(o.classes), "tiles": run_tile_params(o).to_json(),
                "direct": o.direct, **stain}

    def fingerprint(self, o: RunOptions) -> str:
        return input_fingerprint(o.data_dir, o.classes, SLIDE_SOURCE)

    def complete(self, o: RunOptions) -> bool:
        out = Path(o.workdir) / PATCH_DIR
        return (out / TILE_SET).is_file() and (out / MANIFEST_NAME).is_file()

    def run(self, o: RunOptions, fresh: bool) -> None:
        out = Path(o.workdir) / PATCH_DIR
        if fresh and out.exists():
            shutil.rmtree(out)
        # Not fresh: the slides a killed run completed are kept (their completion records).  With
        # --direct only the manifest: the dbs stage reads the tiles from the slides.
        tile_slides(o.data_dir, out, run_tile_params(o), classes=o.classes, workers=o.workers,
                    stain=None if o.direct else stain_target_record(o), write_tiles=not o.direct)


STAGE = TilesStage()
