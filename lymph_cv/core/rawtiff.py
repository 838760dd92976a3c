"""Uncompressed 8-bit RGB TIFFs (the tutorial's patch files) read without a decoder, in bulk.

OpenCV spends ~30 µs per ``imdecode`` of a 36×36 patch file (libtiff's set-up), more than a fold's
conversion may take in all.  Such a file is a fixed header, the pixels as stored, and a directory:
:func:`plain_layout` checks one file's directory strictly (only what cannot change the pixels is
allowed) and returns its :class:`Layout`; every other file whose non-pixel bytes equal that file's
has the same structure, so its pixels are the same bytes at the same place, and :func:`match` tells
which files of a batch those are with one comparison.  The pixels are those of
``cv2.imread(path, IMREAD_COLOR)`` (and ``IMREAD_UNCHANGED``) once the channels are reversed to BGR.
Anything else (compressed, tiled, 16-bit, grayscale, alpha, palette, an orientation) gives None:
the caller decodes it with OpenCV.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # numpy is imported by the bulk functions: plain_layout runs in readers without it
    import numpy as np

#: TIFF field types by size in bytes: BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED, SSHORT,
#: SLONG, SRATIONAL, FLOAT, DOUBLE.
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_SHORT, _LONG = 3, 4
_WIDTH, _HEIGHT, _BITS, _COMPRESSION, _PHOTOMETRIC = 256, 257, 258, 259, 262
_STRIP_OFFSETS, _SAMPLES, _ROWS_PER_STRIP, _STRIP_COUNTS, _PLANAR = 273, 277, 278, 279, 284
_FILL_ORDER, _ORIENTATION, _PREDICTOR, _SAMPLE_FORMAT = 266, 274, 317, 339
#: Tags that must hold exactly this value when present (the TIFF default is the same value).
_DEFAULTS = {_COMPRESSION: 1, _PLANAR: 1, _FILL_ORDER: 1, _ORIENTATION: 1, _PREDICTOR: 1, 254: 0}
#: Descriptive tags that do not change the pixels: resolution, names, dates, page number.
_DESCRIPTIVE = {269, 270, 271, 272, 282, 283, 285, 296, 297, 305, 306, 315, 316, 33432}
_RGB, _CHANNELS, _BITS_PER_SAMPLE = 2, 3, 8
#: libtiff's default RowsPerStrip (one strip).
_ALL_ROWS = (1 << 32) - 1


@dataclass(frozen=True)
class Layout:
    """Where one file's pixels lie; ``head``/``tail`` are its bytes before and after them."""

    size: int  # file size
    offset: int  # first pixel byte
    height: int
    width: int
    head: bytes
    tail: bytes

    @property
    def pixel_bytes(self) -> int:
        return self.height * self.width * _CHANNELS

    @property
    def chw(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of the pixels as a Datum holds them."""
        return _CHANNELS, self.height, self.width


def _values(data: bytes, order: str, entry: int) -> Optional[tuple[int, ...]]:
    """The integer values of the directory entry at byte ``entry`` (SHORT/LONG only), or None."""
    kind, count = struct.unpack_from(order + "HI", data, entry + 2)
    if kind not in (_SHORT, _LONG) or count == 0:
        return None
    size = _TYPE_SIZES[kind] * count
    where = entry + 8 if size <= 4 else struct.unpack_from(order + "I", data, entry + 8)[0]
    if where + size > len(data):
        return None
    return struct.unpack_from(f"{order}{count}{'H' if kind == _SHORT else 'I'}", data, where)


def plain_layout(data: bytes) -> Optional[Layout]:
    """The :class:`Layout` of an uncompressed, strip-organised, 8-bit, 3-sample RGB TIFF whose strips
    lie back to back and which carries no tag that could change its pixels; None for anything else."""
    if len(data) < 8 or data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "<" if data[:2] == b"II" else ">"
    directory = struct.unpack_from(order + "I", data, 4)[0]
    if directory + 2 > len(data):
        return None
    entries = struct.unpack_from(order + "H", data, directory)[0]
    if directory + 2 + 12 * entries > len(data):
        return None
    tags: dict[int, tuple[int, ...]] = {}
    for number in range(entries):
        entry = directory + 2 + 12 * number
        tag = struct.unpack_from(order + "H", data, entry)[0]
        if tag in _DESCRIPTIVE:
            continue
        values = _values(data, order, entry)
        if values is None or tag in tags:
            return None
        tags[tag] = values
    return _strip_layout(data, tags)


def _strip_layout(data: bytes, tags: dict[int, tuple[int, ...]]) -> Optional[Layout]:
    known = {_WIDTH, _HEIGHT, _BITS, _PHOTOMETRIC, _STRIP_OFFSETS, _SAMPLES, _ROWS_PER_STRIP, _STRIP_COUNTS,
             _SAMPLE_FORMAT, *_DEFAULTS}
    if not set(tags) <= known or any(tags.get(tag, (value,)) != (value,) for tag, value in _DEFAULTS.items()):
        return None
    if tags.get(_PHOTOMETRIC) != (_RGB,) or tags.get(_SAMPLES) != (_CHANNELS,):
        return None
    if tags.get(_BITS) not in ((_BITS_PER_SAMPLE,) * _CHANNELS, (_BITS_PER_SAMPLE,)):
        return None
    if tags.get(_SAMPLE_FORMAT, (1,) * _CHANNELS) not in ((1,) * _CHANNELS, (1,)):  # unsigned integers
        return None
    if len(tags.get(_WIDTH, ())) != 1 or len(tags.get(_HEIGHT, ())) != 1:
        return None
    width, height = tags[_WIDTH][0], tags[_HEIGHT][0]
    rows = min(tags.get(_ROWS_PER_STRIP, (_ALL_ROWS,))[0], height)
    offsets, counts = tags.get(_STRIP_OFFSETS, ()), tags.get(_STRIP_COUNTS, ())
    if width == 0 or height == 0 or rows == 0 or len(offsets) != -(-height // rows) or len(counts) != len(offsets):
        return None
    row_bytes = width * _CHANNELS
    for strip, (offset, count) in enumerate(zip(offsets, counts)):
        expected = min(rows, height - strip * rows) * row_bytes
        if count != expected or offset != offsets[0] + strip * rows * row_bytes:
            return None
    start, size = offsets[0], height * row_bytes
    if start < 8 or start + size > len(data):
        return None
    return Layout(len(data), start, height, width, bytes(data[:start]), bytes(data[start + size:]))


def stack(files: Sequence[bytes], size: int) -> np.ndarray:
    """Files of ``size`` bytes each as one (N, size) uint8 table (one copy)."""
    import numpy as np

    return np.frombuffer(b"".join(files), np.uint8).reshape(len(files), size)


def match(layout: Layout, table: np.ndarray) -> np.ndarray:
    """Which rows of a :func:`stack` of ``layout.size``-byte files have ``layout``'s head and tail."""
    import numpy as np

    end = layout.offset + layout.pixel_bytes
    same = (table[:, : layout.offset] == np.frombuffer(layout.head, np.uint8)).all(axis=1)
    if layout.tail:
        same &= (table[:, end:] == np.frombuffer(layout.tail, np.uint8)).all(axis=1)
    return same


def bgr_chw(layout: Layout, table: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) BGR pixels of a :func:`stack` of files of ``layout`` (a strided view)."""
    pixels = table[:, layout.offset : layout.offset + layout.pixel_bytes]
    return pixels.reshape(len(table), layout.height, layout.width, _CHANNELS)[..., ::-1].transpose(0, 3, 1, 2)
