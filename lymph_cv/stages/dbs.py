"""Step 3: image lists → LevelDB/LMDB databases of Caffe Datums, and mean files.

Two ways to the same databases:

* from patch files, as Caffe's ``convert_imageset`` does: each list line ``<file> <label>``
  names an image under a root folder, read as OpenCV's colour ``imread`` reads it (BGR);
* straight from the source images (``images=``): the patches named in the lists are cut from
  the images into one array in shared memory (a temporary file when it would not fit),
  never written as files.

Both give byte-identical databases for the same lists and seed: record ``i`` is list line
``order[i]`` where ``order`` is a seeded permutation (numpy ``default_rng(seed).permutation``;
Caffe's own ``-shuffle`` is unseeded), stored under Caffe's key ``%08d_<file>`` as a raw
Datum (uint8, channel-major C × H × W, ``encoded: false``).  The mean file is computed as
``compute_image_mean`` does: a float32 running sum in database order, then divided by the
count (see :class:`MeanAccumulator`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import cv2
import numpy as np

from lymph_cv.formats import store
from lymph_cv.formats.caffe.blob import write_mean
from lymph_cv.formats.caffe.datum import encoded_datum, raw_pixel_offset, serialize_datum, serialize_datums
from lymph_cv.formats.caffe.mean import MEAN_PROGRESS_EVERY, MeanAccumulator, channel_means, mean_of_db  # noqa: F401
from lymph_cv.errors import ConfigError, InputError, LymphCVError, StoreError
from lymph_cv.core.fsutil import atomic_write_json, remove_path, remove_stale_temporaries, temp_sibling
from lymph_cv.stages.patches import (
    MANIFEST_NAME, BadInputs, Manifest, SourceImage, extract, load_manifest, patch_count, read_for_patches,
)
from lymph_cv.core import faults
from lymph_cv.core.images import read_gray, read_image
from lymph_cv.core.memory import available_memory
from lymph_cv.core.workers import fork_available, imap
from lymph_cv.workdir.layout import (DB_TEST, DB_TRAIN, DBS_JSON, FOLD_STAIN_RECORD, FOLDS_JSON, MEAN_FILE, PATCH_DIR, TEST_LIST,
                                     TRAIN_LIST, TRAIN_PARENT)
from lymph_cv.stages.stain import StainRecord, StainTransform, fit_record, write_record
from lymph_cv.stages.stain import hook as stain_hook
from lymph_cv.workdir.records import FOLDS, read_cache, read_record
from lymph_cv.workdir.lists import ListEntry, list_folds, read_labelled_list, read_list_lines
from lymph_cv.stages.stage import RunOptions, Stage, stain_key, stain_target_record

log = logging.getLogger(__name__)

DEFAULT_BACKEND = store.LEVELDB
DEFAULT_SEED = 0
#: Records gathered per batch from the patch array.
BATCH = 1024
#: File extensions that name the same encoding.
_SAME_ENCODING = {"jpeg": "jpg", "tiff": "tif"}
_PATCH_NAME = re.compile(r"^(?P<stem>.+)_sub_(?P<index>\d+)\.[A-Za-z0-9]+$")


# --------------------------------------------------------------------------- lists


def check_relative(name: str) -> bool:
    """True when ``name`` is a relative path that stays under its root (no ``..``, not absolute)."""
    # Plain string tests: this runs once per list line (millions).
    if not name or name[0] in "/\\" or (len(name) > 1 and name[1] == ":"):
        return False
    return ".." not in name or ".." not in re.split(r"[/\\]", name)


def read_image_list(path: Union[str, os.PathLike], num_labels: Optional[int] = None) -> list[ListEntry]:
    """Parse a ``<file> <label>`` list; the split is at the last run of whitespace (TAB or spaces).

    Blank lines are ignored.  A line without a label, a non-integer label, a label outside
    ``0 .. num_labels-1`` (when given) or a name escaping the root is an InputError naming the
    file and line.
    """
    entries = read_labelled_list(path)
    for entry in entries:
        if num_labels is not None and not 0 <= entry.label < num_labels:
            raise InputError(f"line {entry.line}: label {entry.label} is outside the {num_labels} classes "
                             f"(0..{num_labels - 1})", path)
        if not check_relative(entry.name):
            raise InputError(f"line {entry.line}: {entry.name!r} must be a relative path inside the root folder", path)
    if not entries:
        raise InputError("list is empty, expected '<file> <label>' lines", path)
    return entries




def shuffled_order(count: int, seed: Optional[int]) -> np.ndarray:
    """Record order: identity without a seed, else ``default_rng(seed).permutation(count)``."""
    if seed is None:
        return np.arange(count)
    return np.random.default_rng(seed).permutation(count)


# --------------------------------------------------------------------------- reading images


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


# --------------------------------------------------------------------------- writing one database


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


def _save_mean_or_drop(mean_path, accumulator: MeanAccumulator, db_path) -> list[float]:
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
    means = None if accumulator is None else _save_mean_or_drop(mean_path, accumulator, db_path)
    return DbResult(os.fspath(db_path), count, len(entries), time.perf_counter() - started,
                    None if mean_path is None else os.fspath(mean_path), means, bad.problems, dict(bad.conversions))


# --------------------------------------------------------------------------- databases of a work folder


@dataclass(frozen=True)
class _DbTask:
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
    cache: Optional["_PatchCache"] = None


def _build_from_files(task: _DbTask) -> DbResult:
    return convert_list(task.root, task.list_path, task.db_path, backend=task.backend, seed=task.seed,
                        mean_path=task.mean_path, num_labels=task.num_labels, overwrite=True,
                        skip_bad=task.skip_bad)


def _folds_record(workdir: Path) -> dict:
    return read_record(workdir / FOLDS_JSON, FOLDS) or {}


def list_signature(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def build_dbs(
    workdir: Union[str, os.PathLike],
    *,
    folds: Optional[Sequence[int]] = None,
    backend: str = DEFAULT_BACKEND,
    seed: Optional[int] = DEFAULT_SEED,
    root: Union[str, os.PathLike, None] = None,
    images: Union[str, os.PathLike, None] = None,
    overwrite: bool = False,
    workers: Optional[int] = None,
    skip_bad: bool = False,
    stain: Optional[str] = None,
    stain_params: Optional[Mapping[str, Any]] = None,
    stain_target: Optional[StainRecord] = None,
) -> list[DbResult]:
    """Step 3: ``DB_train_K``, ``DB_test_K`` and ``DB_train_w32_K.binaryproto`` for every fold.

    Args:
        workdir: holds ``train_w32_K.txt`` / ``test_w32_K.txt`` (folds found from these files).
        folds: only these fold numbers.
        backend: ``"leveldb"`` (the tutorial's) or ``"lmdb"``.
        seed: shuffles every database (recorded in ``dbs.json``); same seed, same order;
            None keeps the list order (no shuffle).
        root: folder the list names are relative to (default: ``list_root`` of ``folds.json``,
            i.e. ``workdir`` when the patch folder is inside it).
        images: build straight from the source images in this folder (``CLASS/file.tif``)
            instead of reading patch files; needs the manifest named in ``folds.json``.
        overwrite: replace existing databases; without it an existing database is an error,
            unless ``dbs.json`` shows it was built from the same list, patches, backend and seed (kept).
        workers: processes, one database at a time each (``None`` = all cores).
        skip_bad: skip unreadable/missing images with a warning instead of stopping.
        stain: with ``images``, normalise every whole image with this method as it is read:
            with ``stain_target`` as given, else fitted per fold on that fold's training images
            only (its train parent list); the record goes to ``stain_K.json`` (evaluate reads it).
        stain_params: the method's parameters (for fitting per fold).
    """
    workdir = Path(workdir)
    backend = store.check_backend(backend)
    if seed is not None and seed < 0:  # numpy's generators take non-negative seeds only
        raise ConfigError(f"--seed: must be a non-negative integer, got {seed}")
    found = list_folds(workdir)
    if not found:
        raise InputError("no train_w32_K.txt / test_w32_K.txt lists found (run `lymph-cv folds` first)", workdir)
    selected = list(found if folds is None else dict.fromkeys(folds))  # `--fold 1 --fold 1`: built once
    missing = [k for k in selected if k not in found]
    if missing:
        raise ConfigError(f"--fold: fold {missing[0]} has no lists in {workdir}", valid=[str(k) for k in found])
    record = _folds_record(workdir)
    classes = record.get("classes")
    num_labels = len(classes) if classes else None
    root_dir = Path(root) if root is not None else workdir / record.get("list_root", ".")
    for path in remove_stale_temporaries(workdir):  # databases of a killed run (they can be large)
        log.info("dbs: removed %s, left by an interrupted run", path)
    previous = read_dbs_json(workdir)
    same_settings = previous.get("backend") == backend and previous.get("seed") == seed
    manifest_digest = _manifest_digest(workdir, record)
    transforms = _fold_stains(workdir, selected, images, record, stain, stain_params, stain_target)

    tasks: list[_DbTask] = []
    kept: list[DbResult] = []
    for side, list_template, db_template in (("train", TRAIN_LIST, DB_TRAIN), ("test", TEST_LIST, DB_TEST)):
        for fold in selected:
            list_path = workdir / list_template.format(fold=fold)
            db_path = workdir / db_template.format(fold=fold)
            mean_path = workdir / MEAN_FILE.format(fold=fold) if side == "train" else None
            if db_path.exists() and not overwrite:
                done = previous.get("dbs", {}).get(db_path.name)
                if (same_settings and isinstance(done, dict) and done.get("list") == list_signature(list_path)
                        and done.get("manifest") == manifest_digest and (mean_path is None or mean_path.is_file())
                        and done.get("stain") == _stain_json(transforms[fold])):
                    log.info("dbs: keeping %s (built from the same list, patches, backend and seed)", db_path)
                    kept.append(DbResult(os.fspath(db_path), done["records"], done["lines"], 0.0,
                                         None if mean_path is None else os.fspath(mean_path)))
                    continue
                if isinstance(done, dict) and done.get("stain") != _stain_json(transforms[fold]):
                    raise StoreError("was built with another stain normalisation; pass --overwrite to rebuild it", db_path)
                if isinstance(done, dict):
                    raise StoreError("was built from another list, patch set, backend or seed; "
                                     "pass --overwrite to rebuild it", db_path)
                if store_kind(db_path) is not None:
                    # Renamed into place by a run killed before it recorded the database (or by an
                    # orphaned worker): never taken as complete, rebuilt.
                    log.info("dbs: rebuilding %s: %s does not record it as complete", db_path, DBS_JSON)
                    remove_path(db_path)
                else:
                    raise StoreError("already exists; pass --overwrite to replace it", db_path)
            tasks.append(_DbTask(fold, side, list_path, db_path, mean_path, backend, seed, root_dir, num_labels, skip_bad))

    bad = BadInputs(skip_bad)
    results: list[DbResult] = list(kept)
    dbs_record = {"backend": backend, "seed": seed, "shuffle": seed is not None,
                  "source": "files" if images is None else "images",
                  "root": os.fspath(root_dir), "images": None if images is None else os.fspath(images),
                  "dbs": dict(previous.get("dbs", {})) if same_settings else {}}
    def note_built(task: _DbTask, result: DbResult) -> None:
            # Written after every database (and for those finished when another failed), so a
            # rerun keeps finished databases instead of asking for --overwrite.
            dbs_record["dbs"][task.db_path.name] = {
                "fold": task.fold, "side": task.side, "records": result.records, "lines": result.lines,
                "list": list_signature(task.list_path), "manifest": manifest_digest,
                "mean": None if task.mean_path is None else task.mean_path.name,
                "channel_means": result.channel_means, "stain": _stain_json(transforms[task.fold]),
            }
            atomic_write_json(workdir / DBS_JSON, dbs_record)

    # One patch array per stain target: folds normalised with their own targets cut their own patches.
    groups: dict[str, list[_DbTask]] = {}
    for task in tasks:
        groups.setdefault(json.dumps(_stain_json(transforms[task.fold]), sort_keys=True), []).append(task)
    for group in groups.values():
        cache = None
        try:
            if images is not None:
                cache = _PatchCache.build(workdir, Path(images), [(t.list_path, t.num_labels) for t in group], record,
                                          workers, bad, transforms[group[0].fold])
                group = [dataclasses.replace(t, cache=cache) for t in group]
            function = _build_from_files if cache is None else _build_from_cache
            weights = [t.list_path.stat().st_size for t in group]
            for task, result in zip(group, imap(function, group, workers=workers, desc="dbs", unit="B", weights=weights,
                                                salvage=note_built)):
                faults.event("dbs:built")  # in place, not yet recorded
                bad.merge(result.problems, result.conversions)
                results.append(result)
                note_built(task, result)
                faults.event("dbs:recorded")
        finally:
            if cache is not None:
                cache.remove()
    bad.finish("building databases")
    atomic_write_json(workdir / DBS_JSON, dbs_record)
    for result in sorted(results, key=lambda r: r.path):
        log.debug("dbs: %s: %d records", result.path, result.records)
    return results


def _stain_json(transform: Optional[StainTransform]) -> Optional[dict]:
    return None if transform is None else transform.to_json()


def _fold_stains(workdir: Path, folds: Sequence[int], images, record: dict, method: Optional[str],
                 params: Optional[Mapping[str, Any]], target: Optional[StainRecord]) -> dict[int, Optional[StainTransform]]:
    """Per fold, the stain normalisation its databases are built with (None: none), records written.

    Without a given target each fold's is fitted on that fold's training images only (never on
    its test images) and written to ``stain_K.json``; a fold built without one loses its record.
    """
    if method is None or method == "none":
        for fold in folds:
            (workdir / FOLD_STAIN_RECORD.format(fold=fold)).unlink(missing_ok=True)
        return {fold: None for fold in folds}
    if images is None:
        raise ConfigError("--stain: applies with --images (patch files keep the normalisation `patches --stain` "
                          "gave them)")
    transforms = {}
    for fold in folds:
        if target is not None:
            fitted = target
        else:
            parents = workdir / TRAIN_PARENT.format(fold=fold)
            names = read_list_lines(parents)
            if not names:
                raise InputError("no training images to fit the stain target on", parents)
            log.info("dbs: fitting the %s stain target of fold %d on its %d training images", method, fold, len(names))
            fitted = fit_record([Path(images) / name for name in names], method, params)
        write_record(workdir / FOLD_STAIN_RECORD.format(fold=fold), fitted, fold=fold,
                     fitted_for="given target" if target is not None else "this fold's training images")
        transforms[fold] = fitted.transform
    return transforms


def store_kind(path: Path) -> Optional[str]:
    """The backend of the database at ``path``, None when it is not one."""
    try:
        return store.detect_backend(path)
    except LymphCVError:
        return None


def read_dbs_json(workdir: Path) -> dict:
    record = read_cache(workdir / DBS_JSON) or {}
    # Anything else than our record: nothing is known to be current (databases are rebuilt or refused).
    return record if isinstance(record, dict) and isinstance(record.get("dbs", {}), dict) else {}


# --------------------------------------------------------------------------- straight from the images


#: Anonymous shared memory blocks by token: created before the worker pools fork, so the
#: workers write and read the same pages (no file, no disk writeback).
_SHARED: dict[str, mmap.mmap] = {}
#: Colour patches: OpenCV's colour imread gives 3 channels.
COLOR_CHANNELS = 3
#: Use shared memory when the patch array takes at most this share of the available memory (MemAvailable).
SHARED_MEMORY_SHARE = 0.5


def _free_memory() -> int:
    return available_memory() or 0


@dataclass(frozen=True)
class _PatchCache:
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
        if self.in_memory:
            block = _SHARED.pop(self.token, None)
            if block is not None:
                with contextlib.suppress(BufferError):  # a view still alive: freed with it
                    block.close()
        else:
            remove_path(Path(self.token))

    def row_of(self, name: str) -> Optional[int]:
        """Row of a patch file name, or None when it is not a patch of a known image."""
        match = _PATCH_NAME.match(name.rsplit("/", 1)[-1])
        if not match:
            return None
        stem, index = match.group("stem"), int(match.group("index"))
        if stem not in self.offsets or not 1 <= index <= self.counts[stem]:
            return None
        return self.offsets[stem] + index - 1

    @classmethod
    def build(cls, workdir: Path, images: Path, lists: Sequence[tuple[Path, Optional[int]]], record: dict,
              workers: Optional[int], bad: BadInputs, stain: Optional[StainTransform] = None) -> "_PatchCache":
        manifest = _manifest_for(workdir, record)
        needed: set[str] = set()
        for list_path, num_labels in lists:
            for entry in read_image_list(list_path, num_labels):
                match = _PATCH_NAME.match(entry.name.rsplit("/", 1)[-1])
                if not match:
                    raise InputError(f"line {entry.line}: {entry.name!r} is not a patch name (<image>_sub_<i>.tif)", list_path)
                needed.add(match.group("stem"))
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
            _SHARED[token] = mmap.mmap(-1, size)
        else:
            token = os.fspath(temp_sibling(workdir / "patch-cache.u8"))
            np.memmap(token, np.uint8, "w+", shape=(size,)).flush()
        cache = cls(token, in_memory, total, shape, offsets, counts)
        try:
            jobs = [(cache, SourceImage(images / e.cls / e.name, e.cls, e.label), e.stem, manifest.step, stain)
                    for e in chosen]
            unreadable = set()
            done = imap(_cut_image, jobs, workers=workers, desc="cut", unit="img")
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


def _manifest_digest(workdir: Path, record: dict) -> Optional[str]:
    """SHA-256 of the patch manifest the lists come from (None without one).

    The lists name patches only; a rerun of ``patches`` with another window size rewrites
    the files under the same names, so a database is current only for the same manifest.
    """
    relative = record.get("manifest")
    path = workdir / relative if relative else workdir / PATCH_DIR / MANIFEST_NAME
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _manifest_for(workdir: Path, record: dict) -> Manifest:
    relative = record.get("manifest")
    path = workdir / relative if relative else workdir / PATCH_DIR / MANIFEST_NAME
    return load_manifest(path)


def _cut_image(job: tuple["_PatchCache", SourceImage, str, int, Optional[StainTransform]],
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
    rows = cache.open(writable=True)[cache.offsets[stem] : cache.offsets[stem] + count]
    extract(read.bgr, cache.shape[1], step, channels_first=True, out=rows)
    cache.release(cache.offsets[stem], count)  # written: the other processes read it from the shared block
    return None, read.conversion, transform is not None and transform.unchanged


def _cache_rows(task: _DbTask, entries: Sequence[ListEntry], bad: BadInputs) -> np.ndarray:
    """Array row of every list entry; -1 for patches of unreadable images (skipped)."""
    cache = task.cache
    rows = np.empty(len(entries), np.int64)
    for position, entry in enumerate(entries):
        row = cache.row_of(entry.name)
        if row is None:
            raise InputError(f"line {entry.line}: {entry.name!r} is not a patch of an image in the manifest", task.list_path)
        if cache.unreadable and _PATCH_NAME.match(entry.name.rsplit("/", 1)[-1]).group("stem") in cache.unreadable:
            bad.problem(f"{task.list_path}: line {entry.line}: {entry.name} skipped, its image is unreadable")
            row = -1
        rows[position] = row
    return rows


#: Rows a database build gathers from the patch array before it drops its resident copy of it.
#: A read fault maps the 64 KiB around the page (the kernel's fault-around), so 8,192 random rows
#: leave up to ~512 MiB of the array resident in this process.
RELEASE_ROWS = 8192


def _cache_batches(
    cache: _PatchCache, entries: Sequence[ListEntry], order: np.ndarray, rows: np.ndarray,
    accumulator: Optional[MeanAccumulator],
) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """(keys, values) of the database in order, BATCH records at a time, assembled as arrays."""
    array, gathered = cache.open(), 0
    labels = np.fromiter((e.label for e in entries), np.int64, len(entries))
    for start in range(0, len(order), BATCH):
        positions = order[start : start + BATCH]
        wanted = rows[positions]
        keep = wanted >= 0
        # Skipped lines still consume their index, as with missing patch files.
        indices = np.arange(start, start + len(positions))[keep]
        positions, wanted = positions[keep], wanted[keep]
        block = np.asarray(array[wanted])
        if not len(block):
            continue
        if accumulator is not None:
            accumulator.add_batch(block, cache.shape)
        keys = [store.make_key(index, entries[position].name) for index, position in zip(indices.tolist(), positions.tolist())]
        yield keys, serialize_datums(block, cache.shape, labels[positions])
        gathered += len(block)
        if gathered >= RELEASE_ROWS:
            cache.release()
            array, gathered = cache.open(), 0


def _build_from_cache(task: _DbTask) -> DbResult:
    started = time.perf_counter()
    entries = read_image_list(task.list_path, task.num_labels)
    order = shuffled_order(len(entries), task.seed)
    bad = BadInputs(task.skip_bad)
    rows = _cache_rows(task, entries, bad)
    accumulator = MeanAccumulator() if task.mean_path is not None else None
    count = write_db_batches(task.db_path, task.backend, _cache_batches(task.cache, entries, order, rows, accumulator))
    means = None if accumulator is None else _save_mean_or_drop(task.mean_path, accumulator, task.db_path)
    return DbResult(os.fspath(task.db_path), count, len(entries), time.perf_counter() - started,
                    None if task.mean_path is None else os.fspath(task.mean_path), means, bad.problems, dict(bad.conversions))


class DbsStage(Stage):
    """Step 3: each fold's training and test databases and its mean file (from patch files, or with
    ``--direct`` straight from the images)."""

    name = "dbs"
    reads = (TRAIN_LIST, TEST_LIST, FOLDS_JSON)
    writes = (DB_TRAIN, DB_TEST, MEAN_FILE, DBS_JSON)
    per_fold = True

    @staticmethod
    def paths(o: RunOptions, fold: int) -> list[Path]:
        """The fold's training database, test database and mean file."""
        w = Path(o.workdir)
        return [w / name.format(fold=fold) for name in (DB_TRAIN, DB_TEST, MEAN_FILE)]

    def params(self, o: RunOptions) -> dict:
        stain = stain_key(o) if o.direct else {}
        return {"backend": o.backend, "seed": o.seed, "direct": o.direct, "folds": o.fold_list, **stain}

    def complete(self, o: RunOptions) -> bool:
        return all(p.exists() for fold in o.fold_list for p in self.paths(o, fold))

    def drop_unrecorded(self, o: RunOptions) -> None:
        """Before resuming: remove this stage's databases that ``dbs.json`` does not record as built
        from their current list (an interruption can land between a database's rename into place and
        its record), so ``build_dbs`` rebuilds them instead of refusing to overwrite them."""
        w = Path(o.workdir)
        previous = read_dbs_json(w)
        same_settings = previous.get("backend") == o.backend and previous.get("seed") == o.seed
        recorded = previous.get("dbs", {}) if same_settings else {}
        for fold in o.fold_list:
            train_db, test_db, mean = self.paths(o, fold)
            for db, lst, needs_mean in ((train_db, TRAIN_LIST, True), (test_db, TEST_LIST, False)):
                list_path = w / lst.format(fold=fold)
                done = recorded.get(db.name)
                kept = (done is not None and list_path.is_file() and done.get("list") == list_signature(list_path)
                        and (not needs_mean or mean.is_file()))
                if db.is_dir() and not kept:
                    log.info("removing %s: left unrecorded by an interrupted run", db)
                    shutil.rmtree(db)

    def run(self, o: RunOptions, fresh: bool) -> None:
        if not fresh:
            self.drop_unrecorded(o)
        stain = dict(stain=o.stain, stain_params=o.stain_params, stain_target=stain_target_record(o)) if o.direct else {}
        build_dbs(o.workdir, folds=o.fold_list, backend=o.backend, seed=o.seed,
                  images=o.data_dir if o.direct else None, overwrite=fresh, workers=o.workers, **stain)


STAGE = DbsStage()
