#!/usr/bin/env python3
"""What modern training costs per iteration: ms of the TRAIN batch (data layer + augmentation) and of a
whole iteration of the tutorial's 32w net, Caffe's AdaGrad vs one-cycle AdamW with mixup, label
smoothing, vertical flips and quarter turns (not run in CI).

Builds a one-fold work directory with random 36×36 patches (``--records``), trains ``--iterations``
iterations per setting, interleaved ``--rounds`` times, and prints the medians and their ratios.

    .venv/bin/python benchmarks/bench_augment.py [--records 2000] [--batch 128] [--iterations 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import make_workdir  # noqa: E402  (configures OpenMP before torch)

import torch  # noqa: E402

from lymph_cv.stages.train import Trainer  # noqa: E402

#: Everything on: the settings a PCam-style run uses.
MODERN = {"mixup_alpha": 0.4, "label_smoothing": 0.1, "vertical_flip": True, "rotate90": True}


def modern_solver(solver: Path) -> Path:
    """A copy of the rendered solver with lr_policy onecycle and type AdamW."""
    text = solver.read_text().replace('lr_policy: "fixed"', 'lr_policy: "onecycle"')
    text = text.replace('type: "AdaGrad"', 'type: "AdamW"\nmomentum: 0.9')
    path = solver.with_name("modern_solver.prototxt")
    path.write_text(text)
    return path


def bench(solver: Path, iterations: int, augmentation: dict) -> dict:
    """Median ms of the TRAIN batch and of a whole iteration (batch, forward, backward, update)."""
    trainer = Trainer(solver, device="cpu", seed=0, augmentation=augmentation)
    batch_ms, step_ms = [], []
    for i in range(iterations + 2):  # two warm-up iterations
        t0 = time.perf_counter()
        inputs = trainer.train_inputs(i)
        t1 = time.perf_counter()
        trainer.net.loss(trainer.net(inputs)).backward()
        trainer.solver.apply_update()
        trainer.solver.zero_grad()
        t2 = time.perf_counter()
        if i >= 2:
            batch_ms.append((t1 - t0) * 1000.0)
            step_ms.append((t2 - t0) * 1000.0)
    return {"batch": statistics.median(batch_ms), "iteration": statistics.median(step_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved pairs of runs (medians reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        solver = make_workdir(Path(tmp), args.records, args.batch)
        modern = modern_solver(solver)
        results = {"caffe": [], "modern": []}
        for _ in range(args.rounds):
            results["caffe"].append(bench(solver, args.iterations, {}))
            results["modern"].append(bench(modern, args.iterations, MODERN))
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in ("batch", "iteration")}
               for name, runs in results.items()}
    for name, values in medians.items():
        print(f"{name:7s} batch {values['batch']:8.2f} ms   iteration {values['iteration']:8.2f} ms")
    print(f"ratio   batch {medians['modern']['batch'] / medians['caffe']['batch']:8.2f}x   "
          f"iteration {medians['modern']['iteration'] / medians['caffe']['iteration']:8.2f}x "
          f"(batch {args.batch}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
