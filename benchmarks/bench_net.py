"""Throughput of the PyTorch port on the tutorial's 32w net.

Prints ms per batch for forward and forward+backward of the rendered train net (NCHW vs
channels-last blobs, the CaffeNet default), and patches/s of pycaffe's Classifier.predict with
10-crop oversampling on the deploy net, on the CPU (and CUDA when present).

    .venv/bin/python benchmarks/bench_net.py [--batch 128] [--repeat 10] [--threads N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lymph_cv.pycaffe as caffe
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.prototxt import read_net_prototxt
from lymph_cv.net.build import build_net
from lymph_cv.stages.render import render_fold

CLASSES = 3
PATCH = 36
#: Rounds of interleaved NCHW / channels-last timings (medians reported).
ROUNDS = 5


def _lists(workdir: Path, batch: int) -> None:
    for kind in ("train", "test"):
        lines = "".join(f"p{i}.png\t{i % CLASSES}\n" for i in range(batch))
        (workdir / f"{kind}_w32_1.txt").write_text(lines)


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000.0


def bench_train_net(net_file: Path, batch: int, repeat: int, device: torch.device) -> None:
    net = build_net(read_net_prototxt(net_file), caffe_pb2.TRAIN,
                    input_shapes={"data": (batch, 3, 32, 32), "label": (batch,)}).to(device)
    net.init_params(torch.Generator().manual_seed(0))
    inputs = {"data": torch.randn(batch, 3, 32, 32, device=device) * 50,
              "label": torch.randint(0, CLASSES, (batch,), device=device).float()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            net(inputs)
        sync()

    def forward_backward():
        net.loss(net(inputs)).backward()
        sync()

    # Interleave the layouts over several rounds and keep medians: a shared machine is noisy.
    samples = {False: [], True: []}
    for _ in range(ROUNDS):
        for channels_last in (False, True):
            net.channels_last = channels_last
            samples[channels_last].append((_time(forward, repeat), _time(forward_backward, repeat)))
    results = {layout: tuple(float(np.median(column)) for column in zip(*rows)) for layout, rows in samples.items()}
    for channels_last, (fwd, fwdbwd) in results.items():
        layout = "channels-last" if channels_last else "NCHW         "
        print(f"{device.type:4s} {layout} batch {batch}: forward {fwd:7.1f} ms, forward+backward {fwdbwd:7.1f} ms")
    print(f"{device.type:4s} channels-last speed-up (forward+backward): {results[False][1] / results[True][1]:.2f}x")
    net.channels_last = True


def bench_classifier(deploy: Path, repeat: int) -> None:
    weights = deploy.parent / "w.caffemodel"
    caffe.Net(str(deploy), caffe.TEST).save(str(weights))
    clf = caffe.Classifier(str(deploy), str(weights), mean=np.full((3, PATCH, PATCH), 120, np.float32),
                           channel_swap=(2, 1, 0), raw_scale=255, image_dims=(PATCH, PATCH))
    rng = np.random.default_rng(0)
    for per_call in (1, 32):
        patches = [rng.random((PATCH, PATCH, 3)).astype(np.float32) for _ in range(per_call)]
        ms = _time(lambda: clf.predict(patches), repeat)
        print(f"cpu  Classifier.predict, {per_call:2d} patch(es) per call, 10 crops: "
              f"{per_call / ms * 1000:8.1f} patches/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        _lists(workdir, args.batch)
        files = render_fold(workdir, 1, overrides={"batch_size": str(args.batch)})
        bench_train_net(files.net, args.batch, args.repeat, torch.device("cpu"))
        if torch.cuda.is_available():
            bench_train_net(files.net, args.batch, args.repeat * 10, torch.device("cuda"))
        bench_classifier(files.deploy, args.repeat)


if __name__ == "__main__":
    main()
