"""LevelDB databases written as table files directly, for records that arrive in increasing key order.

Every database this project builds gets its keys in increasing order (Caffe's ``%08d_name``, the
index counting up).  Through LevelDB itself each record would go to the log, the memtable and a
table, and be checksummed and snappy-compressed on the way (image bytes do not compress, so
snappy stores them raw after trying).  :class:`TableWriter` writes the sorted records once,
straight into uncompressed table files (the C module ``ldbwrite``), names them in a MANIFEST
at the last level (non-overlapping, so LevelDB never compacts them) and CURRENT; LevelDB, Caffe
included, then opens the folder as any database.  The records are the same bytes; only the file
layout differs.  A key that does not increase ends the tables: the rest goes through LevelDB.

``LYMPH_CV_NATIVE=0`` in the environment (or a build without the C module) keeps LevelDB's own
writes everywhere.
"""
from __future__ import annotations

import os
import struct
TYPE_CHECKING = False  # typing.TYPE_CHECKING unimported: typing is ~5 ms of the tools' start-up (issue 17)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Sequence

from lymph_cv.core.fsutil import write_all
from lymph_cv.core.native import NATIVE_ENV, native_enabled  # noqa: F401 (NATIVE_ENV: the switch, named here for callers)
from lymph_cv.formats.caffe.wire import encode_varint

try:
    from lymph_cv.formats import ldbwrite
except ImportError:  # built without a C compiler: LevelDB's own writes only
    ldbwrite = None

#: The data block size Caffe gives LevelDB (util/db_leveldb.cpp).
BLOCK_SIZE = 65536
#: Records per table file: about one LevelDB memtable (Caffe's 256 MiB write buffer) per file.
TABLE_BYTES = 256 * 1024 * 1024
#: LevelDB's last level (kNumLevels - 1): never picked for compaction.
LAST_LEVEL = 6
MANIFEST_NUMBER = 1
FIRST_TABLE_NUMBER = 2
COMPARATOR = b"leveldb.BytewiseComparator"
#: VersionEdit tags (db/version_edit.cc).
_COMPARATOR, _LOG_NUMBER, _NEXT_FILE, _LAST_SEQUENCE, _NEW_FILE, _PREV_LOG_NUMBER = 1, 2, 3, 4, 7, 9
#: Log format (db/log_format.h): 32 KiB blocks, 7-byte record headers, record types.
_LOG_BLOCK, _LOG_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def available() -> bool:
    """Whether table files are written natively (the C module is built and not switched off)."""
    return ldbwrite is not None and native_enabled()


def _length_prefixed(data: bytes) -> bytes:
    return encode_varint(len(data)) + data


def version_edit(tables: Sequence[tuple[int, int, bytes, bytes]], last_sequence: int, next_file: int) -> bytes:
    """A VersionEdit naming ``tables`` ((number, size, smallest, largest internal key)) at the last level."""
    parts = [encode_varint(_COMPARATOR), _length_prefixed(COMPARATOR),
             encode_varint(_LOG_NUMBER), encode_varint(0), encode_varint(_PREV_LOG_NUMBER), encode_varint(0),
             encode_varint(_NEXT_FILE), encode_varint(next_file), encode_varint(_LAST_SEQUENCE), encode_varint(last_sequence)]
    for number, size, smallest, largest in tables:
        parts += [encode_varint(_NEW_FILE), encode_varint(LAST_LEVEL), encode_varint(number), encode_varint(size),
                  _length_prefixed(smallest), _length_prefixed(largest)]
    return b"".join(parts)


def log_records(payload: bytes) -> bytes:
    """``payload`` as one record of LevelDB's log format (fragmented over 32 KiB blocks), from a block start."""
    out, offset, first = bytearray(), 0, True
    while True:
        room = _LOG_BLOCK - len(out) % _LOG_BLOCK
        if room < _LOG_HEADER:  # a block's tail too short for a header is zero-filled
            out += bytes(room)
            room = _LOG_BLOCK
        fragment = payload[offset : offset + room - _LOG_HEADER]
        offset += len(fragment)
        last = offset == len(payload)
        kind = _FULL if first and last else _FIRST if first else _LAST if last else _MIDDLE
        crc = ldbwrite.mask(ldbwrite.crc32c(fragment, ldbwrite.crc32c(bytes((kind,)))))
        out += struct.pack("<IHB", crc, len(fragment), kind) + fragment
        first = False
        if last:
            return bytes(out)


class TableWriter:
    """Records in increasing key order into table files under ``folder`` (a new, empty database folder).

    :meth:`add` / :meth:`add_fixed` return how many records they took; fewer means a key did not
    increase (the caller goes on through LevelDB after :meth:`finish`).  :meth:`finish` writes the
    MANIFEST and CURRENT that make the folder a LevelDB database.
    """

    def __init__(self, folder: Path, table_bytes: int = TABLE_BYTES, block_size: int = BLOCK_SIZE):
        from pathlib import Path  # here, not at the top: this module is on the tools' start-up path

        self.folder = Path(folder)
        self._writer = ldbwrite.Writer(os.fspath(self.folder / "%06llu.ldb"), FIRST_TABLE_NUMBER, block_size,
                                       table_bytes, 1)
        self.finished = False

    def add(self, keys: Sequence[bytes], values: Sequence[bytes]) -> int:
        return self._writer.add(keys, values)

    def add_fixed(self, keys: Sequence[bytes], data, width: int) -> int:
        """Values are ``data``'s consecutive ``width``-byte slices (one buffer, no bytes object per record)."""
        return self._writer.add_fixed(keys, data, width)

    def finish(self) -> int:
        """Close the last table; write MANIFEST-000001 and CURRENT.  Returns the last sequence number."""
        tables, last_sequence = self._writer.finish()
        self.finished = True
        next_file = max([FIRST_TABLE_NUMBER - 1] + [number for number, *_ in tables]) + 1
        manifest = f"MANIFEST-{MANIFEST_NUMBER:06d}"
        edit = version_edit(tables, max(last_sequence, 0), next_file)
        _write_synced(self.folder / manifest, log_records(edit))
        _write_synced(self.folder / "CURRENT", (manifest + "\n").encode())
        return last_sequence

    def abandon(self) -> None:
        """Close an unfinished table (after an error; the caller removes the folder)."""
        if not self.finished:
            self._writer.abandon()


def _write_synced(path: Path, data: bytes) -> None:
    """As LevelDB writes its MANIFEST and CURRENT: on disk before the database counts as written."""
    with open(path, "wb") as handle:
        write_all(handle, data)
        os.fsync(handle.fileno())


def pread_rows(fd: int, rows, row_size: int, out, column: int) -> None:
    """Rows ``rows`` (contiguous int64) of the file ``fd`` (``row_size`` bytes each) into
    ``out[i, column : column + row_size]`` (``out`` a C-contiguous 2-D uint8 array), read with pread:
    nothing of the file is mapped, so a reader of a large shared array keeps none of it resident.
    Needs :func:`available`."""
    view = memoryview(out)
    if view.ndim != 2 or view.format != "B" or not view.c_contiguous or len(view) != len(rows):
        raise ValueError("pread_rows: out must be a C-contiguous (rows, width) uint8 array, a row per index")
    ldbwrite.pread_rows(fd, rows, row_size, out, column, view.shape[1])
