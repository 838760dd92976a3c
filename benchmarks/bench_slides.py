#!/usr/bin/env python3
"""Whole-slide tiling speed (issue 14; not run in CI): tissue detection time, tiles/s to files and to
a database, peak memory, and a plain loop over OpenSlide's ``DeepZoomGenerator.get_tile`` writing
the same tiles, as the ratio.

Makes (once, kept in ``--cache``) one synthetic pyramidal slide of ``--side``² pixels with
``lymph-cv synth --layout slides``, then runs each phase in its own process so each peak resident
memory (the process and its workers) is its own:

    .venv/bin/python benchmarks/bench_slides.py [--side 20480] [--size 256] [--workers 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The issue's bound on the tiler's memory, whatever the slide size.
MEMORY_BOUND_MIB = 1024
CLASS = "FL"


def own_peak_mib() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mib() -> dict:
    """Peak resident memory (MiB) of this process, of its largest worker, and their bound sum."""
    own = own_peak_mib()
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"parent_mib": own, "worker_mib": worker}


def make_slide(cache: Path, side: int) -> Path:
    from lymph_cv.stages.synth_slides import generate_slides

    started = time.perf_counter()
    paths = generate_slides(cache, per_class=1, cases_per_class=1, width=side, height=side, classes=[CLASS],
                            workers=1)
    print(f"slide: {paths[0]} ({side}x{side}, ready in {time.perf_counter() - started:.0f} s)", flush=True)
    return paths[0]


def phase(name: str, data: Path, size: int, workers: int) -> dict:
    """One measurement, run in a fresh process (``--phase``)."""
    from lymph_cv.stages import tiles, tiling, tissue

    slide = next((data / CLASS).glob("*.tiff"))
    started = time.perf_counter()
    if name == "tissue":
        mask = tissue.detect_tissue(slide)
        return {"seconds": time.perf_counter() - started, "tissue": mask.fraction, **peak_mib()}
    params = tiles.TileParams(size=size, level=0)
    with tempfile.TemporaryDirectory(dir=data) as out:
        if name == "deepzoom":
            return deepzoom_loop(slide, Path(out), params, started)
        result = tiling.tile_slides(data, out, params, classes=[CLASS], workers=1 if name == "files1" else workers,
                                    qc=False, db_backend="lmdb" if name == "db" else None)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "tiles": len(result.tiles), "tiles_per_s": len(result.tiles) / seconds,
                **peak_mib()}


def deepzoom_loop(slide: Path, out: Path, params, started: float) -> dict:
    """The same tissue tiles through ``DeepZoomGenerator.get_tile`` one by one, written as TIFFs."""
    import cv2
    import numpy as np
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    from lymph_cv.stages import tiles
    from lymph_cv.stages.synth import TIFF_UNCOMPRESSED

    planned = tiles.plan_tiles(slide, params.size, level=0)  # the tissue detection counted in, as in ours
    with OpenSlide(str(slide)) as handle:
        zoom = DeepZoomGenerator(handle, tile_size=params.size, overlap=0, limit_bounds=False)
        level = zoom.level_count - 1  # full resolution
        for tile in planned:
            rgb = np.asarray(zoom.get_tile(level, (tile.x // params.size, tile.y // params.size)).convert("RGB"))
            ok, encoded = cv2.imencode(".tif", np.ascontiguousarray(rgb[..., ::-1]), TIFF_UNCOMPRESSED)
            (out / tile.name).write_bytes(encoded.tobytes())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tiles": len(planned), "tiles_per_s": len(planned) / seconds, **peak_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=20480, help="slide side in pixels (at least 20000 for the issue)")
    parser.add_argument("--size", type=int, default=256, help="tile side (level 0)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the phases (the best kept)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lymph_cv_bench_slides")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.cache / str(args.side)
    if args.phase == "make":
        make_slide(data, args.side)
        return
    if args.phase:
        print(json.dumps(phase(args.phase, data, args.size, args.workers)))
        return
    results: dict = {}
    # "make" once, then the measured phases interleaved for --rounds rounds (the best of each kept: on a
    # shared machine the least disturbed run is the closest to the code's own speed)
    order = ["make"] + ["tissue", "files1", "deepzoom", "files", "db"] * args.rounds
    for name in order:
        # each phase in its own process, started from this small one, so each peak is its own
        run = subprocess.run([sys.executable, __file__, "--phase", name, "--side", str(args.side), "--size",
                              str(args.size), "--workers", str(args.workers), "--cache", str(args.cache)],
                             check=True, capture_output=True, text=True, env=os.environ)
        last = run.stdout.strip().splitlines()[-1]
        if name == "make":
            print(last, flush=True)
            continue
        measured = json.loads(last)
        print(f"{name}: {json.dumps(measured)}", flush=True)
        if name not in results or measured["seconds"] < results[name]["seconds"]:
            results[name] = measured
    tissue = results["tissue"]
    print(f"best of {args.rounds} interleaved rounds")
    print(f"tissue detection: {tissue['seconds']:.2f} s ({100 * tissue['tissue']:.1f}% tissue), "
          f"peak {tissue['parent_mib']:.0f} MiB")
    for name in ("files", "files1", "db", "deepzoom"):
        r = results[name]
        workers = 1 if name in ("files1", "deepzoom") else args.workers
        total = r["parent_mib"] + (workers * r["worker_mib"] if workers > 1 else 0)
        print(f"{name:8s}: {r['tiles']} tiles in {r['seconds']:.1f} s = {r['tiles_per_s']:.1f} tiles/s; peak "
              f"{r['parent_mib']:.0f} MiB + {workers if workers > 1 else 0} x {r['worker_mib']:.0f} MiB workers "
              f"= {total:.0f} MiB (bound {MEMORY_BOUND_MIB})")
    for name in ("files", "files1"):
        print(f"ratio {name} / DeepZoom loop: {results[name]['tiles_per_s'] / results['deepzoom']['tiles_per_s']:.2f}x")


if __name__ == "__main__":
    main()
