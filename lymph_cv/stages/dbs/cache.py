"""Databases straight from the source images (``dbs --images``): the patches the lists name, cut once into
a shared array (shared memory, or a temporary file when it would not fit), never written as files.
For a tile manifest (``slides tile``, ``tiles.json`` beside manifest.json) the patches are the
slides' tiles, read from the slides as the tiler reads them."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from lymph_cv.formats import leveldb_tables, store
from lymph_cv.formats.caffe.rawdatum import datum_table, empty_datum_table, raw_pixel_offset, serialize_datums
from lymph_cv.formats.caffe.mean import MeanAccumulator
from lymph_cv.errors import InputError, LymphCVError
from lymph_cv.core.fsutil import remove_path, temp_sibling
from lymph_cv.core.memory import available_memory, collector_paused
from lymph_cv.core.workers import fork_available, imap
from lymph_cv.stages.patches import (
    MANIFEST_NAME, BadInputs, Manifest, SourceImage, extract, load_manifest, patch_count, read_for_patches,
)
from lymph_cv.stages.stain import StainTransform
from lymph_cv.stages.stain import hook as stain_hook
from lymph_cv.stages.tiles import Tile, read_tile, read_tile_set
from lymph_cv.formats.slides import open_slide
from lymph_cv.stages.dbs.convert import DbResult, DbTask, save_mean_or_drop, write_db_batches
from lymph_cv.stages.dbs.lists import PATCH_NAME, read_image_list, shuffled_order
from lymph_cv.workdir.layout import PATCH_DIR, TILE_SET
from lymph_cv.workdir.lists import ListEntry, read_list_text

log = logging.getLogger(__name__)

#: Records gathered per batch from the patch array.
BATCH = 1024


#: Shared memory blocks by token: created before the worker pools fork, so the workers write and
#: read the same pages (no disk file, no writeback).
_SHARED: dict[str, mmap.mmap] = {}
#: The memory file (memfd) of each block, by token: database builds read their rows through it
#: with pread (nothing mapped, so nothing of the block is resident in them).
_SHARED_FILES: dict[str, int] = {}
#: Colour patches: OpenCV's colour imread gives 3 channels.
COLOR_CHANNELS = 3
#: Use shared memory when the patch array takes at most this share of the available memory (MemAvailable).
SHARED_MEMORY_SHARE = 0.5


def _free_memory() -> int:
    return available_memory() or 0


@dataclass(frozen=True)
class PatchCache:
    """Every patch the lists need, cut from the source images into one uint8 array.

    Row ``offsets[stem] + i - 1`` holds patch ``<stem>_sub_<i>`` as C·H·W bytes; rows of
    images that could not be read (``skip_bad``) are listed in ``unreadable``.  The array
    lives in shared memory (``token`` in ``_SHARED``; workers are forked) or, when it would
    not fit, in a temporary file (``token`` is its path).
    """

    token: str
    in_memory: bool
    rows: int
    shape: tuple[int, int, int]
    offsets: dict[str, int]
    counts: dict[str, int]
    unreadable: frozenset = frozenset()

    @property
    def row_size(self) -> int:
        return int(np.prod(self.shape))

    def open(self, writable: bool = False) -> np.ndarray:
        """The (rows, C·H·W) array."""
        shape = (self.rows, self.row_size)
        if self.in_memory:
            return np.frombuffer(_SHARED[self.token], np.uint8, count=self.rows * self.row_size).reshape(shape)
        return np.memmap(self.token, np.uint8, "r+" if writable else "r", shape=shape)

    def release(self, first_row: int = 0, rows: Optional[int] = None) -> None:
        """Drop this process's resident pages of rows ``first_row …`` (all by default); the data stays.

        The shared block is MAP_SHARED: after MADV_DONTNEED its pages are refilled from the shared
        object, not zeroed.  So every process touching the whole array (each database build gathers
        from all of it) keeps its own RSS small.  A file-backed array is released by dropping the
        mapping (:meth:`open` again).
        """
        if not self.in_memory:
            return
        page = mmap.PAGESIZE
        start = -(-first_row * self.row_size // page) * page
        end = (self.rows if rows is None else first_row + rows) * self.row_size // page * page
        if end > start:
            _SHARED[self.token].madvise(mmap.MADV_DONTNEED, start, end - start)

    def remove(self) -> None:
        _ROWS_BY_NAME.pop(self.token, None)  # this process's name → row map (built here with workers=1)
        if self.in_memory:
            block = _SHARED.pop(self.token, None)
            if block is not None:
                with contextlib.suppress(BufferError):  # a view still alive: freed with it
                    block.close()
            fd = _SHARED_FILES.pop(self.token, None)
            if fd is not None:
                os.close(fd)
        else:
            remove_path(Path(self.token))

    @contextlib.contextmanager
    def reading_file(self) -> Iterator[Optional[int]]:
        """A file descriptor of the array's bytes for pread (None when it has none: anonymous memory)."""
        if self.in_memory:
            yield _SHARED_FILES.get(self.token)
            return
        fd = os.open(self.token, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            yield fd
        finally:
            os.close(fd)

    def row_of(self, name: str) -> Optional[int]:
        """Row of a patch file name, or None when it is not a patch of a known image."""
        match = PATCH_NAME.match(name.rsplit("/", 1)[-1])
        if not match:
            return None
        stem, index = match.group("stem"), int(match.group("index"))
        if stem not in self.offsets or not 1 <= index <= self.counts[stem]:
            return None
        return self.offsets[stem] + index - 1

    @classmethod
    def build(cls, workdir: Path, images: Path, lists: Sequence[tuple[Path, Optional[int]]], record: dict,
              workers: Optional[int], bad: BadInputs, stain: Optional[StainTransform] = None) -> "PatchCache":
        manifest = _manifest_for(workdir, record)
        needed: set[str] = set().union(*imap(_listed_stems, lists, workers=workers))
        by_stem = {e.stem: e for e in manifest.images}
        unknown = sorted(needed - set(by_stem))
        if unknown:
            raise InputError(f"patches of {unknown[0]!r} are listed but the image is not in the manifest", manifest.path)
        chosen = [by_stem[s] for s in sorted(needed, key=lambda s: (by_stem[s].label, by_stem[s].name))]
        shape = (COLOR_CHANNELS, manifest.patch_size, manifest.patch_size)
        offsets, counts, total = {}, {}, 0
        for entry in chosen:
            offsets[entry.stem], counts[entry.stem] = total, entry.patches
            total += entry.patches
        size = max(total, 1) * int(np.prod(shape))
        in_memory = fork_available() and size <= SHARED_MEMORY_SHARE * _free_memory()
        if in_memory:
            token = f"patches-{os.getpid()}-{len(_SHARED)}-{time.monotonic_ns()}"
            _SHARED[token] = _shared_block(token, size)
        else:
            token = os.fspath(temp_sibling(workdir / "patch-cache.u8"))
            np.memmap(token, np.uint8, "w+", shape=(size,)).flush()
        cache = cls(token, in_memory, total, shape, offsets, counts)
        try:
            tiles = slide_tiles(manifest)
            if tiles is None:
                jobs = [(cache, SourceImage(images / e.cls / e.name, e.cls, e.label), e.stem, manifest.step, stain)
                        for e in chosen]
                cut = _cut_image
            else:  # the slide's tiles in place of the window step
                jobs = [(cache, SourceImage(Path(tiles[e.stem][0].path) if tiles[e.stem] else images / e.cls / e.name,
                                            e.cls, e.label), e.stem, tiles[e.stem], stain) for e in chosen]
                cut = _cut_slide
            unreadable = set()
            done = imap(cut, jobs, workers=workers, desc="cut", unit="img")
            for (_, source, stem, _, _), (problem, conversion, unchanged) in zip(jobs, done):
                if problem:
                    bad.problem(problem)
                    unreadable.add(stem)
                if unchanged:
                    log.warning("warning: %s: stain normalisation left it unchanged (too little tissue)", source.path)
                bad.converted(conversion, source.path)
        except BaseException:
            cache.remove()
            raise
        return dataclasses.replace(cache, unreadable=frozenset(unreadable))


def _shared_block(token: str, size: int) -> mmap.mmap:
    """A shared memory block of ``size`` bytes; backed by a memory file (kept in ``_SHARED_FILES``) where
    the system has them, so readers can pread it."""
    if not hasattr(os, "memfd_create"):
        return mmap.mmap(-1, size)
    fd = os.memfd_create("lymph_cv-patches", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        block = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    _SHARED_FILES[token] = fd
    return block


def _listed_stems(job: tuple[Path, Optional[int]]) -> set[str]:
    """The image stems a list's patch names come from.

    A list whose every line holds ``_sub_`` is scanned in bulk (each line's part before its last
    ``_sub_``); each database build checks its list in full (:func:`_cache_rows`).  Any other list
    is read and checked here, line by line, so a bad line is named before anything is cut.
    """
    list_path, num_labels = job
    heads = {line.rpartition("_sub_")[0] for line in read_list_text(list_path).splitlines()}
    if "" not in heads:
        stems = {head.rsplit("/", 1)[-1] for head in heads}
        if "" not in stems:
            return stems
    stems = set()
    for entry in read_image_list(list_path, num_labels):
        match = PATCH_NAME.match(entry.name.rsplit("/", 1)[-1])
        if not match:
            raise InputError(f"line {entry.line}: {entry.name!r} is not a patch name (<image>_sub_<i>.tif)", list_path)
        stems.add(match.group("stem"))
    return stems


def digest_of_manifest(workdir: Path, record: dict) -> Optional[str]:
    """SHA-256 of the patch manifest the lists come from (None without one).

    The lists name patches only; a rerun of ``patches`` with another window size rewrites
    the files under the same names, so a database is current only for the same manifest.
    """
    path = _manifest_path(workdir, record)
    tile_set = path.parent / TILE_SET  # a tile manifest: the tiles' parameters too (mpp, level, …)
    try:
        return hashlib.sha256(path.read_bytes() + (tile_set.read_bytes() if tile_set.is_file() else b"")).hexdigest()
    except OSError:
        return None


def _manifest_path(workdir: Path, record: dict) -> Path:
    relative = record.get("manifest")
    return workdir / relative if relative else workdir / PATCH_DIR / MANIFEST_NAME


def _manifest_for(workdir: Path, record: dict) -> Manifest:
    return load_manifest(_manifest_path(workdir, record))


def is_tile_manifest(workdir: Path, record: dict) -> bool:
    """Whether the folds of ``record`` (folds.json) come from a tile manifest (``slides tile``)."""
    return (_manifest_path(workdir, record).parent / TILE_SET).is_file()


def _cut_image(job: tuple["PatchCache", SourceImage, str, int, Optional[StainTransform]],
               ) -> tuple[Optional[str], Optional[str], bool]:
    """Cut one image's patches straight into its rows of the shared array (problem, conversion, unchanged)."""
    cache, source, stem, step, stain = job
    transform = stain_hook(stain)
    try:
        read = read_for_patches(source, cache.shape[1], step, transform)
    except LymphCVError as exc:
        return str(exc), None, False
    count = cache.counts[stem]
    found = patch_count(read.bgr.shape[0], read.bgr.shape[1], cache.shape[1], step)
    if found != count:
        return f"{source.path}: has {found} patches now, {count} when the manifest was written", None, False
    fd = _SHARED_FILES.get(cache.token) if cache.in_memory else None
    if fd is None:
        rows = cache.open(writable=True)[cache.offsets[stem] : cache.offsets[stem] + count]
        extract(read.bgr, cache.shape[1], step, channels_first=True, out=rows)
        cache.release(cache.offsets[stem], count)  # written: the other processes read it from the shared block
    else:
        # Cut into this process's warm buffer and written with pwrite: no page of the shared block
        # is faulted into this process (nor dropped after).
        rows = _scratch(count * cache.row_size)
        extract(read.bgr, cache.shape[1], step, channels_first=True, out=rows)
        _pwrite_all(fd, rows, cache.offsets[stem] * cache.row_size)
    return None, read.conversion, transform is not None and transform.unchanged


#: This process's buffer for cutting one image (kept: a fresh one faults in every page again).
_SCRATCH: list[np.ndarray] = []


def _scratch(size: int) -> np.ndarray:
    if not _SCRATCH or _SCRATCH[0].size < size:
        _SCRATCH[:] = [np.empty(size, np.uint8)]
    return _SCRATCH[0][:size]


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def slide_tiles(manifest: Manifest) -> Optional[dict[str, list[Tile]]]:
    """Slide id → its tiles when ``manifest`` is a tile manifest (tiles.json beside it), else None."""
    if manifest.path is None or not (manifest.path.parent / TILE_SET).is_file():
        return None
    tile_set = read_tile_set(manifest.path.parent)
    by_slide: dict[str, list[Tile]] = {record.slide: [] for record in tile_set.slides}
    for tile in tile_set.tiles:
        by_slide.setdefault(tile.slide, []).append(tile)
    return by_slide


def _cut_slide(job: tuple["PatchCache", SourceImage, str, list, Optional[StainTransform]],
               ) -> tuple[Optional[str], Optional[str], bool]:
    """Read one slide's tiles straight into its rows of the shared array (problem, None, unchanged)."""
    cache, source, stem, tiles, stain = job
    transform = stain_hook(stain)
    count = cache.counts[stem]
    if len(tiles) != count:
        return f"{source.path}: has {len(tiles)} tiles in tiles.csv, {count} in the manifest", None, False
    unchanged = False
    try:
        with open_slide(source.path) as slide:
            rows = cache.open(writable=True)[cache.offsets[stem]: cache.offsets[stem] + count]
            for row, tile in zip(rows, tiles):
                row[...] = read_tile(slide, tile, transform).transpose(2, 0, 1).reshape(-1)
                unchanged |= transform is not None and transform.unchanged
    except LymphCVError as exc:
        return str(exc), None, False
    cache.release(cache.offsets[stem], count)
    return None, None, unchanged


#: Per patch array (token), the rows of the names this process has looked up: each patch is named
#: in several databases (4 of the 5 folds' training lists), and a worker builds several of them.
_ROWS_BY_NAME: dict[str, dict[str, int]] = {}
#: Marks a name not looked up yet.
_UNKNOWN_ROW = -2


def _cache_rows(task: DbTask, entries: Sequence[ListEntry], bad: BadInputs) -> np.ndarray:
    """Array row of every list entry; -1 for patches of unreadable images (skipped)."""
    cache = task.cache
    if cache.unreadable:
        return _rows_of(task, entries, bad, range(len(entries)))
    known = _ROWS_BY_NAME.setdefault(cache.token, {})
    with collector_paused():  # no cycles among the names made; the collections cost as much as the lookups
        rows = np.fromiter(map(known.get, [e.name for e in entries], itertools.repeat(_UNKNOWN_ROW)), np.int64,
                           len(entries))
        missing = np.flatnonzero(rows == _UNKNOWN_ROW)
        if len(missing):
            rows[missing] = _rows_of(task, entries, bad, missing.tolist())
            known.update(zip([entries[p].name for p in missing.tolist()], rows[missing].tolist()))
    return rows


def _rows_of(task: DbTask, entries: Sequence[ListEntry], bad: BadInputs, positions: Sequence[int]) -> np.ndarray:
    """Rows of the entries at ``positions``, each name parsed (the bad ones named)."""
    cache = task.cache
    rows = np.empty(len(positions), np.int64)
    for at, position in enumerate(positions):
        entry = entries[position]
        row = cache.row_of(entry.name)
        if row is None and not PATCH_NAME.match(entry.name.rsplit("/", 1)[-1]):
            raise InputError(f"line {entry.line}: {entry.name!r} is not a patch name (<image>_sub_<i>.tif)", task.list_path)
        if row is None:
            raise InputError(f"line {entry.line}: {entry.name!r} is not a patch of an image in the manifest", task.list_path)
        if cache.unreadable and PATCH_NAME.match(entry.name.rsplit("/", 1)[-1]).group("stem") in cache.unreadable:
            bad.problem(f"{task.list_path}: line {entry.line}: {entry.name} skipped, its image is unreadable")
            row = -1
        rows[at] = row
    return rows


#: Rows a database build gathers from the patch array before it drops its resident copy of it.
#: A read fault maps the 64 KiB around the page (the kernel's fault-around), so 8,192 random rows
#: leave up to ~512 MiB of the array resident in this process.
RELEASE_ROWS = 8192


def _cache_batches(
    cache: PatchCache, entries: Sequence[ListEntry], order: np.ndarray, rows: np.ndarray,
    accumulator: Optional[MeanAccumulator],
) -> Iterator[tuple[list[bytes], Union[list[bytes], np.ndarray]]]:
    """(keys, values) of the database in order, BATCH records at a time, assembled as arrays (the
    values as one array of records when they have one length).

    With the native module the records are assembled around rows read with pread from the array's
    file, straight into their places (nothing of the array becomes resident here); else the rows
    are gathered from the mapped array, dropped from this process every RELEASE_ROWS rows.
    """
    labels = np.fromiter((e.label for e in entries), np.int64, len(entries))
    names = [entry.name.encode() for entry in entries]
    pixels_at = raw_pixel_offset(*cache.shape)
    with cache.reading_file() as fd:
        native = fd is not None and leveldb_tables.available()
        array, gathered = (None, 0) if native else (cache.open(), 0)
        for start in range(0, len(order), BATCH):
            positions = order[start : start + BATCH]
            wanted = rows[positions]
            keep = wanted >= 0
            # Skipped lines still consume their index, as with missing patch files.
            indices = np.arange(start, start + len(positions))[keep]
            positions, wanted = positions[keep], wanted[keep]
            if not len(wanted):
                continue
            keys = store.make_keys(indices.tolist(), map(names.__getitem__, positions.tolist()))
            table = empty_datum_table(cache.shape, labels[positions]) if native else None
            if table is not None:
                leveldb_tables.pread_rows(fd, wanted, cache.row_size, table, pixels_at)
                block = table[:, pixels_at : pixels_at + cache.row_size]
            else:
                if array is None:
                    array = cache.open()
                block = np.asarray(array[wanted])
                gathered += len(block)
            if accumulator is not None:
                accumulator.add_batch(block, cache.shape)
            if table is None:
                table = datum_table(block.reshape((len(block),) + cache.shape), labels[positions])
            yield keys, serialize_datums(block, cache.shape, labels[positions]) if table is None else table
            if gathered >= RELEASE_ROWS:
                cache.release()
                array, gathered = cache.open(), 0


def build_from_cache(task: DbTask) -> DbResult:
    started = time.perf_counter()
    entries = read_image_list(task.list_path, task.num_labels)
    order = shuffled_order(len(entries), task.seed)
    bad = BadInputs(task.skip_bad)
    rows = _cache_rows(task, entries, bad)
    accumulator = MeanAccumulator() if task.mean_path is not None else None
    count = write_db_batches(task.db_path, task.backend, _cache_batches(task.cache, entries, order, rows, accumulator))
    means = None if accumulator is None else save_mean_or_drop(task.mean_path, accumulator, task.db_path)
    return DbResult(os.fspath(task.db_path), count, len(entries), time.perf_counter() - started,
                    None if task.mean_path is None else os.fspath(task.mean_path), means, bad.problems, dict(bad.conversions))
