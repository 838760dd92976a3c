"""One list → one database, as Caffe's ``convert_imageset`` does: its image options, the records (decoded
by worker processes, written by one), the database and its mean."""
from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence, Union

from lymph_cv.core import faults, forkpipe, rawtiff, timeline
from lymph_cv.core.badinputs import BadInputs
from lymph_cv.core.fsutil import remove_path
from lymph_cv.core.imagefiles import FolderReader
from lymph_cv.core.memory import collector_paused
from lymph_cv.errors import ConfigError, InputError, LymphCVError, StoreError
from lymph_cv.formats import store
from lymph_cv.stages.dbs import lists
from lymph_cv.stages.dbs.lists import read_image_list
from lymph_cv.workdir.lists import ListEntry

if TYPE_CHECKING:
    import numpy as np

    from lymph_cv.formats.caffe.mean import MeanAccumulator

# numpy, OpenCV, protobuf and the mean are imported where needed: ``convert_imageset`` on the
# tutorial's patch files needs none of them where the native reader is built
# (:mod:`lymph_cv.formats.convread`; else :mod:`lymph_cv.core.rawtiff`'s numpy path), and their
# imports cost a tenth of it.

log = logging.getLogger(__name__)

DEFAULT_BACKEND = store.LEVELDB
DEFAULT_SEED = 0
#: File extensions that name the same encoding.
_SAME_ENCODING = {"jpeg": "jpg", "tiff": "tif"}


#: Image formats offered in the -encode_type error (those this OpenCV can write).
_ENCODE_TYPES = ("bmp", "jpg", "jpeg", "jpe", "png", "tif", "tiff", "webp", "ppm", "pgm", "pbm", "pnm", "sr", "ras", "jp2")


@dataclass(frozen=True)
class ImageOptions:
    """``convert_imageset``'s image options."""

    gray: bool = False
    resize_width: int = 0
    resize_height: int = 0
    encoded: bool = False
    encode_type: str = ""
    check_size: bool = False

    def __post_init__(self):
        if not self.encode_type:
            return
        import cv2

        if not cv2.haveImageWriter("x." + self.encode_type):
            raise ConfigError(f"-encode_type: OpenCV cannot encode images as {self.encode_type!r}",
                              valid=[kind for kind in _ENCODE_TYPES if cv2.haveImageWriter("x." + kind)])

    @property
    def resize(self) -> bool:
        return self.resize_width > 0 and self.resize_height > 0

    @property
    def plain(self) -> bool:
        """Pixels as the colour ``imread`` reads them: nothing converted, resized or re-encoded."""
        return not (self.gray or self.resize or self.encoded)


PLAIN = ImageOptions()


def _read_pixels(path: Union[str, Path], options: ImageOptions) -> tuple[np.ndarray, Optional[str]]:
    """(H, W, C) uint8 as Caffe's ReadImageToCVMat gives it, and any colour conversion."""
    import cv2

    from lymph_cv.core.images import read_gray, read_image

    if options.gray:
        image = read_gray(path)
        conversion = None
    else:
        read = read_image(path)
        image, conversion = read.bgr, read.conversion
    if options.resize:
        image = cv2.resize(image, (options.resize_width, options.resize_height))
    if image.ndim == 2:
        image = image[:, :, None]
    return image, conversion


def record_value(
    path: Union[str, Path], label: int, options: ImageOptions = PLAIN,
) -> tuple[bytes, Optional[np.ndarray], Optional[str]]:
    """Serialized Datum of one image file, its (C, H, W) pixels (None when encoded), any conversion."""
    import cv2

    from lymph_cv.formats.caffe.datum import encoded_datum
    from lymph_cv.formats.caffe.rawdatum import serialize_datum

    if not options.encoded:
        image, conversion = _read_pixels(path, options)
        chw = image.transpose(2, 0, 1)
        return serialize_datum(chw, label), chw, conversion
    path = Path(path)
    encoding = options.encode_type or path.suffix.lstrip(".").lower()
    image, conversion = _read_pixels(path, options)
    same_kind = (image.shape[2] == 3) == (not options.gray)
    if same_kind and not options.resize and _same_extension(path, encoding):
        data = path.read_bytes()  # Caffe stores the file verbatim in this case
    else:
        try:
            ok, buffer = cv2.imencode("." + encoding, image)
        except cv2.error:
            ok = False
        if not ok:
            raise ConfigError(f"OpenCV cannot encode images as {encoding!r}")
        data = buffer.tobytes()
    return encoded_datum(data, label).SerializeToString(), None, conversion


def _same_extension(path: Path, encoding: str) -> bool:
    ext = path.suffix.lstrip(".").lower()
    return _SAME_ENCODING.get(ext, ext) == _SAME_ENCODING.get(encoding.lower(), encoding.lower())


@dataclass
class DbResult:
    """What building one database produced."""

    path: str
    records: int
    lines: int
    seconds: float
    mean_path: Optional[str] = None
    channel_means: Optional[list[float]] = None
    problems: list[str] = field(default_factory=list)
    conversions: dict[str, list[str]] = field(default_factory=dict)


def _disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)


@contextlib.contextmanager
def _store_errors(db_path) -> Iterator[None]:
    """OS and backend errors while writing ``db_path`` as StoreErrors naming it (disk full said so)."""
    try:
        yield
    except LymphCVError:
        raise
    except Exception as exc:
        if _disk_full(exc):
            raise StoreError("no space left on device", db_path) from exc
        if isinstance(exc, OSError):
            raise StoreError(f"cannot write database ({exc.strerror or exc})", db_path) from exc
        raise


def write_db(
    db_path: Union[str, os.PathLike],
    backend: str,
    records: Iterable[tuple[bytes, bytes, Optional[np.ndarray]]],
    *,
    overwrite: bool = False,
    accumulator: Optional[MeanAccumulator] = None,
    check_size: bool = False,
    progress_every: int = store.COMMIT_EVERY,
    progress=None,
) -> int:
    """Write ``(key, value, pixels)`` records to a new database and return how many.

    ``accumulator`` receives every record's pixels (for the mean file); ``check_size``
    rejects a record whose pixel count differs from the first's (Caffe's ``-check_size``);
    ``progress(count)`` is called every ``progress_every`` records.  An empty result or an
    error leaves nothing under ``db_path``.
    """
    count = 0
    first_size: Optional[int] = None
    with _store_errors(db_path), store.open_writer(db_path, backend, overwrite=overwrite) as writer:
        for key, value, pixels in records:
            if check_size and pixels is not None:
                if first_size is None:
                    first_size = pixels.size
                elif pixels.size != first_size:
                    raise InputError(f"record {key.decode(errors='replace')} has {pixels.size} values, "
                                     f"the first had {first_size} (-check_size)")
            writer.put(key, value)
            if accumulator is not None:
                if pixels is None:
                    raise ConfigError("a mean needs raw (not encoded) records")
                accumulator.add(pixels)
            count += 1
            if progress is not None and count % progress_every == 0:
                progress(count)
        if count == 0:
            raise InputError("no readable record; nothing to write", db_path)
    return count


def write_db_batches(db_path: Union[str, os.PathLike], backend: str,
                     batches: Iterable[tuple[list[bytes], Union[list[bytes], np.ndarray]]]) -> int:
    """Write ``(keys, values)`` batches to a new database (replacing one there); the record count.

    :func:`write_db` for records assembled in bulk (no per-record checks); same errors.  ``values``
    is a list of bytes or a 2-D uint8 array whose rows are the values (no bytes object per record).
    """
    import numpy as np

    count = 0
    with _store_errors(db_path), store.open_writer(db_path, backend, overwrite=True) as writer:
        for keys, values in batches:
            if isinstance(values, np.ndarray):
                writer.put_fixed(keys, values, values.shape[1])
            else:
                writer.put_many(keys, values)
            count += len(keys)
        if count == 0:
            raise InputError("no readable record; nothing to write", db_path)
    return count


def save_mean(path: Union[str, os.PathLike], accumulator: MeanAccumulator) -> list[float]:
    """Write the accumulated mean as a Caffe mean file; return compute_image_mean's channel values."""
    from lymph_cv.formats.caffe.blob import write_mean
    from lymph_cv.formats.caffe.mean import channel_means

    mean = accumulator.mean()
    try:
        write_mean(path, mean)
    except OSError as exc:
        raise StoreError("no space left on device" if _disk_full(exc) else f"cannot write ({exc.strerror})", path) from exc
    return channel_means(mean)


def save_mean_or_drop(mean_path, accumulator: MeanAccumulator, db_path) -> list[float]:
    """Write the mean of a database just built; if that fails, remove the database too, so a
    rerun rebuilds the pair instead of finding a database without its mean (and asking for --overwrite)."""
    try:
        return save_mean(mean_path, accumulator)
    except BaseException:
        remove_path(Path(db_path))
        raise


#: List lines read per job (amortises the hand-over between processes: about a megabyte of records).
DECODE_CHUNK = 256
#: Bytes of each memory slot a reader hands its chunks over in (forkpipe's shared_bytes; a larger
#: chunk goes through the pipe): 256 patch records of up to 16 KiB.
SHARED_CHUNK_BYTES = 4 << 20
#: The fault-suite event at each of convert_list's progress lines (``int@convert:records#2`` …).
RECORDS_EVENT = "convert:records"


class _ChunkReader:
    """Reads and decodes ``DECODE_CHUNK`` consecutive records of the database order per call.

    Plain uncompressed RGB TIFFs (the tutorial's patch files) are read in bulk
    (:mod:`lymph_cv.core.rawtiff`: the pixels OpenCV would give, without decoding); any other file,
    or any other image option, goes through OpenCV (:func:`record_value`).  A call returns what a
    forked reader sends the writer: a small header (key lengths, value lengths, shapes, conversions,
    problems; length 0 for a line skipped, a single value length and shape when all records share
    them) and the records' keys, then their values, back to back.
    """

    def __init__(self, root: str, concat_root: bool, options: ImageOptions, entries: Sequence[ListEntry],
                 positions: Sequence[int]):
        self.root, self.concat_root, self.options = root, concat_root, options
        self.entries, self.positions = entries, positions
        self.layout: Optional[rawtiff.Layout] = None
        self.files = FolderReader()
        # A path is prefix + name (``os.path.join`` of a relative name is the same string).
        self.prefix = root if concat_root else os.path.join(root, "")
        self.native = options.plain and lists.native_reading()

    def path(self, name: str) -> str:
        return self.root + name if self.concat_root else os.path.join(self.root, name)

    def close(self) -> None:
        """Close the folders the reads keep open."""
        self.files.close()
        if self.native:
            lists.convread.close_folders()

    def __call__(self, chunk: int) -> tuple[tuple, tuple]:
        start = chunk * DECODE_CHUNK
        if self.native:
            done = self._native(start)
            if done is not None:
                return done
        items = [self.entries[p] for p in self.positions[start : start + DECODE_CHUNK]]
        values: list[Optional[bytes]] = [None] * len(items)
        shapes: list[Optional[tuple]] = [None] * len(items)
        conversions: dict[int, str] = {}
        problems: dict[int, str] = {}
        whole = None
        if self.options.plain:
            files, problems = self.files.read_many([self.path(entry.name) for entry in items])
            whole = self._plain(items, files, values, shapes)
        if whole is None:
            self._decode(items, values, shapes, conversions, problems)
        keys = [b"" if i in problems else store.make_key(start + i, entry.name) for i, entry in enumerate(items)]
        key_lengths = [len(key) for key in keys]
        if whole is not None:  # every record from one table, in order: sent as it is
            return (key_lengths, whole.shape[1], shapes[0], conversions, problems), (b"".join(keys), whole)
        lengths = [0 if value is None else len(value) for value in values]
        return ((key_lengths, lengths, shapes, conversions, problems),
                (b"".join(keys), b"".join(value for value in values if value is not None)))

    def _native(self, start: int) -> Optional[tuple[tuple, tuple]]:
        """The chunk's result from :mod:`convread` when every file has the layout of the list's first
        plain TIFF; None otherwise (the chunk is then read the other way, which names any problem)."""
        layout = self.layout
        if layout is None:
            try:
                layout = self.layout = rawtiff.plain_layout(
                    self.files.read(self.path(self.entries[self.positions[start]].name)))
            except InputError:
                return None
            if layout is None:
                self.native = False  # not plain TIFFs: OpenCV decodes them
                return None
        count = min(DECODE_CHUNK, len(self.positions) - start)
        shape = (layout.head, layout.tail, layout.height, layout.width)
        if isinstance(self.entries, lists.ScannedList) and isinstance(self.positions, memoryview):
            got = lists.convread.plain_chunk(self.prefix, self.entries.text, self.entries.rows, self.positions, start,
                                             count, *shape)
        else:
            items = [self.entries[p] for p in self.positions[start : start + count]]
            got = lists.convread.plain_datums(self.prefix, [entry.name for entry in items],
                                              [entry.label for entry in items], start, *shape)
        if got is None:
            return None
        keys, key_lengths, values, length = got
        return (key_lengths, length, layout.chw, {}, {}), (keys, values)

    def _decode(self, items: list[ListEntry], values: list, shapes: list, conversions: dict, problems: dict) -> None:
        """The records not filled yet, through OpenCV."""
        for i, entry in enumerate(items):
            if values[i] is None and i not in problems:
                try:
                    values[i], pixels, conversion = record_value(self.path(entry.name), entry.label, self.options)
                except InputError as exc:
                    problems[i] = str(exc)
                    continue
                shapes[i] = None if pixels is None else pixels.shape
                if conversion is not None:
                    conversions[i] = conversion

    def _plain(self, items: list[ListEntry], files: dict[int, bytes], values: list,
               shapes: list) -> Optional[np.ndarray]:
        """Fill ``values`` and ``shapes`` of the files of plain layouts; instead the table of the records
        (:func:`datum_table`) when one layout holds every record of the chunk."""
        import numpy as np

        from lymph_cv.formats.caffe.rawdatum import datum_table, serialize_datum, split_table

        pending = list(files)
        while pending:
            layout = self.layout
            group = [] if layout is None else [i for i in pending if len(files[i]) == layout.size]
            if group:
                table = rawtiff.stack([files[i] for i in group], layout.size)
                same = rawtiff.match(layout, table)
                matched = [i for i, ok in zip(group, same.tolist()) if ok]
                if matched:
                    pixels = rawtiff.bgr_chw(layout, table if len(matched) == len(group) else table[same])
                    labels = np.array([items[i].label for i in matched], dtype=np.int64)
                    records = datum_table(pixels, labels)
                    if records is not None and len(matched) == len(items):
                        shapes[:] = [pixels.shape[1:]] * len(items)
                        return records
                    rows = split_table(records) if records is not None else \
                        [serialize_datum(image, int(label)) for image, label in zip(pixels, labels)]
                    for i, row in zip(matched, rows):
                        values[i], shapes[i] = row, pixels.shape[1:]
            pending = [i for i in pending if values[i] is None]
            if not pending:
                break  # the layout is kept for the next chunk
            self.layout = None
            while pending and self.layout is None:  # a file of another layout starts one
                self.layout = rawtiff.plain_layout(files[pending[0]])
                if self.layout is None:
                    pending.pop(0)  # not a plain TIFF: OpenCV decodes it
        return None


@contextlib.contextmanager
def _chunk_results(reader: _ChunkReader, chunks: int, workers: int) -> Iterator[Iterable[tuple[tuple, object]]]:
    """The reader's result for each chunk, in order: read here, or by ``workers`` readers forked now."""
    if workers < 1 or chunks < 2 or not forkpipe.available():
        yield (reader(chunk) for chunk in range(chunks))
        return
    with forkpipe.OrderedResults(reader, chunks, workers, "convert_imageset readers",
                                 shared_bytes=SHARED_CHUNK_BYTES) as results:
        yield results


def _write_chunks(db_path, backend: str, results: Iterable[tuple[tuple, object]], reader: _ChunkReader,
                  list_path: Path, bad: BadInputs, *, overwrite: bool, accumulator: Optional[MeanAccumulator],
                  check_size: bool, progress) -> int:
    """Write the readers' records in order (Caffe's keys ``%08d_name``: a skipped line's index stays
    unused); :func:`write_db`'s checks, progress lines and errors, a chunk at a time."""
    count, first_size, start = 0, None, 0
    entries, positions = reader.entries, reader.positions
    pixels_needed = check_size or accumulator is not None
    lmdb = store.check_backend(backend) == store.LMDB
    timeline.mark("readers started")
    with _store_errors(db_path), store.open_writer(db_path, backend, overwrite=overwrite) as writer, \
            collector_paused():
        timeline.mark("writer open")
        keys: list[bytes] = []
        values: list = []  # bytes, or memoryviews for LMDB

        def step() -> int:
            """Records to put before the next progress line, so that each comes where Caffe's does."""
            return store.COMMIT_EVERY - count % store.COMMIT_EVERY

        def advance(done: int) -> None:
            nonlocal count
            count += done
            if count % store.COMMIT_EVERY == 0:
                if progress is not None:
                    progress(count)
                faults.event(RECORDS_EVENT)

        def flush() -> None:
            while keys:
                take = min(len(keys), step())
                writer.put_many(keys[:take], values[:take])
                del keys[:take], values[:take]
                advance(take)

        for (key_lengths, lengths, shapes, conversions, problems), blocks in results:
            if not start:
                timeline.mark("first chunk in")
            data = blocks if isinstance(blocks, (bytes, memoryview)) else b"".join(blocks)
            size = len(key_lengths)
            key_ends = list(itertools.accumulate(key_lengths))
            offset = key_ends[-1]
            key_block = bytes(data[:offset]) if isinstance(data, memoryview) else data
            chunk_keys = [key_block[end - length : end] for end, length in zip(key_ends, key_lengths)]
            if isinstance(lengths, int) and not (problems or conversions or pixels_needed or lmdb):
                # LevelDB takes the values as one buffer (no bytes object per record where its tables
                # are written natively).
                block, done = memoryview(data)[offset:], 0
                while done < size:
                    take = min(size - done, step())
                    writer.put_fixed(chunk_keys[done : done + take], block[done * lengths : (done + take) * lengths],
                                     lengths)
                    done += take
                    advance(take)
                start += size
                continue
            if isinstance(data, memoryview):  # a reader's slot, filled again once the next chunk is asked for
                data = bytes(data)
            # LMDB copies values from any buffer (views into the block); plyvel takes bytes only.
            source = memoryview(data) if lmdb else data
            if isinstance(lengths, int):
                chunk_values = [source[at : at + lengths] for at in range(offset, offset + size * lengths, lengths)]
                shapes = [shapes] * size
            else:
                ends = list(itertools.accumulate(lengths, initial=offset))
                chunk_values = [source[ends[i] : ends[i + 1]] for i in range(size)]
            if not (problems or conversions or pixels_needed):
                keys += chunk_keys
                values += chunk_values
            else:
                for i in range(size):
                    entry = entries[positions[start + i]]
                    if i in problems:
                        # Caffe also skips such a line and still consumes its index (keys have gaps).
                        flush()
                        bad.problem(f"{problems[i]} (named in {list_path} line {entry.line})")
                        continue
                    if i in conversions:
                        bad.converted(conversions[i], reader.path(entry.name))
                    if pixels_needed:
                        first_size = _check_and_add(chunk_keys[i], chunk_values[i], shapes[i], first_size,
                                                    check_size, accumulator, flush)
                    keys.append(chunk_keys[i])
                    values.append(chunk_values[i])
            start += size
            flush()
        if count == 0:
            raise InputError("no readable record; nothing to write", db_path)
        timeline.mark("last record put")
    timeline.mark("database closed")
    return count


def _check_and_add(key: bytes, value: bytes, shape: Optional[tuple], first_size: Optional[int], check_size: bool,
                   accumulator: Optional[MeanAccumulator], flush) -> Optional[int]:
    """-check_size's test of one record and its pixels into the mean; the first record's size."""
    if shape is None:  # an encoded record
        if accumulator is not None:
            raise ConfigError("a mean needs raw (not encoded) records")
        return first_size
    import numpy as np

    from lymph_cv.formats.caffe.rawdatum import raw_pixel_offset

    pixels = np.frombuffer(value, np.uint8, math.prod(shape), raw_pixel_offset(*shape)).reshape(shape)
    if check_size:
        if first_size is None:
            first_size = pixels.size
        elif pixels.size != first_size:
            flush()  # the records before it are written (and their progress lines shown), as Caffe's are
            raise InputError(f"record {key.decode(errors='replace')} has {pixels.size} values, "
                             f"the first had {first_size} (-check_size)")
    if accumulator is not None:
        accumulator.add(pixels)
    return first_size


def convert_list(
    root: Union[str, os.PathLike],
    list_path: Union[str, os.PathLike],
    db_path: Union[str, os.PathLike],
    *,
    backend: str = store.LMDB,
    seed: Optional[int] = None,
    options: ImageOptions = PLAIN,
    mean_path: Union[str, os.PathLike, None] = None,
    num_labels: Optional[int] = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    progress=None,
    concat_root: bool = False,
    entries: Optional[Sequence[ListEntry]] = None,
    workers: int = 0,
) -> DbResult:
    """``convert_imageset``: the images of a list (under ``root``) into a new database.

    ``seed`` None keeps the list order; otherwise records are shuffled by that seed.
    ``concat_root`` joins ``root`` and each name as Caffe does (plain string concatenation,
    so ``ROOT/`` needs its slash); otherwise as paths.  ``entries`` are the already-parsed
    list.  Bad inputs raise InputError, or with ``skip_bad`` are skipped and returned as problems.
    ``workers`` processes (forked) read and decode the images while this one writes, in order;
    0 reads them here.  The records are the same bytes either way.
    """
    started = time.perf_counter()
    list_path = Path(list_path)
    if entries is None:
        entries = read_image_list(list_path, num_labels)
    positions = lists.record_order(len(entries), seed)
    timeline.mark("order computed")
    bad = BadInputs(skip_bad)
    reader = _ChunkReader(os.fspath(root), concat_root, options, entries, positions)
    accumulator = None
    if mean_path is not None:
        from lymph_cv.formats.caffe.mean import MeanAccumulator

        accumulator = MeanAccumulator()
    # Forked before the database opens: no LevelDB thread or file is shared with the readers.
    try:
        with _chunk_results(reader, -(-len(positions) // DECODE_CHUNK), workers) as results:
            count = _write_chunks(db_path, backend, results, reader, list_path, bad, overwrite=overwrite,
                                  accumulator=accumulator, check_size=options.check_size, progress=progress)
    finally:
        reader.close()
    means = None if accumulator is None else save_mean_or_drop(mean_path, accumulator, db_path)
    return DbResult(os.fspath(db_path), count, len(entries), time.perf_counter() - started,
                    None if mean_path is None else os.fspath(mean_path), means, bad.problems, dict(bad.conversions))


@dataclass(frozen=True)
class DbTask:
    """One database to build: a side of a fold, from patch files or (``cache``) the shared patch array."""

    fold: int
    side: str  # "train" or "test"
    list_path: Path
    db_path: Path
    mean_path: Optional[Path]
    backend: str
    seed: Optional[int]
    root: Path
    num_labels: Optional[int]
    skip_bad: bool
    cache: Optional[object] = None  # a cache.PatchCache with `dbs --images` (cache imports this module)


def build_from_files(task: DbTask) -> DbResult:
    return convert_list(task.root, task.list_path, task.db_path, backend=task.backend, seed=task.seed,
                        mean_path=task.mean_path, num_labels=task.num_labels, overwrite=True,
                        skip_bad=task.skip_bad)
