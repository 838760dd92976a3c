"""pycaffe's solver vs ``lymph-cv train``'s loop on the tutorial's 32w net: ms per iteration (not run in CI).

Both are the same Trainer (schedule, update, seeding); pycaffe runs the nets layer by layer on numpy
blobs (so a script sees and can change every blob) where ``lymph-cv train`` runs one torch graph.
The ratio is the price of that visibility.

    .venv/bin/python benchmarks/bench_pycaffe.py [--iterations 10] [--batch 128] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from lymph_cv.core.threads import configure_openmp

configure_openmp()  # as lymph-cv train does, before torch loads

import torch  # noqa: E402

import lymph_cv.pycaffe as caffe  # noqa: E402
from bench_train import make_workdir  # noqa: E402
from lymph_cv.formats import caffelog  # noqa: E402
from lymph_cv.stages.train import Trainer  # noqa: E402

#: Iterations run before timing (iteration 0 also runs the initial test pass).
WARM_UP = 2
#: Interleaved rounds; medians reported (a shared machine is noisy).
ROUNDS = 3


def _per_iteration(step, iterations: int) -> float:
    start = time.perf_counter()
    step(iterations)
    return (time.perf_counter() - start) / iterations * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        solver_path = make_workdir(Path(tmp), args.records, args.batch)
        old = os.getcwd()
        os.chdir(solver_path.parent)  # a benchmark script, not library code: the tutorial's cwd
        try:
            trainer = Trainer(solver_path.name, device="cpu", seed=0)
            solver = caffe.get_solver(solver_path.name)

            def train_step(n):
                with caffelog.caffe_log(None) as clog:
                    trainer.log = clog
                    trainer.step(trainer.solver.iter + n, None)

            train_step(WARM_UP)
            solver.step(WARM_UP)
            samples = {"lymph-cv train": [], "pycaffe": []}
            for _ in range(ROUNDS):
                samples["lymph-cv train"].append(_per_iteration(train_step, args.iterations))
                samples["pycaffe"].append(_per_iteration(solver.step, args.iterations))
        finally:
            os.chdir(old)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"32w train net, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for name, ms in medians.items():
        print(f"cpu  {name:14s} {ms:8.1f} ms/iter")
    print(f"cpu  pycaffe / lymph-cv train: {medians['pycaffe'] / medians['lymph-cv train']:.2f}x")


if __name__ == "__main__":
    main()
