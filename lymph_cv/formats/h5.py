"""PatchCamelyon's HDF5 files: ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5``.

As published: ``x`` holds a dataset ``x`` of N×96×96×3 uint8 RGB patches, ``y`` a dataset ``y`` of
N×1×1×1 uint8 labels (1 = the centre 32×32 holds tumour tissue).  Reading goes chunk by chunk
(h5py slices), so the 262,144 training patches (7 GB) never sit in memory at once.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Tuple, Union

import numpy as np

from lymph_cv.core.fsutil import atomic_path
from lymph_cv.errors import FormatError, InputError

PathLike = Union[str, os.PathLike]

PCAM_SPLITS = ("train", "valid", "test")
PCAM_FILE = "camelyonpatch_level_2_split_{split}_{part}.h5"
PCAM_SIZE = 96
PCAM_CHANNELS = 3
#: The labels PCam uses (1: the centre 32×32 holds tumour tissue).
PCAM_LABELS = (0, 1)
#: Patches read per h5py slice (about 28 MB of pixels).
READ_CHUNK = 1024
#: HDF5 chunking of written patch sets (as the published files: gzip, chunks of 32 patches).
WRITE_CHUNK = 32


def split_paths(folder: PathLike, split: str) -> Tuple[Path, Path]:
    """The ``x`` and ``y`` files of ``split`` in ``folder``."""
    folder = Path(folder)
    return tuple(folder / PCAM_FILE.format(split=split, part=part) for part in ("x", "y"))


def _dataset(handle, name: str, path: Path):
    if name not in handle:
        raise FormatError(f"no dataset {name!r} (PCam files hold 'x' and 'y'), found {sorted(handle)}", path)
    return handle[name]


@contextlib.contextmanager
def open_split(folder: PathLike, split: str) -> Iterator[Tuple[object, object]]:
    """The split's ``x`` (N×96×96×3 uint8) and ``y`` (N labels) h5py datasets, checked."""
    import h5py

    x_path, y_path = split_paths(folder, split)
    for path in (x_path, y_path):
        if not path.is_file():
            raise InputError(f"PCam file missing (expected {PCAM_FILE.format(split=split, part='x|y')})", path)
    with contextlib.ExitStack() as stack:
        handles = []
        for path in (x_path, y_path):
            try:
                handles.append(stack.enter_context(h5py.File(path, "r")))
            except OSError as exc:
                raise FormatError(f"not an HDF5 file ({exc})", path) from None
        x, y = _dataset(handles[0], "x", x_path), _dataset(handles[1], "y", y_path)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (PCAM_SIZE, PCAM_SIZE, PCAM_CHANNELS):
            raise FormatError(f"dataset 'x' is {x.dtype} {x.shape}, expected uint8 N×{PCAM_SIZE}×{PCAM_SIZE}"
                              f"×{PCAM_CHANNELS}", x_path)
        if y.shape[0] != x.shape[0] or int(np.prod(y.shape[1:])) != 1:
            raise FormatError(f"dataset 'y' is {y.shape}, expected {x.shape[0]}×1×1×1 for the "
                              f"{x.shape[0]} patches of {x_path.name}", y_path)
        yield x, y


def iter_chunks(x, y, chunk: int = READ_CHUNK) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """(start, RGB patches n×96×96×3, int labels n) slice by slice."""
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        labels = np.asarray(y[start:stop]).reshape(-1)
        bad = ~np.isin(labels, PCAM_LABELS)
        if bad.any():
            index = start + int(np.argmax(bad))
            raise FormatError(f"dataset 'y': label {labels[index - start].item()!r} of patch {index}, expected 0 or 1 "
                              "(1 = tumour in the centre)", y.file.filename)
        yield start, np.asarray(x[start:stop]), labels.astype(np.int64)


def write_split(folder: PathLike, split: str, images: np.ndarray, labels: np.ndarray) -> Tuple[Path, Path]:
    """Write ``images`` (N×96×96×3 uint8 RGB) and ``labels`` (N) as the published split files."""
    import h5py

    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1, 1, 1, 1).astype(np.uint8)
    if images.dtype != np.uint8 or images.shape[1:] != (PCAM_SIZE, PCAM_SIZE, PCAM_CHANNELS):
        raise InputError(f"PCam patches must be uint8 N×{PCAM_SIZE}×{PCAM_SIZE}×3, got {images.dtype} {images.shape}")
    paths = split_paths(folder, split)
    for path, name, data in zip(paths, ("x", "y"), (images, labels)):
        with atomic_path(path) as temp, h5py.File(temp, "w") as handle:
            handle.create_dataset(name, data=data, compression="gzip",
                                  chunks=(min(WRITE_CHUNK, max(1, len(data))),) + data.shape[1:])
    return paths
