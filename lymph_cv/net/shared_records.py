"""One decoded copy of a training database per machine, shared by all ranks on it.

A LevelDB admits one opener at a time (its ``LOCK``; Caffe HEAD cannot train several GPUs from
one), and decoding it once per rank would hold N copies in memory.  So the first rank of each
machine (``local_rank`` 0) decodes the database, writes the arrays to a scratch file in shared
memory, and every rank of that machine maps that one file read-only; the file is unlinked as soon as
all have mapped it (the mapping keeps the pages), so nothing is left behind, even after a crash.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from lymph_cv.net.datalayer import RecordCache, Records, load_records

#: the machine's shared-memory file system, where it has one.
SHM_DIR = Path("/dev/shm")


def _scratch_dir() -> Path:
    return SHM_DIR if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) else Path(tempfile.gettempdir())


class SharedRecordCache(RecordCache):
    """A :class:`RecordCache` whose databases are decoded once per machine.

    Every rank must ask for the same sources in the same order (the TRAIN data layers of the same
    net): each :meth:`get` is a collective step, ``barrier`` synchronising the ranks.
    """

    def __init__(self, local_rank: int, run_id: str, barrier: Callable[[str], None]):
        super().__init__()
        self.local_rank = local_rank
        self.run_id = run_id
        self.barrier = barrier
        self._shared: Dict[Tuple[Path, Optional[str]], Records] = {}

    def _paths(self, path: Path) -> Tuple[Path, Path]:
        digest = hashlib.sha256(f"{self.run_id}:{Path(path).resolve()}".encode()).hexdigest()[:20]
        base = _scratch_dir() / f".lymph_cv-records-{digest}"
        return base.with_suffix(".images.npy"), base.with_suffix(".labels.npy")

    def get(self, path: Path, backend: Optional[str]) -> Records:
        key = (Path(path), backend)
        if key in self._shared:
            return self._shared[key]
        images_path, labels_path = self._paths(path)
        what = f"loading {path}"
        if self.local_rank == 0:
            decoded = load_records(path, backend)
            for target, array in ((images_path, decoded.images), (labels_path, decoded.labels)):
                partial = target.with_name(target.name + f".tmp-{os.getpid()}")
                with open(partial, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
                os.replace(partial, target)
            del decoded
        try:
            self.barrier(what)
            records = Records(np.load(images_path, mmap_mode="r", allow_pickle=False),
                              np.load(labels_path, mmap_mode="r", allow_pickle=False), Path(path))
            self.barrier(what)
        finally:
            if self.local_rank == 0:
                for target in (images_path, labels_path):
                    target.unlink(missing_ok=True)
        self._shared[key] = records
        return records
