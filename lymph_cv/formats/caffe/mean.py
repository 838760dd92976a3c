"""``compute_image_mean``'s arithmetic, fast: Caffe's float32 running sum over a database's records.

Caffe adds every record's pixels to a float32 sum, record after record (one rounding per record
and pixel once a sum passes 2^24), then divides by the count in float32.  Up to
:data:`EXACT_RECORDS` uint8 records no sum can pass 2^24, so every float32 step is exact and
the sum is the integer one: it is taken in uint16 blocks (twice as fast, the same bytes).  Past
that, numpy's ``add.reduce``
along axis 0 of a C-contiguous float32 array adds row after row in that same order (it sums
pairwise only along the contiguous axis), so blocks of records are summed with one call per
block and give Caffe's bytes for any database size (tests/test_mean.py holds it to the naive loop).

This module is on the start-up path of the ``compute_image_mean`` tool: it imports numpy and
the store only (no protobuf, OpenCV, torch or stages); parsing falls back to the protobuf
runtime only for records that are not raw datums laid out as Caffe writes them.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional, Union

import numpy as np

from lymph_cv.core.fsutil import atomic_write_bytes
from lymph_cv.errors import FormatError, InputError, LymphCVError
from lymph_cv.formats import store
from lymph_cv.formats.caffe import meanscan
from lymph_cv.formats.caffe.meanscan import MEAN_PROGRESS_EVERY
from lymph_cv.formats.caffe.wire import decode_varint

log = logging.getLogger(__name__)

#: Records per float32 reduction block: the block (rows + 1) × C·H·W float32 stays in the L2 cache.
REDUCE_ROWS = 64
#: uint8 records whose running sums stay exact in float32 (255 · n < 2^24): up to here Caffe's
#: float32 sum is the integer sum.
EXACT_RECORDS = (1 << 24) // 255
#: Records per uint16 block sum (255 · 257 < 2^16).
INTEGER_BLOCK_ROWS = 256
#: Records read per batch (a few MB for the tutorial's 36×36 patches) and handed to the summing thread.
READ_BATCH = 2048
#: Batches read ahead of the summing thread (bounds the memory to a few batches).
READ_AHEAD = 2
#: Datum field tags (field number << 3 | wire type) of channels, height, width, data.
_TAG_CHANNELS, _TAG_HEIGHT, _TAG_WIDTH, _TAG_DATA = 0x08, 0x10, 0x18, 0x22
#: A legacy blob's dimensions: num, channels, height, width.
LEGACY_NDIM = 4


class MeanAccumulator:
    """``compute_image_mean``'s float32 running sum over records in database order.

    uint8 (C, H, W) records go to the native accumulator (:mod:`lymph_cv.formats.ldbscan`) when it
    is built and on; the first float_data record (or rows it cannot take) hands its sum over to the
    numpy arithmetic below, with the same bytes either way.
    """

    def __init__(self) -> None:
        self._sum: Optional[np.ndarray] = None  # float32, 0 while the exact sum holds the total
        self.count = 0
        self.shape: Optional[tuple[int, ...]] = None
        self._pending: list[np.ndarray] = []
        self._block: Optional[np.ndarray] = None
        # The exact integer sum while only uint8 records within EXACT_RECORDS came (self._sum is then 0).
        self._exact: Optional[np.ndarray] = None
        self._integral = True
        self._native = None  # ldbscan.Accumulator while it holds the sum

    def _start(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(d) for d in shape)
        size = int(np.prod(self.shape))
        self._sum = np.zeros(size, np.float32)
        self._exact = np.zeros(size, np.uint32)
        self._block = np.empty((REDUCE_ROWS + 1, size), np.float32)
        native = meanscan.native_module()
        if native is not None and len(self.shape) == 3:
            self._native = native.Accumulator()

    @property
    def sum(self) -> Optional[np.ndarray]:
        """The float32 running sum as Caffe's (flat), None before the first record."""
        self.flush()
        if self._native is not None:
            return self._native_sum()
        if self._exact is None or self._sum is None:
            return self._sum
        return self._exact.astype(np.float32)

    @property
    def uses_native(self) -> bool:
        """Whether the native accumulator holds the sum (uint8 records only so far)."""
        return self._native is not None

    def _native_sum(self) -> np.ndarray:
        if not self.count:
            return np.zeros_like(self._sum)
        return np.frombuffer(self._native.result()[2], "<f4").astype(np.float32)

    def __len__(self) -> int:
        """Records added so far."""
        return self.count + len(self._pending)

    def _check(self, shape: tuple[int, ...]) -> None:
        if self._sum is None:
            self._start(shape)
        elif tuple(shape) != self.shape:
            raise InputError(f"record is {'x'.join(map(str, shape))}, the first was {'x'.join(map(str, self.shape))}")

    def add(self, pixels: np.ndarray) -> None:
        """Add one uint8 (C, H, W) record (buffered)."""
        self._check(pixels.shape)
        self._pending.append(pixels.reshape(-1))
        if len(self._pending) == REDUCE_ROWS:
            self.flush()

    def add_batch(self, batch: np.ndarray, shape: tuple[int, ...]) -> None:
        """Add uint8 records (B, C·H·W) of ``shape`` (C, H, W), in order (rows may be a strided view)."""
        self.flush()
        self._check(tuple(shape))
        self._add_rows(batch)

    def add_float(self, values: np.ndarray) -> None:
        """Add one float_data record (C, H, W), summed in float32 as Caffe does."""
        self.flush()
        self._check(values.shape)
        self._settle()
        self._sum += values.reshape(-1).astype(np.float32)
        self.count += 1

    def flush(self) -> None:
        if self._pending:
            rows, self._pending = np.stack(self._pending), []
            self._add_rows(rows)

    def _settle(self) -> None:
        """Hand the native or the exact integer sum (exact: it is below 2^24) to the float32 one for good."""
        if self._native is not None:
            self._sum[:] = self._native_sum()
            self._native = None
            self._exact = None
        if self._exact is not None:
            self._sum[:] = self._exact
            self._exact = None
        self._integral = False

    def _add_rows(self, rows: np.ndarray) -> None:
        if self._native is not None and rows.dtype == np.uint8:
            try:
                self._native.add_rows(rows, self.shape)
            except ValueError:  # rows the native accumulator cannot read in place: numpy from here
                self._settle()
            else:
                self.count += len(rows)
                return
        if self._integral and rows.dtype == np.uint8:
            exact = min(len(rows), max(0, EXACT_RECORDS - self.count))
            for start in range(0, exact, INTEGER_BLOCK_ROWS):
                chunk = rows[start : min(start + INTEGER_BLOCK_ROWS, exact)]
                self._exact += np.add.reduce(chunk, axis=0, dtype=np.uint16)
            self.count += exact
            rows = rows[exact:]
            if not len(rows):
                return
        self._settle()
        block = self._block
        for start in range(0, len(rows), REDUCE_ROWS):
            chunk = rows[start : start + REDUCE_ROWS]
            used = block[: len(chunk) + 1]
            used[0] = self._sum
            used[1:] = chunk  # uint8 → float32
            np.add.reduce(used, axis=0, out=self._sum)  # row after row, one float32 rounding each
        self.count += len(rows)

    def mean(self) -> np.ndarray:
        """The (C, H, W) float32 mean (sum / count in float32)."""
        self.flush()
        if self._sum is None or self.count == 0:
            raise InputError("no records to average")
        return (self.sum / np.float32(self.count)).reshape(self.shape)


def channel_means(mean: np.ndarray) -> list[float]:
    """Per-channel values as compute_image_mean logs them (float32 running sum / H·W)."""
    flat = mean.reshape(mean.shape[0], -1).astype(np.float32)
    return [float(np.cumsum(row, dtype=np.float32)[-1] / np.float32(row.size)) for row in flat]


def mean_to_bytes(array: np.ndarray) -> bytes:
    """Serialized mean blob of a (C, H, W) or (1, C, H, W) array, exactly as compute_image_mean writes it.

    A legacy BlobProto: num 1, channels, height, width (fields 1-4), then the packed float32
    ``data`` (field 5), assembled here so the tool need not load the protobuf runtime.
    """
    array = np.asarray(array)
    if array.ndim == LEGACY_NDIM and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise FormatError(f"a mean must be (C, H, W), got shape {array.shape}")
    return meanscan.blob_bytes(array.shape, np.ascontiguousarray(array, dtype="<f4").tobytes())


def write_mean(path: Union[str, os.PathLike], array: np.ndarray) -> None:
    """Write a mean file (legacy 1 × C × H × W BlobProto) atomically."""
    atomic_write_bytes(path, mean_to_bytes(array))


def raw_layout(value: bytes) -> Optional[tuple[bytes, tuple[int, int, int]]]:
    """(header bytes, (C, H, W)) of a raw datum as Caffe writes it (channels, height, width, then
    ``data`` of C·H·W bytes); None for any other record (encoded, float_data, another field order)."""
    position, dims = 0, []
    for tag in (_TAG_CHANNELS, _TAG_HEIGHT, _TAG_WIDTH):
        if position >= len(value) or value[position] != tag:
            return None
        number, position = decode_varint(value, position + 1)
        if number <= 0:
            return None
        dims.append(number)
    if position >= len(value) or value[position] != _TAG_DATA:
        return None
    length, position = decode_varint(value, position + 1)
    if length != dims[0] * dims[1] * dims[2] or position + length > len(value):
        return None
    return bytes(value[:position]), (dims[0], dims[1], dims[2])


class _Summer:
    """Runs additions to an accumulator in a thread of its own (numpy and bytes.join release the
    GIL), so reading the next records overlaps summing the previous ones; order is kept."""

    def __init__(self, accumulator: MeanAccumulator) -> None:
        self.accumulator = accumulator
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mean")
        self._pending: list[Future] = []

    def submit(self, function: Callable, *args) -> None:
        self._pending.append(self._pool.submit(function, *args))
        while len(self._pending) > READ_AHEAD:
            self._pending.pop(0).result()

    def drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def mean_of_db(
    path: Union[str, os.PathLike], backend: Optional[str] = None, progress=None, progress_every: int = MEAN_PROGRESS_EVERY,
    native: bool = True,
) -> tuple[np.ndarray, int]:
    """compute_image_mean: the float32 (C, H, W) mean of every Datum of a database, in key order.

    The native module (:mod:`.meanscan`) computes it when it applies and ``native`` (same bytes); else:

    Raw datums laid out as Caffe writes them are summed in bulk: a batch of equal-length records
    is joined into one array and its pixel columns summed without a parse.  Other records
    (encoded: decoded with native channels; float_data: summed as floats) are parsed one by one.
    Every record must have the first one's size.  ``progress(count)`` every ``progress_every`` records.
    This thread reads; a summing thread joins and adds each batch, in order (both copy and sum
    without the GIL, so they overlap with LevelDB's block reads).
    """
    if native:
        try:
            result = meanscan.native_mean_of_db(path, backend)
        except meanscan.NativeUnavailable as exc:
            log.debug("%s: the numpy mean (%s)", path, exc.reason)
        else:
            if progress is not None:
                for done in range(progress_every, result.count + 1, progress_every):
                    progress(done)
            return np.frombuffer(result.mean, "<f4").reshape(result.shape).astype(np.float32), result.count
    accumulator = MeanAccumulator()
    summer = _Summer(accumulator)
    batches = _BatchAdder(accumulator, path)
    count = 0
    try:
        with store.open_reader(path, backend) as reader:
            for batch in reader.value_batches(READ_BATCH):
                summer.submit(batches.add, batch, count)
                if progress is not None:
                    for done in range(count - count % progress_every + progress_every, count + len(batch) + 1,
                                      progress_every):
                        progress(done)
                count += len(batch)
            summer.drain()
    finally:
        summer.close()
    if not len(accumulator):
        raise InputError("database is empty; no mean to compute", path)
    return accumulator.mean(), accumulator.count


class _BatchAdder:
    """Adds batches of serialized records in order: in bulk while they keep one raw layout."""

    def __init__(self, accumulator: MeanAccumulator, path) -> None:
        self.accumulator = accumulator
        self.path = path
        self.layout: Optional[tuple[bytes, tuple[int, int, int]]] = None

    def add(self, batch: list, first: int) -> None:
        """Add ``batch``, whose first record has index ``first`` (for error messages)."""
        if self.layout is None:
            self.layout = raw_layout(batch[0])
            if self.layout is not None and self.accumulator.shape not in (None, self.layout[1]):
                self.layout = None  # another size: the one-by-one path names the record
        rows = _bulk_rows(batch, self.layout)
        if rows is not None:
            self.accumulator.add_batch(rows, self.layout[1])
        else:
            _add_one_by_one(self.accumulator, batch, first, self.path)
            self.layout = None  # the next batch may be laid out differently


def _bulk_rows(batch: list, layout: Optional[tuple[bytes, tuple[int, int, int]]]) -> Optional[np.ndarray]:
    """The (B, C·H·W) pixel columns of a batch of raw datums of one layout, or None when any differs."""
    if layout is None:
        return None
    header, (channels, height, width) = layout
    lengths = set(map(len, batch))
    if len(lengths) != 1:
        return None
    length = lengths.pop()
    table = np.frombuffer(b"".join(batch), np.uint8).reshape(len(batch), length)
    expected = np.frombuffer(header, np.uint8)
    if not (table[:, : len(header)] == expected).all():
        return None
    return table[:, len(header) : len(header) + channels * height * width]


def _add_one_by_one(accumulator: MeanAccumulator, batch: list, first: int, path) -> None:
    from lymph_cv.formats.caffe.datum import parse_datum  # the protobuf runtime, only when needed

    for index, value in enumerate(batch, first):
        try:
            pixels, _ = parse_datum(bytes(value))
            if pixels.dtype == np.uint8:
                accumulator.add(pixels)
            else:
                accumulator.add_float(pixels)
        except LymphCVError as exc:
            raise InputError(f"record {index}: {exc.detail}", path) from exc  # 0-based, as keys and inspect
