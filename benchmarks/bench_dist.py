"""Multi-process training scaling: ms per effective iteration, 1 process vs N (gloo on the CPU).

The tutorial's 32w net on a synthetic 36×36 LevelDB; one process reads batch B, N processes read
B/N each (the same effective batch).  The time per iteration is read from the root rank's
``train.log`` (glog timestamps of the display lines), so start-up (imports, DB decoding,
rendezvous) is not counted.

    python benchmarks/bench_dist.py [--batch 128] [--procs 2] [--iters 40]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from lymph_cv.formats.caffe.blob import write_mean
from lymph_cv.formats.caffe.datum import serialize_datum
from lymph_cv.formats.store import make_key, open_writer
from lymph_cv.stages.render import render_fold

RECORDS = 4096
SIZE = 36
CLASSES = 3


def make_workdir(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(RECORDS, 3, SIZE, SIZE), dtype=np.uint8)
    labels = np.arange(RECORDS) % CLASSES
    for name in ("DB_train_1", "DB_test_1"):
        with open_writer(root / name, "leveldb") as writer:
            for i in range(RECORDS):
                writer.put(make_key(i, f"p{i}.png"), serialize_datum(images[i], int(labels[i])))
    write_mean(root / "DB_train_w32_1.binaryproto", images.astype(np.float32).mean(axis=0))
    lists = "".join(f"p{i}.png {labels[i]}\n" for i in range(RECORDS))
    (root / "train_w32_1.txt").write_text(lists)
    (root / "test_w32_1.txt").write_text(lists)


DISPLAY = 5
LINE = re.compile(r"^I\d{4} (\d\d:\d\d:\d\d\.\d+) .*\] Iteration (\d+), loss")


def ms_per_iteration(solver: Path, iters: int, procs: int, threads: int) -> float:
    argv = [sys.executable, "-m", "lymph_cv", "-q", "train", "--solver", str(solver), "--device", "cpu",
            "--max-iter", str(iters)]
    if procs > 1:
        argv += ["--procs", str(procs)]
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    marks = [(datetime.strptime(m.group(1), "%H:%M:%S.%f"), int(m.group(2)))
             for m in map(LINE.match, (solver.parent / "train.log").read_text().splitlines()) if m]
    (t0, i0), (t1, i1) = marks[1], marks[-1]  # from the second display on: warm caches
    return (t1 - t0).total_seconds() * 1000 / (i1 - i0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="effective batch (split over the processes)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=40, help="iterations timed")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_workdir(root)
        results = {}
        for procs in (1, args.procs):
            fold = render_fold(root, 1, overrides={"test_iter": "1", "test_interval": "100000",
                                                   "display": str(DISPLAY), "snapshot": "0",
                                                   "batch_size": str(args.batch // procs)})
            solver = fold.solver
            threads = max(1, cores // procs)
            results[procs] = ms_per_iteration(solver, 2 * DISPLAY + args.iters, procs, threads)
            print(f"{procs} process(es), batch {args.batch // procs} each, {threads} thread(s) each: "
                  f"{results[procs]:.1f} ms per effective iteration of {args.batch}")
        print(f"speed-up of {args.procs} processes: {results[1] / results[args.procs]:.2f}x "
              f"on {cores} cores (CPU-bound: the processes share the same cores)")


if __name__ == "__main__":
    main()
