"""A full-scale train LevelDB for ``bench_tools.py --big``: 820,096 raw 3×36×36 Datums (3.2 GB).

Written with Caffe's LevelDB options in key order, keys like Caffe's ``%08d_path``; the pixels
are random (a pool of records reused with a per-record shift, so they do not compress).

    .venv/bin/python benchmarks/make_mean_db.py /tmp/big/DB_train_1 [--records 820096] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lymph_cv.formats import store
from lymph_cv.formats.caffe.datum import serialize_datums

#: Records of fold 1's full-scale train DB (issue 17).
FULL_SCALE_RECORDS = 820_096
SHAPE = (3, 36, 36)
POOL = 4096
BATCH = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("--records", type=int, default=FULL_SCALE_RECORDS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    size = int(np.prod(SHAPE))
    pool = rng.integers(0, 256, (POOL, size), dtype=np.uint8)
    with store.open_writer(args.db, "leveldb") as writer:
        for start in range(0, args.records, BATCH):
            count = min(BATCH, args.records - start)
            rows = np.roll(pool[:count], start // BATCH, axis=1)
            labels = rng.integers(0, 3, count)
            keys = [store.make_key(start + i, f"case{(start + i) % 97}/patch_{start + i}.png") for i in range(count)]
            writer.put_many(keys, serialize_datums(rows, SHAPE, labels))
    print(f"{args.db}: {args.records} records of {'x'.join(map(str, SHAPE))}, seed {args.seed}")


if __name__ == "__main__":
    main()
