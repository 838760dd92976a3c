"""The numpy float32 forward (lymph_cv.net.plain.PlainNet) against the torch CaffeNet's float32 one.

On the tutorial's deploy net (rendered by lymph_cv.stages.render) with the published fold-1 model
(``$LYMPH_CV_REFERENCE``, else the net's filler weights), prints crops/s of each over ``--crops``
random 3×32×32 crops in batches of ``--batch`` (the CPU evaluation's 320), the median of
``--repeats`` runs after a warm-up, and their ratio; also the largest probability difference.
Usage: ``python benchmarks/bench_plain.py [--crops 1000] [--batch 320] [--repeats 5] [--threads 2]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from lymph_cv.core.threads import configure_openmp

configure_openmp()  # as lymph-cv does before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lymph_cv.formats.caffe import caffe_pb2  # noqa: E402
from lymph_cv.formats.caffe.model import read_caffemodel  # noqa: E402
from lymph_cv.formats.caffe.prototxt import read_net_prototxt  # noqa: E402
from lymph_cv.net.build import build_net  # noqa: E402
from lymph_cv.net.plain import PlainNet  # noqa: E402
from lymph_cv.stages.render import render_fold  # noqa: E402

#: The published fold-1 model's file name in the reference folder.
FOLD1_MODEL = "1_caffenet_train_w32_iter_600000.caffemodel"
#: Classes the tutorial's deploy net is rendered for.
CLASSES = 3


def _deploy(folder: Path) -> Path:
    lines = "".join(f"x_{label}.tif\t{label}\n" for label in range(CLASSES))
    for name in ("train_w32_1.txt", "test_w32_1.txt"):
        (folder / name).write_text(lines)
    return render_fold(folder, 1, overrides={}).deploy


def _median_rate(run, crops: np.ndarray, batch: int, repeats: int) -> float:
    run(crops[:batch])  # warm-up (weights packed, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for offset in range(0, len(crops), batch):
            run(crops[offset:offset + batch])
        times.append(time.perf_counter() - start)
    return len(crops) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        deploy = _deploy(Path(tmp))
        net_param = read_net_prototxt(deploy)
        net = build_net(net_param, caffe_pb2.TEST)
        reference = Path(os.environ.get("LYMPH_CV_REFERENCE", "")) / FOLD1_MODEL
        if reference.is_file():
            weights = read_caffemodel(reference)
            net.load_weights(weights)
        else:
            net.init_params(torch.Generator().manual_seed(0))
            weights = net.export_weights()
        net.eval()
        plain = PlainNet.build(net_param, weights, deploy, reference)
    crops = np.random.default_rng(0).uniform(-120, 120, (args.crops, 3, 32, 32)).astype(np.float32)

    def torch_run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            return net.forward({"data": x})["prob"].numpy()

    def plain_run(batch: np.ndarray) -> np.ndarray:
        return plain.forward({"data": batch})["prob"]

    difference = max(float(np.abs(torch_run(crops[i:i + args.batch]) - plain_run(crops[i:i + args.batch])).max())
                     for i in range(0, len(crops), args.batch))
    theirs = _median_rate(torch_run, crops, args.batch, args.repeats)
    ours = _median_rate(plain_run, crops, args.batch, args.repeats)
    print(f"model: {reference if reference.is_file() else 'filler weights'}; {args.crops} crops, batch {args.batch}, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"torch float32 CaffeNet: {theirs:9.0f} crops/s")
    print(f"numpy PlainNet:         {ours:9.0f} crops/s  ({ours / theirs:.2f}x torch)")
    print(f"largest probability difference: {difference:.2e}")


if __name__ == "__main__":
    main()
