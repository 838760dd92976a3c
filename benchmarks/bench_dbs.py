#!/usr/bin/env python3
"""Throughput of steps 1 and 3 on a synthetic set: patches/s for extraction to files,
files → LevelDB (all folds, and one list alone like a single convert_imageset call),
images → LevelDB directly (all folds), and the mean (compute_image_mean over one train DB).

    python benchmarks/bench_dbs.py [--images 20] [--width 1388 --height 1040] [--workers N] [--keep DIR]

Ratios compare with Caffe's tools measured on this machine kind: convert_imageset turns
20,000 36×36 .tif patches into a LevelDB in about 0.96 s, compute_image_mean reads them in
about 0.3 s.  Not run in CI.
"""
from __future__ import annotations

import argparse
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lymph_cv.stages import dbs, folds, patches, synth
from lymph_cv.core.workers import resolve_workers

#: Caffe's reference figures on this machine kind (patches per second).
CAFFE_CONVERT = 20000 / 0.96
CAFFE_MEAN = 20000 / 0.3
FOLDS = 5


def _cpu() -> float:
    """CPU seconds of this process and its finished worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(function, *args, **kwargs):
    """(result, wall seconds); the CPU seconds are kept in _timed.cpu (shared machines make wall time noisy)."""
    started, cpu = time.perf_counter(), _cpu()
    result = function(*args, **kwargs)
    _timed.cpu = _cpu() - cpu
    return result, time.perf_counter() - started


def _copy_lists(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix == ".txt" or path.name == folds.FOLDS_JSON:
            shutil.copy(path, target / path.name)
    (target / "subs").mkdir()
    shutil.copy(source / "subs" / patches.MANIFEST_NAME, target / "subs" / patches.MANIFEST_NAME)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="synthetic images in all (spread over 3 classes)")
    parser.add_argument("--width", type=int, default=synth.REAL_WIDTH)
    parser.add_argument("--height", type=int, default=synth.REAL_HEIGHT)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--backend", default="leveldb", choices=["leveldb", "lmdb"])
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_dbs_"))
    work = base / "work"
    try:
        classes = len(synth.DEFAULT_CLASSES)
        per_class = [args.images // classes + (1 if i < args.images % classes else 0) for i in range(classes)]
        cpu = {}
        _, t_synth = _timed(synth.generate, base / "data", per_class=per_class, cases_per_class=2,
                            width=args.width, height=args.height, workers=args.workers)
        cpu["synth"] = _timed.cpu
        manifest, t_patch = _timed(patches.extract_patches, base / "data", work / "subs", workers=args.workers)
        cpu["patch"] = _timed.cpu
        n_patches = manifest.total_patches
        folds.make_folds(manifest, work, k=FOLDS, seed=0)
        direct = base / "direct"
        _copy_lists(work, direct)

        results, t_files = _timed(dbs.build_dbs, work, backend=args.backend, workers=args.workers)
        cpu["files"] = _timed.cpu
        n_records = sum(r.records for r in results)
        results, t_direct = _timed(dbs.build_dbs, direct, backend=args.backend, workers=args.workers, images=base / "data")
        cpu["direct"] = _timed.cpu
        assert sum(r.records for r in results) == n_records
        single, t_single = _timed(dbs.convert_list, work, work / "train_w32_1.txt", base / "single_db",
                                  backend=args.backend, seed=0)
        cpu["single"] = _timed.cpu
        (_, n_mean), t_mean = _timed(dbs.mean_of_db, work / "DB_train_1")
        cpu["mean"] = _timed.cpu
        # LevelDB replays its write-ahead log on the first open; a second pass shows the mean alone.
        _, t_mean_again = _timed(dbs.mean_of_db, work / "DB_train_1")
        cpu["mean_again"] = _timed.cpu

        rows = [
            ("synthetic images", args.images, t_synth, cpu["synth"], None),
            ("extraction to patch files", n_patches, t_patch, cpu["patch"], None),
            (f"files -> {args.backend}, one list, 1 process", single.records, t_single, cpu["single"], CAFFE_CONVERT),
            (f"files -> {args.backend}, {FOLDS} folds", n_records, t_files, cpu["files"], CAFFE_CONVERT),
            (f"images -> {args.backend} directly, {FOLDS} folds", n_records, t_direct, cpu["direct"], CAFFE_CONVERT),
            ("mean of one train DB (first open)", n_mean, t_mean, cpu["mean"], CAFFE_MEAN),
            ("mean of one train DB (opened before)", n_mean, t_mean_again, cpu["mean_again"], CAFFE_MEAN),
        ]
        workers = resolve_workers(args.workers, 1 << 30)
        print(f"{args.images} images of {args.width}x{args.height}, {n_patches} patches, "
              f"{n_records} DB records over {FOLDS} folds, {workers} worker(s)")
        print(f"{'stage':<44} {'items':>9} {'seconds':>8} {'items/s':>10} {'vs Caffe':>9} {'CPU s':>7}")
        for name, count, seconds, cpu_seconds, reference in rows:
            ratio = f"{count / seconds / reference:8.2f}x" if reference else ""
            print(f"{name:<44} {count:>9} {seconds:>8.2f} {count / seconds:>10.0f} {ratio:>9} {cpu_seconds:>7.2f}")
        print(f"direct / files (5 folds): {t_files / t_direct:.2f}x")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
