#!/usr/bin/env python3
"""The streaming data layer against the in-memory one: ms per training iteration (not run in CI).

Builds a one-fold work directory with a random 36×36 train DB of ``--records`` records, then trains
the tutorial's 32w net twice, interleaved ``--rounds`` times: with the database in memory, and with
``--max-memory`` set to a third of its decoded size so that it is streamed (a reader thread decoding
ahead).  Prints the median ms per iteration (data + forward + backward + update) and their ratio
(issue 17's target: streamed within 1.3× of in memory).

    .venv/bin/python benchmarks/bench_stream.py [--records 30000] [--iterations 40] [--rounds 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import PATCH, bench, make_workdir  # noqa: E402  (configures OpenMP before torch)

import numpy as np  # noqa: E402

#: The issue's bound on streamed / in-memory ms per iteration.
TARGET_RATIO = 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=30000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved pairs of runs (medians reported)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        solver = make_workdir(Path(tmp), args.records, args.batch)
        decoded = args.records * int(np.prod(PATCH))
        limit = decoded // 3
        totals = {"memory": [], "streamed": []}
        for _ in range(args.rounds):
            for name, max_memory in (("memory", None), ("streamed", limit)):
                ms = bench(solver, args.device, args.iterations, max_memory=max_memory)
                totals[name].append(sum(ms.values()))
        memory, streamed = (statistics.median(totals[k]) for k in ("memory", "streamed"))
        print(f"train DB {args.records} records ({decoded / 2**20:.0f} MiB decoded), --max-memory {limit / 2**20:.0f} MiB "
              f"(1/3), batch {args.batch}, {args.iterations} iterations x {args.rounds} rounds, device {args.device}")
        print(f"in memory : {memory:7.2f} ms/iter   runs {['%.1f' % t for t in totals['memory']]}")
        print(f"streamed  : {streamed:7.2f} ms/iter   runs {['%.1f' % t for t in totals['streamed']]}")
        print(f"streamed / in memory = {streamed / memory:.2f}x (target <= {TARGET_RATIO}x: "
              f"{'met' if streamed / memory <= TARGET_RATIO else 'MISSED'})")


if __name__ == "__main__":
    main()
