"""``compute_image_mean`` through the native module :mod:`lymph_cv.formats.ldbscan`, without numpy.

Three ways, the first that applies: LevelDB's live table files scanned directly (read in chunks
shared by both cores, no Python object per record); the database's values in key order (plyvel's
iterator, or zero-copy LMDB buffers) summed by the native accumulator; else
:class:`NativeUnavailable`, and the caller takes :mod:`lymph_cv.formats.caffe.mean` (numpy),
which gives the same bytes or names the record it cannot use.  All three add the records'
pixels to a float32 sum in key order exactly as Caffe does.  ``LYMPH_CV_NATIVE=0`` turns the
native ways off (and so does a build without a C compiler: the module is optional).

This module is on the start-up path of the ``compute_image_mean`` tool: stdlib, the store and
the extension only.
"""
from __future__ import annotations

import logging
import os
TYPE_CHECKING = False  # typing.TYPE_CHECKING unimported: typing is ~5 ms of the tools' start-up (issue 17)
if TYPE_CHECKING:
    from typing import Optional, Sequence, Union

from lymph_cv.core.fsutil import atomic_write_bytes
from lymph_cv.core.native import NATIVE_ENV, native_enabled  # noqa: F401 (NATIVE_ENV: the switch, named here for callers)
from lymph_cv.errors import FormatError
from lymph_cv.formats import store
from lymph_cv.formats.caffe.wire import encode_varint

log = logging.getLogger(__name__)

#: BlobProto tags: num, channels, height, width (varints) and the packed float ``data``.
BLOB_DIM_TAGS, BLOB_TAG_DATA = (0x08, 0x10, 0x18, 0x20), 0x2A
#: compute_image_mean logs its progress every this many records.
MEAN_PROGRESS_EVERY = 10000
#: Bytes of one float32.
FLOAT_BYTES = 4


class NativeUnavailable(Exception):
    """The native way does not apply here (``reason``): take the numpy path."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NativeMean:
    """compute_image_mean's result: ``mean`` and ``sum`` are float32 (C, H, W) little-endian bytes;
    ``way`` is how the records were read ("tables" or "values").  A plain class, not a dataclass:
    dataclasses import inspect, a start-up cost of the tool."""

    __slots__ = ("count", "shape", "sum", "mean", "channel_means", "way")

    def __init__(self, count: int, shape: tuple[int, int, int], total: bytes, mean: bytes,
                 channel_means: tuple[float, ...], way: str):
        self.count, self.shape, self.sum, self.mean = count, shape, total, mean
        self.channel_means, self.way = channel_means, way


def native_module():
    """:mod:`lymph_cv.formats.ldbscan`, or None when it is not built or ``LYMPH_CV_NATIVE=0``."""
    if not native_enabled():
        return None
    try:
        from lymph_cv.formats import ldbscan
    except ImportError as exc:  # an optional build that failed: the numpy path is complete
        log.debug("native mean unavailable: %s", exc)
        return None
    return ldbscan


def native_mean_of_db(path: Union[str, os.PathLike], backend: Optional[str] = None,
                      threads: int = 0) -> NativeMean:
    """compute_image_mean of a database natively; :class:`NativeUnavailable` when it does not apply.

    Store errors (no such database, another backend) are raised as the numpy path raises them.
    ``threads`` 0: one per CPU (the bytes do not depend on it).
    """
    native = native_module()
    if native is None:
        raise NativeUnavailable("the native module is off or not built")
    with store.open_reader(path, backend) as reader:
        if reader.backend == store.LEVELDB:
            try:
                return _native_mean(native.scan_tables([os.fspath(t) for t in reader.live_tables()], threads),
                                    "tables")
            except native.Unsupported as exc:
                log.debug("%s: tables not scanned directly (%s); summing the values in key order", path, exc)
        accumulator = native.Accumulator(threads)
        try:
            accumulator.add_values(reader.values(buffers=True))
            return _native_mean(accumulator.result(), "values")
        except native.Unsupported as exc:
            raise NativeUnavailable(str(exc)) from None


def _native_mean(result: tuple, way: str) -> NativeMean:
    count, shape, total, mean, channel_means = result
    return NativeMean(int(count), tuple(shape), total, mean, tuple(channel_means), way)


def blob_bytes(shape: Sequence[int], values: bytes) -> bytes:
    """A legacy BlobProto (num 1, channels, height, width, then packed float32 ``data``) of a
    (C, H, W) ``shape`` and its little-endian float32 ``values``, as compute_image_mean writes it."""
    if len(shape) != 3 or len(values) != FLOAT_BYTES * shape[0] * shape[1] * shape[2]:
        raise FormatError(f"a mean must be (C, H, W) float32 values, got shape {tuple(shape)} and {len(values)} bytes")
    head = bytearray()
    for tag, dim in zip(BLOB_DIM_TAGS, (1,) + tuple(int(d) for d in shape)):
        head += bytes((tag,)) + encode_varint(dim)
    if values:
        head += bytes((BLOB_TAG_DATA,)) + encode_varint(len(values))
    return bytes(head) + values


def write_native_mean(path: Union[str, os.PathLike], result: NativeMean) -> None:
    """Write the mean file (legacy 1 × C × H × W BlobProto) atomically."""
    atomic_write_bytes(path, blob_bytes(result.shape, result.mean))
