"""LevelDB and LMDB key/value stores behind one small interface, with Caffe's keys and options.

Writers build the database under a temporary sibling name and rename it onto the final
name only when closed successfully, so an interrupted build never leaves a database that
looks finished.  Readers iterate records in key order (which is Caffe's order too).
"""
from __future__ import annotations

import abc
import contextlib
import errno
import functools
import itertools
import logging
import operator
import os
TYPE_CHECKING = False  # typing.TYPE_CHECKING unimported: typing is ~5 ms of the tools' start-up (issue 17)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Iterable, Iterator, List, Optional, Tuple, Union

from lymph_cv.errors import FormatError, StoreError
from lymph_cv.formats import leveldb_tables
from lymph_cv.core.fsutil import PathLike, check_kind, make_dirs, remove_path, replace_path, temp_sibling

log = logging.getLogger(__name__)

LEVELDB = "leveldb"
LMDB = "lmdb"
BACKENDS = (LEVELDB, LMDB)

#: Caffe commits a write transaction every this many records (convert_imageset).
COMMIT_EVERY = 1000
#: Caffe's LevelDB options (util/db_leveldb.cpp).
LEVELDB_OPTIONS = dict(
    block_size=65536,
    write_buffer_size=256 * 1024 * 1024,
    max_open_files=100,
    compression="snappy",
)
#: Starting LMDB map size; doubled (and the transaction retried) whenever it fills, as Caffe does.
LMDB_INITIAL_MAP_SIZE = 1 << 30
#: LMDB's data file; its presence marks an LMDB directory.
LMDB_DATA_FILE = "data.mdb"
#: Files that mark a LevelDB directory.
LEVELDB_MARKERS = ("CURRENT", "LOG")
LEVELDB_TABLE_SUFFIXES = (".ldb", ".sst")

#: Caffe's key: zero-padded line index, underscore, the list's file name.
KEY_FORMAT = "%08d_%s"

if TYPE_CHECKING:
    Key = Union[bytes, str]
else:  # annotations only (strings, PEP 563)
    Key = "Union[bytes, str]"


def make_key(index: int, name: str) -> bytes:
    """Caffe's database key for list line ``index`` naming ``name`` (``00000042_name``)."""
    return (KEY_FORMAT % (index, name)).encode("utf-8")


def make_keys(indices: Iterable[int], names: Iterable[bytes]) -> List[bytes]:
    """:func:`make_key` of each (index, UTF-8 name) pair, in bulk."""
    return list(map(KEY_FORMAT.encode().__mod__, zip(indices, names)))


def _as_bytes(key: Key) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def detect_backend(path: PathLike) -> str:
    """``"lmdb"`` or ``"leveldb"`` judged by the directory's files (never by its name)."""
    path = os.fspath(path)  # os.path, not pathlib: the reading side is on the tools' start-up path
    expected = "expected a LevelDB directory (CURRENT, LOG, *.ldb) or an LMDB directory (data.mdb)"
    if not os.path.isdir(path):
        raise FormatError(f"not a directory; {expected}", path)
    names = set(os.listdir(path))
    if LMDB_DATA_FILE in names:
        return LMDB
    if "CURRENT" in names or any(n.endswith(LEVELDB_TABLE_SUFFIXES) for n in names):
        return LEVELDB
    raise FormatError(expected, path)


def check_backend(backend: str) -> str:
    """Validate a backend name (case-insensitive) and return it in lower case."""
    name = str(backend).lower()
    if name not in BACKENDS:
        raise StoreError(f"unknown database backend {backend!r} (valid: {', '.join(BACKENDS)})")
    return name


# --------------------------------------------------------------------------- writers


class _Writer(abc.ABC):
    """Buffers puts and commits them in batches; subclasses do the backend work."""

    def __init__(self, path: Path, commit_every: int):
        self.path = path
        self.commit_every = max(1, int(commit_every))
        self.count = 0
        self._keys: List[bytes] = []
        self._values: List[bytes] = []

    def put(self, key: Key, value: bytes) -> None:
        """Add one record; a commit happens every ``commit_every`` records."""
        self._keys.append(_as_bytes(key))
        self._values.append(bytes(value))
        self.count += 1
        if len(self._keys) >= self.commit_every:
            self.commit()

    def put_many(self, keys: List[bytes], values: List[bytes]) -> None:
        """:meth:`put` of each pair in order (commits at the same records as one put at a time)."""
        start = 0
        while start < len(keys):
            take = min(len(keys) - start, self.commit_every - len(self._keys))
            self._keys.extend(keys[start : start + take])
            self._values.extend(values[start : start + take])
            self.count += take
            start += take
            if len(self._keys) >= self.commit_every:
                self.commit()

    def put_fixed(self, keys: List[bytes], data, width: int) -> None:
        """:meth:`put_many` with the values as ``data``'s consecutive ``width``-byte slices (one buffer)."""
        data = memoryview(data).cast("B")
        self.put_many(keys, [bytes(data[i * width : (i + 1) * width]) for i in range(len(keys))])

    def __len__(self) -> int:
        return self.count

    def commit(self) -> None:
        """Write the pending records in one transaction."""
        if self._keys:
            self._write(self._keys, self._values)
            self._keys, self._values = [], []

    @abc.abstractmethod
    def _write(self, keys: List[bytes], values: List[bytes]) -> None:
        """Store the records ``keys[i]: values[i]`` in one transaction."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the underlying database (does not commit)."""

    def abort(self) -> None:
        """Close after an error (the database is removed next)."""
        self.close()


class _LevelDBWriter(_Writer):
    def __init__(self, path: Path, commit_every: int, existing: bool = False):
        super().__init__(path, commit_every)
        import plyvel

        try:
            self._db = plyvel.DB(
                os.fspath(path), create_if_missing=not existing, error_if_exists=not existing, **LEVELDB_OPTIONS
            )
        except plyvel.Error as exc:
            raise StoreError(f"cannot create LevelDB: {exc}", path) from exc
        # One batch for every commit: cleared, it keeps its buffer (a new one grew a fresh one each time).
        self._batch = self._db.write_batch()

    def _write(self, keys, values):
        put = self._batch.put
        for key, value in zip(keys, values):
            put(key, value)
        self._batch.write()
        self._batch.clear()

    def close(self):
        self._db.close()


class _TableLevelDBWriter(_Writer):
    """A LevelDB written as table files directly (:mod:`leveldb_tables`) while its keys increase,
    which they do in every database this project builds; from a key that does not, through
    LevelDB itself (the same records either way)."""

    def __init__(self, path: Path, commit_every: int):
        super().__init__(path, commit_every)
        path.mkdir(mode=0o755)
        self._tables = leveldb_tables.TableWriter(path)
        self._db: Optional[_LevelDBWriter] = None  # once a key did not increase

    def _write(self, keys, values):
        self._store(keys, values)

    def put_many(self, keys: List[bytes], values: List[bytes]) -> None:
        self.commit()
        self._store(keys, values)
        self.count += len(keys)

    def put_fixed(self, keys: List[bytes], data, width: int) -> None:
        self.commit()
        taken = 0 if self._db is not None else self._tables.add_fixed(keys, data, width)
        if taken < len(keys):
            rest = memoryview(data).cast("B")[taken * width :]
            self._store(keys[taken:], [bytes(rest[i * width : (i + 1) * width]) for i in range(len(keys) - taken)])
        self.count += len(keys)

    def _store(self, keys: List[bytes], values: List[bytes]) -> None:
        taken = 0 if self._db is not None else self._tables.add(keys, values)
        if taken < len(keys):
            if self._db is None:
                log.debug("%s: key %r does not increase; writing on through LevelDB", self.path, keys[taken])
                self._tables.finish()
                self._db = _LevelDBWriter(self.path, self.commit_every, existing=True)
            self._db._write(keys[taken:], values[taken:])

    def close(self):
        if self._db is not None:
            self._db.close()
            return
        self._tables.finish()
        import plyvel

        # LevelDB opens it once (and so checks the MANIFEST names every table) before it counts as written.
        try:
            plyvel.DB(os.fspath(self.path), create_if_missing=False).close()
        except plyvel.Error as exc:
            raise StoreError(f"LevelDB cannot open the tables written: {exc}", self.path) from exc

    def abort(self):
        if self._db is not None:
            self._db.close()
        self._tables.abandon()


#: Free bytes an LMDB write needs beyond its records (meta and branch pages), and the factor on the
#: records' size (page overhead, copy-on-write of touched pages).
LMDB_ROOM_BYTES = 1 << 20
LMDB_ROOM_FACTOR = 2


def _check_room(folder: Path, needed: int) -> None:
    """LMDB reads its pages through a memory map: on a full disk the kernel may answer a page it
    could not allocate with SIGBUS, killing the process without a word, instead of an error.
    So a write that may not fit is refused first."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return
    if stat.f_bavail * stat.f_frsize < needed:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(folder))


class _FlushBehind:
    """Flushes a file to disk in a thread while it is still being written, so that the one sync that
    makes it durable (at the end) finds little left to write: LMDB's pages of a fold took 0.2 s to
    sync after the last commit, time in which nothing else ran.  A flush asked for while one runs
    is folded into the next."""

    def __init__(self, path: Path):
        import threading

        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._wanted = threading.Event()
        self._stopping = False
        self.error: Optional[OSError] = None
        self._thread = threading.Thread(target=self._run, name=f"flush {path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:  # reported by the final sync, which meets the same error
                self.error = exc
                return

    def request(self) -> None:
        """Start a flush of what is written so far (returns at once)."""
        self._wanted.set()

    def stop(self) -> None:
        """Wait for a running flush, then close the file (once: abort may follow a failed close)."""
        if self._stopping:
            return
        self._stopping = True
        self._wanted.set()
        self._thread.join()
        os.close(self._fd)


class _AppendRefused(Exception):
    """LMDB did not append every record of a commit (its transaction is aborted)."""


class _LMDBWriter(_Writer):
    """Commits every ``commit_every`` records as Caffe does, but syncs once, when closed (before the
    rename onto the final name): a per-commit fsync took a quarter of ``convert_imageset``'s time,
    and an interrupted build is removed anyway.  Keys that increase (every database this project
    builds) are appended (``MDB_APPEND``: no search down the tree, pages filled); the records and
    the file format are the same."""

    def __init__(self, path: Path, commit_every: int, map_size: int = LMDB_INITIAL_MAP_SIZE):
        super().__init__(path, commit_every)
        import lmdb

        self._lmdb = lmdb
        path.mkdir(mode=0o755)
        _check_room(path, LMDB_ROOM_BYTES)
        self._env = lmdb.open(os.fspath(path), map_size=map_size, subdir=True, sync=False, metasync=False)
        self._last: Optional[bytes] = None  # the highest key written so far
        self._flush = _FlushBehind(path / LMDB_DATA_FILE)

    def _write(self, keys, values):
        _check_room(self.path, LMDB_ROOM_BYTES + LMDB_ROOM_FACTOR * (sum(map(len, keys)) + sum(map(len, values))))
        # LMDB's default order is bytes' order: appending is right when every key exceeds the one before.
        append = (self._last is None or self._last < keys[0]) and \
            all(map(operator.lt, keys, itertools.islice(keys, 1, None)))
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    if append:
                        _, added = txn.cursor().putmulti(zip(keys, values), append=True)
                        if added != len(keys):  # not expected (the keys were checked): aborted, put again
                            raise _AppendRefused(f"{added} of {len(keys)} records appended")
                    else:
                        put = txn.put
                        for key, value in zip(keys, values):
                            put(key, value)
                break
            except _AppendRefused as exc:
                log.debug("%s: %s; putting them one by one", self.path, exc)
                append = False
            except self._lmdb.MapFullError:
                new_size = self._env.info()["map_size"] * 2
                log.debug("LMDB map full; growing to %d bytes and retrying", new_size)
                self._env.set_mapsize(new_size)
        last = bytes(keys[-1]) if append else max(map(bytes, keys))
        self._last = last if self._last is None or self._last < last else self._last
        self._flush.request()

    def close(self):
        self._flush.stop()
        self._env.sync(True)
        self._env.close()

    def abort(self):
        self._flush.stop()
        self._env.close()


@contextlib.contextmanager
def open_writer(
    path: PathLike,
    backend: str,
    overwrite: bool = False,
    commit_every: int = COMMIT_EVERY,
    lmdb_map_size: int = LMDB_INITIAL_MAP_SIZE,
) -> Iterator[_Writer]:
    """Create a new database at ``path``; use ``.put(key, value)`` inside the ``with``.

    The database is built under a temporary sibling name and renamed onto ``path`` when the
    block ends without an exception.  An existing ``path`` is an error unless ``overwrite``,
    in which case it is replaced only at that successful end.  ``lmdb_map_size`` is LMDB's
    starting map size; it doubles whenever a transaction does not fit.
    """
    from pathlib import Path  # here, not at the top: the reading side is on the tools' start-up path

    path = Path(path)
    backend = check_backend(backend)
    if path.exists() and not overwrite:
        raise StoreError("already exists; pass --overwrite to replace it", path)
    check_kind(path, folder=True)
    if path.is_dir() and any(path.iterdir()):
        try:
            detect_backend(path)
        except FormatError:
            # --overwrite replaces a database, never a folder of other files (a mistyped name).
            raise StoreError("is a folder but not a LevelDB/LMDB database; refusing to replace it", path) from None
    make_dirs(path.parent)
    temp = temp_sibling(path)
    try:
        if backend == LEVELDB and leveldb_tables.available():
            writer: _Writer = _TableLevelDBWriter(temp, commit_every)
        elif backend == LEVELDB:
            writer = _LevelDBWriter(temp, commit_every)
        else:
            writer = _LMDBWriter(temp, commit_every, lmdb_map_size)
    except Exception as exc:  # plyvel/lmdb/OS errors name the temporary: report the final name
        remove_path(temp)
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc):
            raise StoreError("no space left on device", path) from None
        detail = exc.detail if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
        raise StoreError(f"cannot create {backend} database ({detail})", path) from None
    try:
        try:
            yield writer
            writer.commit()
            writer.close()
            replace_path(temp, path)
        except _backend_errors() as exc:  # a full disk during a commit, an I/O error: one line
            raise _store_error(exc, path, "cannot write") from None
    except BaseException:
        with contextlib.suppress(Exception):  # closing a database whose disk is full may fail too
            writer.abort()
        remove_path(temp)
        raise
    log.debug("wrote %d records to %s (%s)", writer.count, path, backend)


def _backend_errors() -> tuple:
    """The exception types of plyvel and lmdb (and the OS), for one-line errors."""
    import lmdb
    import plyvel

    return (plyvel.Error, lmdb.Error, OSError)


def _store_error(exc: BaseException, path: Path, doing: str) -> StoreError:
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text:
        return StoreError("no space left on device", path)
    if "Read-only file system" in text:
        return StoreError(f"{doing} (read-only file system)", path)
    text = " ".join(text.split()) or type(exc).__name__
    return StoreError(f"{doing} ({text})", path)


def _reading(method):
    """A Reader method whose plyvel/lmdb errors (a truncated ``.ldb`` file) are one StoreError line."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except _backend_errors() as exc:
            raise _store_error(exc, self.path, "corrupt or unreadable database") from None

    return wrapped


def _reading_iter(method):
    """:func:`_reading` for a generator method."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            yield from method(self, *args, **kwargs)
        except _backend_errors() as exc:
            raise _store_error(exc, self.path, "corrupt or unreadable database") from None

    return wrapped


# --------------------------------------------------------------------------- readers


_LMDB_MAGIC = 0xBEEFC0DE


def _check_lmdb_size(path: str) -> None:
    """Refuse an LMDB whose data.mdb is shorter than its newest meta page says.

    LMDB maps the file and would die of SIGBUS on the first page past its end (a truncated
    copy); the meta pages (0 and 1) give the page size and the last page in use.
    """
    import struct

    data_file = os.path.join(path, LMDB_DATA_FILE)
    try:
        with open(data_file, "rb") as handle:
            head = handle.read(160)
            if len(head) < 160 or struct.unpack_from("<I", head, 16)[0] != _LMDB_MAGIC:
                return  # not an LMDB file: lmdb.open says so
            page_size = struct.unpack_from("<I", head, 40)[0]
            handle.seek(page_size)
            second = handle.read(160)
            size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise StoreError(f"cannot read LMDB ({exc.strerror or exc})", data_file) from None
    metas = [head] + ([second] if len(second) == 160 and struct.unpack_from("<I", second, 16)[0] == _LMDB_MAGIC else [])
    newest = max(metas, key=lambda meta: struct.unpack_from("<Q", meta, 144)[0])  # highest txnid
    last_page = struct.unpack_from("<Q", newest, 136)[0]
    needed = (last_page + 1) * page_size
    if size < needed:
        raise FormatError(f"truncated LMDB: {size} bytes, its meta page needs {needed}", data_file)


def _lists_of(iterator, size: int) -> Iterator[list]:
    """``iterator``'s items, ``size`` (at least 1) per list, built in C."""
    size = max(1, int(size))
    while True:
        items = list(itertools.islice(iterator, size))
        if not items:
            return
        yield items


class Reader:
    """A read-only view of a database: iterate ``(key, value)`` in key order, ``len()``.

    Full scans bypass LevelDB's block cache (measured 1.5x faster for a sequential pass).
    The first open after a build replays LevelDB's log (up to Caffe's 256 MiB write buffer).
    """

    def __init__(self, path: str, backend: str):
        self.path = path
        self.backend = backend
        self._length: Optional[int] = None
        if backend == LEVELDB:
            import plyvel

            try:
                self._db = plyvel.DB(os.fspath(path), create_if_missing=False)
            except plyvel.Error as exc:
                # LevelDB writes its LOCK and LOG files even to read: a full or read-only disk stops it
                raise _store_error(exc, path, "cannot open LevelDB") from None
        else:
            import lmdb

            _check_lmdb_size(path)
            try:
                self._env = lmdb.open(
                    os.fspath(path), readonly=True, lock=False, subdir=True, readahead=False
                )
            except lmdb.Error as exc:
                raise StoreError(f"cannot open LMDB: {exc}", path) from exc

    @_reading_iter
    def __iter__(self) -> Iterator[Tuple[bytes, bytes]]:
        """All records ``(key, value)`` in key order."""
        if self.backend == LEVELDB:
            with self._db.iterator(fill_cache=False) as iterator:
                yield from iterator
        else:
            with self._env.begin(buffers=False) as txn:
                yield from txn.cursor().iternext(keys=True, values=True)

    @_reading
    def keys(self, limit: Optional[int] = None) -> List[bytes]:
        """The first ``limit`` keys (all when None), in key order."""
        result: List[bytes] = []
        if limit is not None and limit <= 0:
            return result
        if self.backend == LEVELDB:
            with self._db.iterator(include_value=False, fill_cache=False) as iterator:
                for key in iterator:
                    result.append(key)
                    if limit is not None and len(result) >= limit:
                        break
        else:
            with self._env.begin(buffers=False) as txn:
                for key in txn.cursor().iternext(keys=True, values=False):
                    result.append(key)
                    if limit is not None and len(result) >= limit:
                        break
        return result

    @_reading_iter
    def values(self, buffers: bool = False) -> Iterator[bytes]:
        """All values in key order; with ``buffers``, LMDB's are zero-copy views into its map,
        each valid while the iteration runs (LevelDB's are bytes either way)."""
        if self.backend == LEVELDB:
            with self._db.iterator(include_key=False, fill_cache=False) as iterator:
                yield from iterator
        else:
            with self._env.begin(buffers=buffers) as txn:
                yield from txn.cursor().iternext(keys=False, values=True)

    @_reading_iter
    def value_batches(self, size: int) -> Iterator[List]:
        """All values in key order, ``size`` per list (the last may be shorter), for bulk readers.

        The lists are built in C (no Python step per record) and hold bytes, which may be used
        after the next list is read (another thread sums them).
        """
        if self.backend == LEVELDB:
            with self._db.iterator(include_key=False, fill_cache=False) as iterator:
                yield from _lists_of(iterator, size)
        else:
            with self._env.begin(buffers=False) as txn:
                yield from _lists_of(txn.cursor().iternext(keys=False, values=True), size)

    @_reading
    def live_tables(self) -> List[str]:
        """LevelDB: the table files of the database's current version, as LevelDB lists them
        (``leveldb.sstables``; level by level, not in key order).  Opening the database replayed
        its log into a table, and the open database holds LOCK, so these hold every record."""
        if self.backend != LEVELDB:
            raise StoreError("live_tables is for LevelDB databases", self.path)
        listing = (self._db.get_property(b"leveldb.sstables") or b"").decode("ascii", "replace")
        tables = []
        for line in listing.splitlines():  # " NUMBER:SIZE[smallest .. largest]" (no regex: start-up)
            number, colon, _ = line[1:].partition(":")
            if not (line.startswith(" ") and colon and number.isdigit()):
                continue
            name = f"{int(number):06d}"
            found = [os.path.join(self.path, f"{name}{suffix}") for suffix in LEVELDB_TABLE_SUFFIXES]
            tables.append(next((candidate for candidate in found if os.path.isfile(candidate)), found[0]))
        return tables

    def batches_from(self, start: Key, size: int) -> Iterator[Tuple[List[bytes], List]]:
        """(keys, values) lists of ``size`` records from key ``start`` on, in key order, to the end.

        LMDB values are buffers into its map, valid until the next lists are requested.
        """
        start = _as_bytes(start)
        if self.backend == LEVELDB:
            with self._db.iterator(start=start, fill_cache=False) as iterator:
                for pairs in _lists_of(iterator, size):
                    keys, values = zip(*pairs)
                    yield list(keys), list(values)
        else:
            with self._env.begin(buffers=True) as txn:
                cursor = txn.cursor()
                if not cursor.set_range(start):
                    return
                for pairs in _lists_of(cursor.iternext(keys=True, values=True), size):
                    keys, values = zip(*pairs)
                    yield [bytes(k) for k in keys], list(values)

    @_reading
    def get(self, key: Key) -> Optional[bytes]:
        """The value stored under ``key``, or None."""
        key = _as_bytes(key)
        if self.backend == LEVELDB:
            return self._db.get(key)
        with self._env.begin(buffers=False) as txn:
            return txn.get(key)

    @_reading
    def __len__(self) -> int:
        if self._length is None:
            if self.backend == LMDB:
                self._length = int(self._env.stat()["entries"])
            else:
                # LevelDB keeps no record count: count once by iterating the keys.
                with self._db.iterator(include_value=False, fill_cache=False) as iterator:
                    self._length = sum(1 for _ in iterator)
        return self._length

    def close(self) -> None:
        """Release the database (LevelDB holds a lock file while open)."""
        if self.backend == LEVELDB:
            self._db.close()
        else:
            self._env.close()


@contextlib.contextmanager
def open_reader(path: PathLike, backend: Optional[str] = None) -> Iterator[Reader]:
    """Open an existing database read-only; ``backend`` is detected from its files when None."""
    path = os.fspath(path)
    found = detect_backend(path)
    if backend is not None and check_backend(backend) != found:
        raise StoreError(f"is a {found} database, not {check_backend(backend)}", path)
    reader = Reader(path, found)
    try:
        yield reader
    finally:
        reader.close()
