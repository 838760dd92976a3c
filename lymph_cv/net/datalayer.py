"""Caffe's Data layer: a LevelDB/LMDB of Datums → batches of (data, label), transformed like Caffe.

Semantics (caffe-facts §4): records are read in key order and the reading wraps around at the end
(possibly in the middle of a batch), with no reshuffling; the mean file (the full C×H×W mean) is
subtracted at the crop offset, then the crop is mirrored; TRAIN takes random crop offsets in
0..H−crop inclusive, TEST the centre (Caffe since 2015-02-17; the tutorial's older build also
cropped at random in its in-training tests); ``mirror`` flips at random in either phase, as Caffe does;
``scale`` multiplies after the mean subtraction; ``mean_value`` is the per-channel alternative.

One deliberate improvement over Caffe: batch ``b`` of a layer is a pure function of ``(b, seed, phase)``.
Its records are ``skip + b·batch_size …`` (mod the record count; ``skip`` is Caffe's seeded ``rand_skip``
draw, 0 by default) and its crop/mirror draws come from an RNG seeded with ``(seed, phase, b)``.  So a
run resumed from a snapshot sees exactly the batches an uninterrupted run would have seen (Caffe
restarts its cursor at the first key instead).

Beyond Caffe, a TRAIN layer given an :class:`~lymph_cv.net.augment.Augmentation` also flips its
samples vertically and turns them by quarter turns after the transform (seeded the same way, from a
stream of its own, so the crops and mirrors stay what they were).

The database is decoded once into one uint8 array held in memory; batches are gathered with vectorised
numpy indexing (no per-sample Python loop).  A database larger than the memory it may take is streamed
instead (:mod:`lymph_cv.net.stream`: a reader thread decoding ahead, same rows and labels).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from lymph_cv.core.memory import available_memory
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import read_mean
from lymph_cv.formats.caffe.datum import parse_datum
from lymph_cv.errors import ConfigError, FormatError, StoreError, UnsupportedError
from lymph_cv.formats.store import open_reader
from lymph_cv.net.augment import STREAM_GEOMETRY, STREAM_STAIN, Augmentation, flip_and_turn, geometry_draws
from lymph_cv.net.hed import hed_jitter
from lymph_cv.net.augment import stream as augment_stream

log = logging.getLogger(__name__)

#: protobuf DataParameter.DB enum → our store backend names.
BACKEND_NAMES = {caffe_pb2.DataParameter.LEVELDB: "leveldb", caffe_pb2.DataParameter.LMDB: "lmdb"}
#: key of the rand_skip draw among a layer's random streams (batches use 0, 1, 2, …, never this).
SKIP_STREAM = 2 ** 64 - 1
#: fraction of the currently available memory a decoded database may take before it is memory-mapped.
MEMORY_FRACTION = 0.8


@dataclass
class Records:
    """A whole database decoded: ``images`` (N, C, H, W) in key order and their ``labels``."""

    images: np.ndarray
    labels: np.ndarray
    source: Path

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> Tuple[int, ...]:
        """One record's (C, H, W)."""
        return self.images.shape[1:]

    def gather(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(images[rows], labels[rows])."""
        return self.images[rows], self.labels[rows]


def _allocate(shape: Tuple[int, ...], dtype: np.dtype, source: Path) -> np.ndarray:
    """Room for a decoded database: in memory when it fits, else a memory-mapped scratch file
    (deleted at once, so it disappears with the process) that the page cache serves."""
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    free = available_memory()
    if free is None or need <= MEMORY_FRACTION * free:
        return np.empty(shape, dtype=dtype)
    log.warning("%s: %.1f GiB decoded exceed the %.1f GiB of available memory; using a memory-mapped "
                "scratch file in %s", source, need / 2**30, free / 2**30, tempfile.gettempdir())
    try:
        with tempfile.NamedTemporaryFile(prefix="lymph_cv_records_", suffix=".u8") as scratch:
            return np.lib.format.open_memmap(scratch.name, mode="w+", dtype=dtype, shape=shape)
    except OSError as exc:
        raise StoreError(f"cannot hold the decoded database ({need / 2**30:.1f} GiB) in memory or in "
                         f"{tempfile.gettempdir()}: {exc.strerror}", source) from exc


def load_records(path: os.PathLike, backend: Optional[str] = None) -> Records:
    """Decode every Datum of a database into memory, in key order."""
    path = Path(path)
    with open_reader(path, backend) as reader:
        count = len(reader)
        if count == 0:
            raise StoreError("database is empty", path)
        images: Optional[np.ndarray] = None
        labels = np.empty(count, dtype=np.int64)
        for i, (key, value) in enumerate(reader):
            try:
                pixels, label = parse_datum(value)
            except FormatError as exc:
                raise FormatError(f"record {key.decode(errors='replace')}: {exc.detail}", path) from exc
            if images is None:
                images = _allocate((count,) + pixels.shape, pixels.dtype, path)
            elif pixels.shape != images.shape[1:]:
                raise FormatError(f"record {key.decode(errors='replace')} has shape {pixels.shape}, "
                                  f"the first record {images.shape[1:]}", path)
            images[i] = pixels
            labels[i] = label
    log.debug("loaded %d records %s from %s", count, images.shape[1:], path)
    return Records(images, labels, path)


class RecordCache:
    """Databases loaded once per run, shared by the TRAIN and TEST layers that read the same file.

    A database whose decoded size exceeds ``max_memory`` bytes (default: :data:`MEMORY_FRACTION` of
    the memory available now) is streamed (:class:`lymph_cv.net.stream.StreamedRecords`) instead.
    """

    def __init__(self, max_memory: Optional[int] = None) -> None:
        self.max_memory = max_memory
        self._loaded: Dict[Tuple[str, Optional[str]], object] = {}

    def get(self, path: Path, backend: Optional[str]):
        key = (os.path.realpath(path), backend)
        if key not in self._loaded:
            self._loaded[key] = self._open(Path(path), backend)
        return self._loaded[key]

    def close(self) -> None:
        """Stop the reader threads of streamed databases (they restart if read again)."""
        for records in self._loaded.values():
            close = getattr(records, "close", None)
            if close is not None:
                close()

    def _open(self, path: Path, backend: Optional[str]):
        from lymph_cv.net.stream import StreamedRecords, decoded_size, scan_database

        scan = scan_database(path, backend)
        need = decoded_size(scan[0], scan[2], scan[3])
        free = available_memory()
        limit = self.max_memory if self.max_memory is not None else (None if free is None else MEMORY_FRACTION * free)
        if limit is None or need <= limit:
            return load_records(path, backend)
        log.info("%s: %.2f GiB decoded exceed the %.2f GiB allowed; streaming it", path, need / 2**30, limit / 2**30)
        return StreamedRecords(path, backend, scan=scan)


def _mean_for(transform: caffe_pb2.TransformationParameter, shape: Tuple[int, int, int],
              resolve: Callable[[str], Path], layer: str) -> Optional[np.ndarray]:
    """The (C, H, W) float32 mean to subtract (from mean_file or mean_value), or None."""
    channels = shape[0]
    if transform.HasField("mean_file") and len(transform.mean_value):
        raise ConfigError(f"layer {layer}: mean_file and mean_value cannot both be given")
    if transform.HasField("mean_file"):
        mean_path = resolve(transform.mean_file)
        mean = read_mean(mean_path)
        if mean.shape != shape:
            raise ConfigError(f"mean has shape {mean.shape}, the database's datums {shape}", mean_path)
        return np.ascontiguousarray(mean, dtype=np.float32)
    if len(transform.mean_value):
        values = np.asarray(transform.mean_value, dtype=np.float32)
        if len(values) not in (1, channels):
            raise ConfigError(f"layer {layer}: {len(values)} mean_value entries for {channels} channels "
                              "(expected 1 or one per channel)")
        return np.ascontiguousarray(np.broadcast_to(values.reshape(-1, 1, 1) if len(values) > 1
                                                    else values.reshape(1, 1, 1), shape), np.float32)
    return None


class DataLayer:
    """One Data layer of a built net: ``batch(b)`` gives the tops of batch number ``b``."""

    def __init__(self, layer: caffe_pb2.LayerParameter, phase: int, seed: int,
                 resolve: Callable[[str], Path], cache: Optional[RecordCache] = None,
                 augmentation: Optional[Augmentation] = None, shard: Tuple[int, int] = (0, 1)):
        self.name = layer.name
        # Caffe's multi-GPU rule (caffe-facts §13): in TRAIN, solver r of N keeps the records whose
        # global counter k has k mod N == r; TEST reads every record.  Batch b of rank r is thus the
        # strided slice r::N of the single-process batch b of N·batch_size records.
        self.rank, self.world = (shard if phase == caffe_pb2.TRAIN else (0, 1))
        self.tops = list(layer.top)
        self.phase = phase
        self.seed = seed
        data = layer.data_param
        transform = layer.transform_param
        if not data.HasField("source"):
            raise ConfigError(f"layer {layer.name}: data_param.source is not set")
        if data.batch_size <= 0:
            raise ConfigError(f"layer {layer.name}: data_param.batch_size must be > 0")
        for field in ("force_color", "force_gray"):
            if getattr(transform, field):
                raise UnsupportedError(f"layer {layer.name}: transform_param.{field} is not supported")
        self.batch_size = int(data.batch_size)
        self.source = resolve(data.source)
        backend = BACKEND_NAMES[data.backend] if data.HasField("backend") else None
        self.records = (cache or RecordCache()).get(self.source, backend)
        channels, height, width = self.records.shape
        self.crop = int(transform.crop_size)
        if self.crop > min(height, width):
            raise ConfigError(f"layer {layer.name}: crop_size {self.crop} exceeds the datums' "
                              f"{height}×{width}")
        self.mirror = bool(transform.mirror)
        self.scale = float(transform.scale)
        self.mean = _mean_for(transform, (channels, height, width), resolve, layer.name)
        #: Caffe's rand_skip: the cursor starts a random 0..rand_skip−1 records in (seeded here).
        self.skip = int(np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, phase, SKIP_STREAM])
                        .integers(data.rand_skip)) if data.rand_skip else 0
        out = self.crop or None
        self.output_shape = (self.batch_size, channels, out or height, out or width)
        #: flips and quarter turns after the transform (TRAIN only, as Caffe's random crops).
        used = augmentation is not None and (augmentation.geometric or augmentation.stain_jitter)
        self.augmentation = augmentation if used and phase == caffe_pb2.TRAIN else None
        if self.augmentation is not None and self.augmentation.stain_jitter and channels != 3:
            raise ConfigError(f"layer {layer.name}: stain jitter needs colour (3-channel) samples, "
                              f"the database holds {channels}-channel ones")
        if self.augmentation is not None and self.augmentation.rotate90 and \
                self.output_shape[2] != self.output_shape[3]:
            raise ConfigError(f"layer {layer.name}: quarter turns need square inputs, this layer gives "
                              f"{self.output_shape[2]}×{self.output_shape[3]} (set crop_size)")

    def __repr__(self) -> str:
        return f"DataLayer({self.name!r}, {self.source}, batch {self.batch_size})"

    def rng(self, batch: int) -> np.random.Generator:
        """The crop/mirror random stream of batch number ``batch`` (pure function of seed, phase, batch)."""
        return np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, self.phase, batch])

    def _mine(self, values: np.ndarray) -> np.ndarray:
        """This rank's share of a whole (all ranks') batch."""
        return values if self.world == 1 else values[self.rank::self.world]

    def indices(self, batch: int) -> np.ndarray:
        """Record indices of batch ``batch``: consecutive in key order, wrapping at the end."""
        size = self.batch_size * self.world
        start = self.skip + batch * size
        return self._mine((start + np.arange(size, dtype=np.int64)) % len(self.records))

    def offsets(self, batch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per sample: (mirror flag, h offset, w offset), Caffe's draws for this phase."""
        flip, h_off, w_off = self._offsets(batch, self.batch_size * self.world)
        return self._mine(flip), self._mine(h_off), self._mine(w_off)

    def _offsets(self, batch: int, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        _, height, width = self.records.shape
        rng = self.rng(batch)
        flip = rng.integers(0, 2, size=n).astype(bool) if self.mirror else np.zeros(n, dtype=bool)
        if self.crop and self.phase == caffe_pb2.TRAIN:
            h_off = rng.integers(0, height - self.crop + 1, size=n)
            w_off = rng.integers(0, width - self.crop + 1, size=n)
        else:
            h_off = np.full(n, (height - self.crop) // 2 if self.crop else 0)
            w_off = np.full(n, (width - self.crop) // 2 if self.crop else 0)
        return flip, h_off, w_off

    def transform(self, images: np.ndarray, flip: np.ndarray, h_off: np.ndarray,
                  w_off: np.ndarray) -> np.ndarray:
        """Caffe's DataTransformer on a batch: crop at the offsets, subtract the mean at the same
        source pixels, scale, then mirror the flagged samples."""
        n, channels, height, width = images.shape
        crop_h, crop_w = (self.crop, self.crop) if self.crop else (height, width)
        if np.all(h_off == h_off[0]) and np.all(w_off == w_off[0]):
            h0, w0 = int(h_off[0]), int(w_off[0])
            out = images[:, :, h0:h0 + crop_h, w0:w0 + crop_w].astype(np.float32)
            if self.mean is not None:
                out -= self.mean[None, :, h0:h0 + crop_h, w0:w0 + crop_w]
        else:
            windows = np.lib.stride_tricks.sliding_window_view(images, (crop_h, crop_w), axis=(2, 3))
            out = windows[np.arange(n), :, h_off, w_off].astype(np.float32)
            if self.mean is not None:
                mean_windows = np.lib.stride_tricks.sliding_window_view(self.mean, (crop_h, crop_w),
                                                                        axis=(1, 2))
                out -= mean_windows.transpose(1, 2, 0, 3, 4)[h_off, w_off]
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        if flip.any():
            out[flip] = out[flip][..., ::-1]
        return out

    def batch_arrays(self, batch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(data float32 N×C×H'×W', labels int64 N) of batch number ``batch``."""
        rows = self.indices(batch)
        if rows[0] > rows[-1]:
            log.debug("%s: restarting data prefetching from start", self.name)
        flip, h_off, w_off = self.offsets(batch)
        images, labels = self.records.gather(rows)
        if self.augmentation is not None and self.augmentation.stain_jitter:
            # On the stored uint8 samples, before the mean: the jitter acts on stain densities.
            images = hed_jitter(images, augment_stream(self.seed, self.phase, batch, STREAM_STAIN),
                                self.augmentation.stain_scale_sigma, self.augmentation.stain_shift_sigma)
        data = self.transform(images, flip, h_off, w_off)
        if self.augmentation is not None and self.augmentation.geometric:
            rng = augment_stream(self.seed, self.phase, batch, STREAM_GEOMETRY)
            flips, turns = geometry_draws(rng, self.batch_size, self.augmentation.vertical_flip,
                                          self.augmentation.rotate90)
            data = flip_and_turn(data, flips, turns)
        return data, labels

    def batch(self, batch: int, device: torch.device | str = "cpu") -> Dict[str, torch.Tensor]:
        """The layer's tops for batch number ``batch``: data, and the labels (as float, like Caffe)."""
        data, labels = self.batch_arrays(batch)
        tops = {self.tops[0]: torch.from_numpy(data).to(device, non_blocking=True)}
        if len(self.tops) > 1:
            tops[self.tops[1]] = torch.from_numpy(labels.astype(np.float32)).to(device, non_blocking=True)
        return tops
