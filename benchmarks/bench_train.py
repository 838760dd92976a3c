"""Training throughput of the tutorial's 32w net: ms per iteration at batch 128 (not run in CI).

Renders fold 1 with the real templates over a random 36×36 database, builds the training run as
``lymph-cv train`` does, and times each part of an iteration: batch assembly from the in-memory
database (crop, mirror, mean), forward, backward, the AdaGrad update, and the total, on the CPU
(and CUDA when present, or ``--device``).  The ratios are against issue 17's side-by-side Caffe figures on
this machine kind (2 cores, OpenBLAS): ``caffe time`` 151 ms forward+backward, ``caffe train`` 141 ms per
iteration (no Caffe build is available here to rerun them).

    .venv/bin/python benchmarks/bench_train.py [--iterations 20] [--batch 128] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

from lymph_cv.core.threads import configure_openmp

configure_openmp()  # as lymph-cv train does, before torch loads (override with OMP_WAIT_POLICY=...)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lymph_cv.formats.caffe.blob import write_mean  # noqa: E402
from lymph_cv.formats.caffe.datum import serialize_datum  # noqa: E402
from lymph_cv.stages.render import render_fold  # noqa: E402
from lymph_cv.formats.store import make_key, open_writer  # noqa: E402
from lymph_cv.stages.train import Trainer, feed  # noqa: E402

#: Issue 17's side-by-side figures for BVLC Caffe (CPU, OpenBLAS, 2 cores, this machine kind):
#: ``caffe time`` forward+backward of the 32w train net at batch 128, and ``caffe train`` ms per iteration.
CAFFE_FORWARD_BACKWARD_MS = 151.0
CAFFE_TRAIN_ITER_MS = 141.0
CLASSES = 3
PATCH = (3, 36, 36)


def make_workdir(root: Path, records: int, batch: int) -> Path:
    """Lists, databases and mean of a one-fold work directory with random patches."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (records,) + PATCH, dtype=np.uint8)
    labels = rng.integers(0, CLASSES, records)
    for kind in ("train", "test"):
        (root / f"{kind}_w32_1.txt").write_text("".join(f"p{i}.png\t{labels[i]}\n" for i in range(records)))
        with open_writer(root / f"DB_{kind}_1", "leveldb") as writer:
            for i in range(records):
                writer.put(make_key(i, f"p{i}.png"), serialize_datum(images[i], int(labels[i])))
    write_mean(root / "DB_train_w32_1.binaryproto", images.mean(axis=0, dtype=np.float64).astype(np.float32))
    render_fold(root, 1, overrides={"batch_size": batch})
    return root / "1" / "1-alexnet_solver_ada.prototxt"


def _verdict(ours_ms: float, caffe_ms: float) -> str:
    """Against the target (no slower than Caffe's figure; a CUDA figure has no Caffe one beside it)."""
    return "met" if ours_ms <= caffe_ms else "MISSED"


def bench(solver: Path, device: str, iterations: int, max_memory: Optional[int] = None) -> dict:
    """Median ms of each part of an iteration; ``max_memory`` as ``lymph-cv train --max-memory``."""
    trainer = Trainer(solver, device=device, seed=0, max_memory=max_memory)
    target = trainer.device
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    parts = {"data": [], "forward": [], "backward": [], "update": []}
    for i in range(iterations + 2):  # two warm-up iterations
        t0 = time.perf_counter()
        inputs = feed(trainer.train_data, i, target)
        sync()
        t1 = time.perf_counter()
        loss = trainer.net.loss(trainer.net(inputs))
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        trainer.solver.apply_update()
        trainer.solver.zero_grad()
        sync()
        t4 = time.perf_counter()
        if i >= 2:
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[key].append(value * 1000.0)
    trainer.record_cache.close()
    return {key: statistics.median(values) for key, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--records", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                        help="all: the CPU, and CUDA when present")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "all" else [args.device]
    with tempfile.TemporaryDirectory() as tmp:
        solver = make_workdir(Path(tmp), args.records, args.batch)
        print(f"32w train net, batch {args.batch}, {args.iterations} iterations (median ms), "
              f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
        for device in devices:
            ms = bench(solver, device, args.iterations)
            total = sum(ms.values())
            fwd_bwd = ms["forward"] + ms["backward"]
            print(f"{device:4s} data {ms['data']:7.2f}  forward {ms['forward']:7.2f}  backward {ms['backward']:7.2f}  "
                  f"update {ms['update']:6.2f}  total {total:7.2f} ms/iter  ({1000.0 / total:6.1f} iter/s)")
            print(f"{device:4s} forward+backward {fwd_bwd:.1f} ms vs caffe time {CAFFE_FORWARD_BACKWARD_MS:.0f} ms: "
                  f"ours/Caffe {fwd_bwd / CAFFE_FORWARD_BACKWARD_MS:.2f}x ({CAFFE_FORWARD_BACKWARD_MS / fwd_bwd:.2f}x "
                  f"faster), {_verdict(fwd_bwd, CAFFE_FORWARD_BACKWARD_MS)}; iteration {total:.1f} ms vs caffe train "
                  f"{CAFFE_TRAIN_ITER_MS:.0f} ms: ours/Caffe {total / CAFFE_TRAIN_ITER_MS:.2f}x "
                  f"({CAFFE_TRAIN_ITER_MS / total:.2f}x faster), {_verdict(total, CAFFE_TRAIN_ITER_MS)} "
                  "(Caffe: issue 17's CPU figures on this machine kind; target: no slower than Caffe)")


if __name__ == "__main__":
    main()
