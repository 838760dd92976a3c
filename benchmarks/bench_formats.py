"""Throughput of the Caffe format codecs and the LevelDB/LMDB stores (not run in CI).

Prints datums/s for the hand-assembled Datum serializer vs the protobuf message API,
datum parsing, and records/s for writing and reading each store backend, with ratios.
Usage: python benchmarks/bench_formats.py [--records N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lymph_cv.formats.caffe.datum import array_to_datum, parse_datum, serialize_datum
from lymph_cv.formats.store import BACKENDS, make_key, open_reader, open_writer

PATCH_SHAPE = (3, 36, 36)  # the tutorial's patches
LABELS = 3


def _each(func, items) -> None:
    # Results are dropped: keeping 10^5 patches alive would time the allocator, not the codec.
    for item in items:
        func(*item)


def _rate(count: int, func) -> float:
    start = time.perf_counter()
    func()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    n = args.records
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (256, *PATCH_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, LABELS, n)

    pairs = [(patches[i % len(patches)], int(labels[i])) for i in range(n)]
    fast = _rate(n, lambda: _each(serialize_datum, pairs))
    slow = _rate(n, lambda: _each(lambda p, l: array_to_datum(p, l).SerializeToString(), pairs))
    print(f"serialize_datum      {fast:12,.0f} datums/s")
    print(f"message API          {slow:12,.0f} datums/s   (fast path x{fast / slow:.2f})")
    values = [serialize_datum(*pair) for pair in pairs]
    print(f"parse_datum          {_rate(n, lambda: _each(parse_datum, ((v,) for v in values))):12,.0f} datums/s")

    with tempfile.TemporaryDirectory() as tmp:
        for backend in BACKENDS:
            path = Path(tmp) / backend

            def write():
                with open_writer(path, backend) as writer:
                    for i, value in enumerate(values):
                        writer.put(make_key(i, f"CLL/patch_{i}.png"), value)

            def read():
                with open_reader(path) as reader:
                    for _ in reader:
                        pass

            write_rate = _rate(n, write)
            # The first open of a fresh LevelDB replays its log into tables; later opens do not.
            first_read, second_read = _rate(n, read), _rate(n, read)
            size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
            print(
                f"{backend:8s} write {write_rate:10,.0f} rec/s   first read {first_read:10,.0f} rec/s"
                f"   next read {second_read:10,.0f} rec/s   {size:7.1f} MiB"
            )


if __name__ == "__main__":
    main()
