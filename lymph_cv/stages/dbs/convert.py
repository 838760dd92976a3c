"""One list → one database, as Caffe's ``convert_imageset`` does: its image options, the records (decoded
by worker processes, written by one), the database and its mean."""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import cv2
import numpy as np

from lymph_cv.formats import store
from lymph_cv.formats.caffe.blob import write_mean
from lymph_cv.formats.caffe.datum import encoded_datum, raw_pixel_offset, serialize_datum
from lymph_cv.formats.caffe.mean import MeanAccumulator, channel_means
from lymph_cv.errors import ConfigError, InputError, LymphCVError, StoreError
from lymph_cv.core.fsutil import remove_path
from lymph_cv.core.images import read_gray, read_image
from lymph_cv.core.workers import imap
from lymph_cv.stages.patches import BadInputs
from lymph_cv.stages.dbs.lists import read_image_list, shuffled_order
from lymph_cv.workdir.lists import ListEntry

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
        if self.encode_type and not cv2.haveImageWriter("x." + self.encode_type):
            raise ConfigError(f"-encode_type: OpenCV cannot encode images as {self.encode_type!r}",
                              valid=[kind for kind in _ENCODE_TYPES if cv2.haveImageWriter("x." + kind)])

    @property
    def resize(self) -> bool:
        return self.resize_width > 0 and self.resize_height > 0


PLAIN = ImageOptions()


def _read_pixels(path: Union[str, Path], options: ImageOptions) -> tuple[np.ndarray, Optional[str]]:
    """(H, W, C) uint8 as Caffe's ReadImageToCVMat gives it, and any colour conversion."""
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
                     batches: Iterable[tuple[list[bytes], list[bytes]]]) -> int:
    """Write ``(keys, values)`` batches to a new database (replacing one there); the record count.

    :func:`write_db` for records assembled in bulk (no per-record checks); same errors.
    """
    count = 0
    with _store_errors(db_path), store.open_writer(db_path, backend, overwrite=True) as writer:
        for keys, values in batches:
            writer.put_many(keys, values)
            count += len(keys)
        if count == 0:
            raise InputError("no readable record; nothing to write", db_path)
    return count


def save_mean(path: Union[str, os.PathLike], accumulator: MeanAccumulator) -> list[float]:
    """Write the accumulated mean as a Caffe mean file; return compute_image_mean's channel values."""
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


#: List lines a decoding worker handles per task (amortises the hand-off between processes).
DECODE_CHUNK = 256


def _decode_chunk(job: tuple[str, bool, ImageOptions, list[tuple[int, str, int]]]) -> list[tuple]:
    """Worker side of :func:`_file_records`: (index, value, shape, pixel offset, conversion, problem) per line."""
    root, concat_root, options, items = job
    results = []
    for index, name, label in items:
        path = root + name if concat_root else os.path.join(root, name)
        try:
            value, pixels, conversion = record_value(path, label, options)
        except InputError as exc:
            results.append((index, None, None, 0, None, str(exc)))
            continue
        shape = None if pixels is None else pixels.shape
        results.append((index, value, shape, 0 if shape is None else raw_pixel_offset(*shape), conversion, None))
    return results


def _file_records(
    root: Union[str, os.PathLike], concat_root: bool, list_path: Path, entries: Sequence[ListEntry],
    order: np.ndarray, options: ImageOptions, bad: BadInputs, workers: Optional[int] = 1, pixels: bool = True,
) -> Iterator[tuple[bytes, bytes, Optional[np.ndarray]]]:
    """Records in database order; images are decoded by ``workers`` processes (results come back
    in order, so the one writer commits exactly what a single process would).  Without ``pixels``
    the records carry None for them (nothing downstream needs them)."""
    root = os.fspath(root)
    positions = order.tolist()
    jobs = [(root, concat_root, options,
             [(index, entries[p].name, entries[p].label) for index, p in enumerate(positions[start : start + DECODE_CHUNK], start)])
            for start in range(0, len(positions), DECODE_CHUNK)]
    for chunk in imap(_decode_chunk, jobs, workers=workers):
        for index, value, shape, offset, conversion, problem in chunk:
            entry = entries[positions[index]]
            if problem is not None:
                # Caffe also skips such a line and still consumes its index (keys have gaps).
                bad.problem(f"{problem} (named in {list_path} line {entry.line})")
                continue
            if conversion is not None:
                bad.converted(conversion, root + entry.name if concat_root else os.path.join(root, entry.name))
            view = None if shape is None or not pixels else \
                np.frombuffer(value, np.uint8, math.prod(shape), offset).reshape(shape)
            yield store.make_key(index, entry.name), value, view


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
    workers: Optional[int] = 1,
) -> DbResult:
    """``convert_imageset``: the images of a list (under ``root``) into a new database.

    ``seed`` None keeps the list order; otherwise records are shuffled by that seed.
    ``concat_root`` joins ``root`` and each name as Caffe does (plain string concatenation,
    so ``ROOT/`` needs its slash); otherwise as paths.  ``entries`` are the already-parsed
    list.  Bad inputs raise InputError, or with ``skip_bad`` are skipped and returned as problems.
    ``workers`` processes decode the images (``None``: all cores) while this one writes.
    """
    started = time.perf_counter()
    list_path = Path(list_path)
    if entries is None:
        entries = read_image_list(list_path, num_labels)
    order = shuffled_order(len(entries), seed)
    bad = BadInputs(skip_bad)
    records = _file_records(root, concat_root, list_path, entries, order, options, bad, workers,
                            pixels=mean_path is not None or options.check_size)
    accumulator = MeanAccumulator() if mean_path is not None else None
    count = write_db(db_path, backend, records, overwrite=overwrite, accumulator=accumulator,
                     check_size=options.check_size, progress=progress)
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
