"""The Data layer's streaming path: databases larger than the memory they may take.

:class:`StreamedRecords` stands in for :class:`lymph_cv.net.datalayer.Records` (``shape``, ``len``,
``gather(rows)``) without holding the database: a reader thread walks it in key order, decoding
chunks of :data:`CHUNK_RECORDS` records ahead of use into a bounded queue, and ``gather`` takes the
rows a batch needs from the chunks at hand.  Batches read consecutive records (wrapping at the end),
so the reader stays a few chunks ahead and the net rarely waits; any other request (a resumed run,
a test pass of the same database) restarts the reader at that chunk.  The rows and labels are the
ones the in-memory path gives, so training is identical whichever path is taken.

The chunk starts are found by one key-only scan at open (the same scan that counts a LevelDB).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from lymph_cv.errors import FormatError, StoreError
from lymph_cv.formats.caffe.datum import parse_datum
from lymph_cv.formats.caffe.mean import raw_layout
from lymph_cv.formats.store import open_reader

log = logging.getLogger(__name__)

#: Records per decoded chunk (about 8 MB of the tutorial's 36×36 patches).
CHUNK_RECORDS = 2048
#: Chunks the reader decodes ahead of the batches.
CHUNKS_AHEAD = 4
#: Decoded chunks kept for reuse (a batch can span two; the TEST layer may share the database).
CHUNKS_KEPT = 3
#: Raw datum's label tag (field 5, varint) after the pixels.
_TAG_LABEL = 0x28
#: A one-byte varint holds 0..127.
_ONE_BYTE_VARINT = 0x80


def scan_database(path: os.PathLike, backend: Optional[str], every: int = CHUNK_RECORDS
                  ) -> Tuple[int, List[bytes], Tuple[int, ...], np.dtype]:
    """(record count, every ``every``-th key from the first, first record's shape, its dtype) by a key scan."""
    path = Path(path)
    anchors: List[bytes] = []
    count = 0
    with open_reader(path, backend) as reader:
        for count, key in enumerate(reader.keys(), 1):
            if (count - 1) % every == 0:
                anchors.append(key)
        if count == 0:
            raise StoreError("database is empty", path)
        try:
            pixels, _ = parse_datum(reader.get(anchors[0]))
        except FormatError as exc:
            raise FormatError(f"record {anchors[0].decode(errors='replace')}: {exc.detail}", path) from exc
    return count, anchors, pixels.shape, pixels.dtype


def decode_chunk(values: list, keys: list, shape: Tuple[int, ...], dtype: np.dtype, source: Path
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """(images (n, C, H, W), labels int64 (n)) of serialized datums, in order.

    Raw datums of one length and layout are sliced out of one joined array; anything else is
    parsed one record at a time (as the in-memory path does).
    """
    n = len(values)
    layout = raw_layout(values[0]) if dtype == np.uint8 else None
    if layout is not None and layout[1] == tuple(shape) and all(len(v) == len(values[0]) for v in values):
        header, size = len(layout[0]), int(np.prod(shape))
        table = np.frombuffer(b"".join(values), np.uint8).reshape(n, len(values[0]))
        same = (table[:, :header] == np.frombuffer(layout[0], np.uint8)).all()
        if same and table.shape[1] > header + size + 1:
            tags, first = table[:, header + size], table[:, header + size + 1]
            if (tags == _TAG_LABEL).all() and (first < _ONE_BYTE_VARINT).all():
                images = table[:, header : header + size].reshape((n,) + tuple(shape)).copy()
                return images, first.astype(np.int64)
    images = np.empty((n,) + tuple(shape), dtype)
    labels = np.empty(n, np.int64)
    for i, value in enumerate(values):
        try:
            pixels, label = parse_datum(bytes(value))
        except FormatError as exc:
            raise FormatError(f"record {bytes(keys[i]).decode(errors='replace')}: {exc.detail}", source) from exc
        if pixels.shape != tuple(shape):
            raise FormatError(f"record {bytes(keys[i]).decode(errors='replace')} has shape {pixels.shape}, "
                              f"the first record {tuple(shape)}", source)
        images[i], labels[i] = pixels, label
    return images, labels


class _Reader(threading.Thread):
    """Decodes chunks ``start, start+1, …`` (wrapping) into ``out`` until stopped."""

    def __init__(self, records: "StreamedRecords", start: int):
        super().__init__(name=f"stream:{records.source.name}", daemon=True)
        self.records = records
        self.start_chunk = start
        self.out: "queue.Queue[tuple]" = queue.Queue(maxsize=CHUNKS_AHEAD)
        self.stop = threading.Event()

    def _put(self, item: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        records = self.records
        chunk = self.start_chunk
        try:
            with open_reader(records.source, records.backend) as reader:
                while not self.stop.is_set():
                    # One pass from this chunk to the end of the database, then wrap to chunk 0.
                    for keys, values in reader.batches_from(records.anchors[chunk], CHUNK_RECORDS):
                        images, labels = decode_chunk(values, keys, records.shape, records.dtype, records.source)
                        if not self._put((chunk, images, labels)):
                            return
                        chunk += 1
                        if chunk == records.chunks:
                            break
                    chunk = 0
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(("error", exc, None))


class StreamedRecords:
    """A database read as the batches need it (see the module docstring); ``gather`` as Records'."""

    def __init__(self, path: os.PathLike, backend: Optional[str] = None, scan: Optional[tuple] = None):
        self.source = Path(path)
        self.backend = backend
        self.count, self.anchors, self.shape, self.dtype = scan or scan_database(self.source, backend)
        self.chunks = len(self.anchors)
        self._kept: "OrderedDict[int, Tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self._reader: Optional[_Reader] = None
        self._next = 0  # the chunk the running reader delivers next
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"StreamedRecords({self.source}, {self.count} records)"

    def _restart(self, chunk: int) -> None:
        self.close()
        log.debug("%s: reading from chunk %d", self.source, chunk)
        self._reader = _Reader(self, chunk)
        self._next = chunk
        self._reader.start()

    def _chunk(self, chunk: int) -> Tuple[np.ndarray, np.ndarray]:
        if chunk in self._kept:
            self._kept.move_to_end(chunk)
            return self._kept[chunk]
        ahead = (chunk - self._next) % self.chunks
        if self._reader is None or ahead > CHUNKS_AHEAD:
            self._restart(chunk)
        while True:
            got, images, labels = self._reader.out.get()
            if got == "error":
                self._reader = None
                raise images
            self._next = (got + 1) % self.chunks
            self._kept[got] = (images, labels)
            while len(self._kept) > CHUNKS_KEPT:
                self._kept.popitem(last=False)
            if got == chunk:
                return images, labels

    def gather(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(images[rows], labels[rows]) as the in-memory Records would give them."""
        rows = np.asarray(rows, dtype=np.int64)
        with self._lock:
            images = np.empty((len(rows),) + tuple(self.shape), self.dtype)
            labels = np.empty(len(rows), np.int64)
            chunk_of = rows // CHUNK_RECORDS
            # In order of first use, so a wrapping batch asks for the last chunk before chunk 0.
            _, first = np.unique(chunk_of, return_index=True)
            for chunk in chunk_of[np.sort(first)].tolist():
                chunk_images, chunk_labels = self._chunk(chunk)
                where = chunk_of == chunk
                local = rows[where] - chunk * CHUNK_RECORDS
                images[where], labels[where] = chunk_images[local], chunk_labels[local]
        return images, labels

    def close(self) -> None:
        """Stop the reader thread (it holds the database open)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop.set()
            reader.join()

    def __del__(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.stop.set()


def decoded_size(count: int, shape: Tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes the whole database takes decoded."""
    return int(count) * int(np.prod(shape)) * np.dtype(dtype).itemsize


def parse_memory(text: str) -> int:
    """``--max-memory``: bytes from ``N``, ``N[KMGT]`` or ``N[KMGT]iB`` (powers of 1024)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in units and value[-1:] else ""
    number = value[: len(value) - len(unit)]
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"expected a size such as 512M or 2G, got {text!r}") from None
    if amount <= 0:
        raise ValueError(f"expected a positive size, got {text!r}")
    return int(amount * units[unit])
