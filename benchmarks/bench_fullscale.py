#!/usr/bin/env python3
"""The direct images → databases path at full scale: `lymph-cv dbs --images` on the 374-image set.

Generates (once, kept in ``--data``) the synthetic set in the real layout (113 + 139 + 122 images of
1388×1040), its patch manifest (no patch files) and 5-fold lists, then times the whole
``lymph-cv dbs WORK --images DATA`` process: wall and CPU seconds, records, bytes on disk, and the
memory of its process tree sampled every 0.1 s from /proc (the largest single process RSS, the
largest sum over the tree, and the shared-memory patch array).  Issue 17's targets: 10 databases
in ≤ 60 s on 2 cores with peak RSS ≤ 2 GiB (the issue measured 79 s and 4.7 GB before).

    .venv/bin/python benchmarks/bench_fullscale.py [--images 374] [--data /tmp/fullscale] [--backend leveldb]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lymph_cv.stages import folds, patches, synth

#: The issue's figures before this work (same machine kind).
BEFORE_SECONDS, BEFORE_RSS_GB = 79.0, 4.7
TARGET_SECONDS, TARGET_RSS_GIB = 60.0, 2.0
SAMPLE_SECONDS = 0.1


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _shmem() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def prepare(data: Path, images: int, backend: str) -> Path:
    """The synthetic set, its manifest and lists under ``data`` (made once); a fresh work folder."""
    if not (data / "images").is_dir():
        counts = synth.REAL_IMAGES_PER_CLASS if images == sum(synth.REAL_IMAGES_PER_CLASS) else None
        per_class = list(counts) if counts else [images // 3 + (i < images % 3) for i in range(3)]
        synth.generate(data / "images", per_class=per_class)
        manifest = patches.extract_patches(data / "images", data / "lists" / "subs", write_patches=False)
        folds.make_folds(manifest, data / "lists", k=5, seed=0)
    work = data / f"work-{backend}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(data / "lists", work)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=374)
    parser.add_argument("--data", type=Path, default=Path("/tmp/lymph_cv_fullscale"))
    parser.add_argument("--backend", default="leveldb", choices=["leveldb", "lmdb"])
    args = parser.parse_args()
    work = prepare(args.data, args.images, args.backend)
    command = [sys.executable, "-m", "lymph_cv", "-q", "dbs", str(work), "--images", str(args.data / "images"),
               "--backend", args.backend]
    shm_before = _shmem()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    peak_one = peak_sum = peak_shm = 0
    while process.poll() is None:
        sizes = [_rss(pid) for pid in _tree(process.pid)]
        peak_one, peak_sum = max(peak_one, max(sizes, default=0)), max(peak_sum, sum(sizes))
        peak_shm = max(peak_shm, _shmem() - shm_before)
        time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - started
    if process.returncode:
        sys.exit(f"lymph-cv dbs failed with status {process.returncode}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    dbs = sorted(p for p in work.glob("DB_*_[0-9]*") if p.is_dir())
    disk = sum(f.stat().st_size for db in dbs for f in db.iterdir())
    lists = sum(len((work / f"{side}_w32_{k}.txt").read_text().splitlines()) for side in ("train", "test")
                for k in range(1, 6))
    print(f"{args.images} images, {len(dbs)} {args.backend} databases, {lists} records, {disk / 1e9:.1f} GB on disk; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"wall {wall:6.1f} s   CPU {usage.ru_utime + usage.ru_stime:6.1f} s   "
          f"(before: {BEFORE_SECONDS:.0f} s, target <= {TARGET_SECONDS:.0f} s: {wall / BEFORE_SECONDS:.2f}x of before, "
          f"{'met' if wall <= TARGET_SECONDS else 'MISSED'})")
    print(f"peak RSS: one process {peak_one / 2**30:.2f} GiB (target <= {TARGET_RSS_GIB:.0f} GiB: "
          f"{'met' if peak_one <= TARGET_RSS_GIB * 2**30 else 'MISSED'}; before {BEFORE_RSS_GB} GB), "
          f"process tree {peak_sum / 2**30:.2f} GiB (shared pages counted once per process); "
          f"shared-memory patch array {peak_shm / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
