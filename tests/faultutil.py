"""Helpers of the fault-injection suite: a small real disk (tmpfs) to fill or make read-only, and the
digests of each stage's outputs (to prove a rerun ends byte-identical to an uninterrupted run)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator

from lymph_cv.core.fsutil import TEMP_MARKER

#: Size of the scratch file system of one case (inputs and outputs of a tiny stage fit easily).
DISK_SIZE = "48m"
FILLER = "filler.bin"
CHUNKS = (1 << 20, 1 << 12, 1)


class Disk:
    """A tmpfs mounted at ``root``: a real full disk (:meth:`fill`) and a real read-only file system
    (:meth:`readonly`), which stop root too (chmod does not)."""

    def __init__(self, root: Path, size: str = DISK_SIZE):
        self.root = Path(root)
        self.size = size
        self.mounted = False

    def mount(self) -> "Disk":
        self.root.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.root)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the fault suite needs `mount -t tmpfs` (run as root): {done.stderr.strip()}")
        self.mounted = True
        return self

    def _remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.root)], check=True, capture_output=True)

    def readonly(self) -> None:
        self._remount("ro")

    def writable(self) -> None:
        self._remount("rw")

    def fill(self) -> None:
        """Take every free byte (a file in chunks of 1 MiB, then 4 KiB, then single bytes)."""
        with open(self.root / FILLER, "ab", buffering=0) as handle:
            for chunk in CHUNKS:
                block = bytes(chunk)
                while True:
                    try:
                        handle.write(block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break

    def unfill(self) -> None:
        (self.root / FILLER).unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            done = subprocess.run(["umount", str(self.root)], capture_output=True)
            if done.returncode != 0:  # a process still inside (it was just killed): detach lazily
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True)
            self.mounted = False


@contextlib.contextmanager
def disk(root: Path) -> Iterator[Disk]:
    scratch = Disk(root).mount()
    try:
        yield scratch
    finally:
        scratch.unmount()


def copy_tree(source: Path, target: Path) -> Path:
    """``source``'s files into ``target`` (symlinks followed), without lock files."""
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lymph-cv.lock"))
    return target


def temporaries(root: Path) -> list:
    """Files or folders left under a temporary name anywhere under ``root``."""
    return sorted(str(p) for p in Path(root).rglob(f"*{TEMP_MARKER}*"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def db_digest(path: Path) -> str:
    from lymph_cv.formats.store import open_reader

    with open_reader(path) as reader:
        return _sha(b"".join(k + b"\0" + v for k, v in reader))


def file_digests(root: Path, pattern: str) -> Dict[str, str]:
    return {str(p.relative_to(root)): _sha(p.read_bytes()) for p in sorted(Path(root).glob(pattern))
            if p.is_file() and not p.name.startswith(".")}


def stage_outputs(stage: str, workdir: Path) -> Dict[str, str]:
    """Digests of ``stage``'s outputs present in ``workdir`` (location-independent content only)."""
    w = Path(workdir)
    if stage == "patches":
        return file_digests(w, "subs/*.tif")
    if stage == "folds":
        return file_digests(w, "*_w32_*.txt")
    if stage in ("dbs", "dbs-lmdb"):
        found = {p.name: db_digest(p) for p in sorted(w.glob("DB_*_[0-9]")) if p.is_dir()}
        found.update(file_digests(w, "DB_train_w32_*.binaryproto"))
        return found
    if stage == "mean":
        return file_digests(w, "mean.binaryproto")
    if stage == "render":
        return file_digests(w, "[0-9]/*.prototxt")
    if stage in ("train", "run"):
        found = file_digests(w, "[0-9]/*_iter_*.caffemodel")
        found.update(file_digests(w, "[0-9]/*_iter_*.solverstate"))
        if stage == "run":
            found.update(stage_outputs("evaluate", w))
        return found
    if stage == "evaluate":
        found = {}
        for metrics in sorted(w.glob("eval/fold_*/metrics.json")):
            found[str(metrics.relative_to(w))] = json.dumps(json.loads(metrics.read_text())["confusion"])
        found.update(file_digests(w, "eval/fold_*/images.csv"))
        return found
    if stage == "report":
        path = w / "eval" / "report.json"
        return {"report": json.dumps(json.loads(path.read_text())["confusion"])} if path.is_file() else {}
    if stage == "submit":
        return {str(p.relative_to(w)): _sha(p.read_text().replace(str(w.resolve()), "W").encode())
                for p in sorted(w.glob("[0-9]/*_train.sh"))}
    raise ValueError(stage)


def live_processes_mentioning(text: str) -> list:
    """Pids of processes whose command line contains ``text`` (orphaned workers of a killed command)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
