#!/usr/bin/env python3
"""The drop-in data tools and command start-up against Caffe's own, whole processes (not run in CI).

Paired, interleaved runs (``--rounds``, medians reported) of

* ``convert_imageset -shuffle -backend leveldb|lmdb ROOT/ LIST DB`` on fold 1's train list
  (38,528 patch files for the default 20-image set);
* ``compute_image_mean -backend leveldb`` on the database just built (opened once before, so
  LevelDB's log replay is not timed), and on ``--big DB`` (a full-scale train DB) when given;
* every ``lymph-cv`` command's ``--help``, the tools' ``-help``, and the time to the first useful
  line (``inspect`` of the database; compute_image_mean's first log line).

No Caffe build is available here: the Caffe column holds the figures issue 17 measured side by side
with BVLC Caffe (CPU, OpenBLAS) on this machine kind, and the ratios are against those constants.

    .venv/bin/python benchmarks/bench_tools.py [--work DIR] [--rounds 5] [--big DB_train_1] [--startup-only] [--timeline]
        [--against DIR]   # DIR: another checkout, e.g. `git archive REV | tar -x -C DIR`; paired start-ups
    .venv/bin/python benchmarks/bench_tools.py --mean-only [--db FOLD1_DB] [--big DB_train_1]  # the mean rows

A full-scale train DB for ``--big``: ``benchmarks/make_mean_db.py DIR/DB_train_1`` (820,096 records, 3.2 GB);
``--db`` takes fold 1's train LevelDB as convert_imageset builds it (``make_mean_db.py --records 38528``
gives one of the same size).

Every figure is printed with the CPU seconds (user + system) of its processes: on a machine shared
with other work the wall time inflates several-fold, the CPU time much less.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lymph_cv.core.native import NATIVE_ENV

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
#: Issue 17's side-by-side figures for Caffe (seconds, whole process, same inputs, this machine kind).
CAFFE = {
    "convert_imageset leveldb": 1.25,
    "convert_imageset lmdb": 1.28,
    "compute_image_mean": 0.115,
    "compute_image_mean full-scale": 0.84,
    "compute_image_mean LYMPH_CV_NATIVE=0": 0.115,  # the numpy path, timed beside (--mean-only)
    "compute_image_mean LYMPH_CV_NATIVE=0 full-scale": 0.84,
    "binary start-up": 0.063,
}
#: Issue 17's targets: ours / Caffe's at most this (1.0: as fast; 1/1.5: 1.5x faster).
TARGETS = {"convert_imageset leveldb": 1 / 1.5, "convert_imageset lmdb": 1 / 1.5, "compute_image_mean": 1.0,
           "compute_image_mean full-scale": 1 / 1.5, "compute_image_mean LYMPH_CV_NATIVE=0": 1.0,
           "compute_image_mean LYMPH_CV_NATIVE=0 full-scale": 1 / 1.5}
#: --mean-only also times the numpy path (the code before the native module), paired.
NUMPY_ROW = "compute_image_mean LYMPH_CV_NATIVE=0"
#: Issue 17's start-up floor (python with numpy and plyvel imported), seconds, on its machine.
FLOOR_ISSUE = 0.065
#: Start-up target of every command that does not need torch.
STARTUP_TARGET = 0.2


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


#: CPU seconds (user + system) of each timed process, by the label it was timed under.
CPU: dict[str, list[float]] = {}


def _timed(argv: list[str], label: str = "") -> float:
    """Seconds until the process exits; its CPU seconds go to ``CPU[label]`` (load inflates the wall
    time far more than these)."""
    started, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    if label:
        CPU.setdefault(label, []).append(_children_cpu() - cpu)
    return time.perf_counter() - started


def _terminal_first_line(argv: list[str], env: dict, cwd: Path) -> float:
    """Seconds until the process writes its first stderr line to a terminal (a pty: ``run`` shows its plan
    there only), then Ctrl-C (``run`` would go on for minutes)."""
    import pty
    import signal

    leader, follower = pty.openpty()
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=follower)
    os.close(follower)
    seen = b""
    while b"\n" not in seen:
        chunk = os.read(leader, 4096)
        if not chunk:
            break
        seen += chunk
    elapsed = time.perf_counter() - started
    process.send_signal(signal.SIGINT)
    process.wait()
    os.close(leader)
    return elapsed


def _evaluated(work: Path) -> Path:
    """``work`` with two hand-made evaluated folds (eval/fold_K as ``evaluate`` writes it), for ``report``."""
    import numpy as np

    from lymph_cv import DEFAULT_CLASSES
    from lymph_cv.stages.results import FoldResult, ImageResult
    from lymph_cv.stages.report import write_fold

    rng = np.random.default_rng(0)
    for fold in (1, 2):
        images = []
        for index, label in enumerate([0, 1, 2, 2, 1, 0]):
            votes = rng.integers(0, 20, len(DEFAULT_CLASSES))
            images.append(ImageResult(f"{DEFAULT_CLASSES[label]}/x{fold}_{index}.tif", work / "none.tif", label,
                                      int(votes.argmax()), votes, votes / votes.sum(), np.array([[18, 18]]),
                                      np.full((1, len(DEFAULT_CLASSES)), 1 / 3, np.float32)))
        write_fold(FoldResult(fold, list(DEFAULT_CLASSES), images, {"aggregate": "vote"}), work / "eval" / f"fold_{fold}")
    return work


#: ``--startup-only`` without ``--work``: 15 small images (1,512 train patches), made in seconds.
SMALL_SET = dict(per_class=[5, 5, 5], cases_per_class=5, width=300, height=240)


def _work(path: Path | None, tmp: Path, small: bool = False) -> Path:
    """A work folder with patch files and fold lists (20 synthetic full-size images when not given;
    ``small``: :data:`SMALL_SET`, enough for the start-up figures)."""
    if path is not None:
        return path
    from lymph_cv.stages import folds, patches, synth

    synth.generate(tmp / "data", **(SMALL_SET if small else dict(per_class=[7, 7, 6], cases_per_class=2)))
    manifest = patches.extract_patches(tmp / "data", tmp / "work" / "subs")
    folds.make_folds(manifest, tmp / "work", k=5, seed=0)
    return tmp / "work"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="work folder with subs/ and train_w32_1.txt")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--big", type=Path, default=None, help="a full-scale train LevelDB for compute_image_mean")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--timeline", action="store_true",
                        help="after the rounds, one convert_imageset run per backend with its phases "
                             "(LYMPH_CV_TIMELINE: seconds since the process was started)")
    parser.add_argument("--startup-only", action="store_true", help="only the start-up figures")
    parser.add_argument("--mean-only", action="store_true",
                        help="only compute_image_mean (fold 1's LevelDB, and --big), with the floor")
    parser.add_argument("--db", type=Path, default=None,
                        help="fold 1's train LevelDB for compute_image_mean [default: convert_imageset makes one]")
    parser.add_argument("--against", type=Path, default=None,
                        help="another checkout (e.g. `git archive REV | tar -x -C DIR`): its start-ups alternate with ours")
    parser.add_argument("--slide", type=Path, default=None,
                        help="a whole-slide image for `slides info`'s first line [default: the test data's SVS]")
    args = parser.parse_args()
    # An installed package runs from its bytecode caches (pip writes them); with the caches off
    # (PYTHONDONTWRITEBYTECODE=1, as in some shells) every start-up also compiles lymph_cv's modules
    # from source, ~0.03 s.  The children write and use them like an installation does.
    bytecode_off = os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None
    from lymph_cv.formats.caffe import meanscan

    if meanscan.native_module() is None:  # a checkout without `make native`: the numpy path is timed
        print("warning: lymph_cv.formats.ldbscan is not built here (make native); compute_image_mean takes "
              "the numpy path", file=sys.stderr)
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        work = None if args.db is not None and args.mean_only else _work(args.work, tmp, small=args.startup_only)
        listing = None if work is None else work / "train_w32_1.txt"
        records = "fold 1's" if listing is None else len(listing.read_text().splitlines())
        mean_db = args.db or tmp / "db_mean"
        rows: dict[str, list[float]] = {}

        def convert(backend: str, name: str = "") -> float:
            target = tmp / (name or f"db_{backend}")
            shutil.rmtree(target, ignore_errors=True)
            return _timed([python, str(TOOLS / "convert_imageset"), "-shuffle", "-backend", backend,
                           str(work) + "/", str(listing), str(target)], label=f"convert_imageset {backend}")

        def mean(label: str, db: Path, native: bool = True) -> float:
            os.environ[NATIVE_ENV] = "1" if native else "0"  # the numpy path, for the paired figure
            try:
                return _timed([python, str(TOOLS / "compute_image_mean"), "-backend", "leveldb", str(db),
                               str(tmp / "mean.binaryproto")], label=label)
            finally:
                os.environ.pop(NATIVE_ENV)

        # The mean is timed on a database of its own, opened once before: the first open after a
        # build replays LevelDB's log (Caffe's 256 MiB write buffer holds a whole fold), which
        # Caffe's tool would pay just the same and the issue's figure does not include.
        if args.db is None:
            convert("leveldb", "db_mean")
        CPU.clear()
        mean("", mean_db)
        if args.big is not None:
            mean("", args.big)
        floor = [python, "-c", "import numpy, plyvel"]
        for _ in range(0 if args.startup_only else args.rounds):
            if not args.mean_only:
                rows.setdefault("convert_imageset leveldb", []).append(convert("leveldb"))
                rows.setdefault("convert_imageset lmdb", []).append(convert("lmdb"))
            rows.setdefault("compute_image_mean", []).append(mean("compute_image_mean", mean_db))
            if args.mean_only:
                rows.setdefault(NUMPY_ROW, []).append(mean(NUMPY_ROW, mean_db, native=False))
            rows.setdefault("floor: python -c 'import numpy, plyvel'", []).append(_timed(floor, label="floor"))
            if args.big is not None:
                rows.setdefault("compute_image_mean full-scale", []).append(
                    mean("compute_image_mean full-scale", args.big))
                if args.mean_only:
                    rows.setdefault(NUMPY_ROW + " full-scale", []).append(
                        mean(NUMPY_ROW + " full-scale", args.big, native=False))
        print(f"{records} records (fold 1 train list); {args.rounds} interleaved rounds, medians; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print("Caffe column: issue 17's side-by-side figures on this machine kind (no Caffe build here)")
        for _ in range(args.rounds if args.startup_only else 0):
            rows.setdefault("floor: python -c 'import numpy, plyvel'", []).append(_timed(floor, label="floor"))
        floor_s = statistics.median(rows.pop("floor: python -c 'import numpy, plyvel'"))
        print(f"floor (python -c 'import numpy, plyvel'): {floor_s:.3f} s wall, "
              f"{statistics.median(CPU['floor']):.3f} CPU s here; issue 17 measured {FLOOR_ISSUE} s on its machine")
        print(f"{'operation':<44} {'lymph_cv s':>10} {'CPU s':>6} {'Caffe s':>8} {'ours/Caffe':>10} {'target':>8}")
        for name, times in rows.items():
            ours, caffe = statistics.median(times), CAFFE[name]
            verdict = "met" if ours / caffe <= TARGETS[name] else "MISSED"
            print(f"{name:<44} {ours:>10.3f} {statistics.median(CPU[name]):>6.2f} {caffe:>8.3f} "
                  f"{ours / caffe:>9.2f}x {TARGETS[name]:>7.2f}x {verdict}")

        if args.timeline and not args.mean_only:
            for backend in ("leveldb", "lmdb"):
                _timeline(python, work, listing, tmp / f"db_timeline_{backend}", backend)
        if args.skip_startup or args.mean_only:
            return
        _startup(args, python, work, tmp, mean_db, bytecode_off)


#: lymph_cv.core.timeline.ENV: phase lines on stderr, seconds from the monotonic reading it holds.
TIMELINE_ENV = "LYMPH_CV_TIMELINE"


def _timeline(python: str, work: Path, listing: Path, target: Path, backend: str) -> None:
    """One ``convert_imageset`` run's phases (which parts run before the readers fork, which overlap)."""
    shutil.rmtree(target, ignore_errors=True)
    started = time.monotonic()
    done = subprocess.run([python, str(TOOLS / "convert_imageset"), "-shuffle", "-backend", backend, str(work) + "/",
                           str(listing), str(target)], env={**os.environ, TIMELINE_ENV: repr(started)},
                          capture_output=True, text=True, check=True)
    ended = time.monotonic() - started
    print(f"convert_imageset -backend {backend}, phases (pid, seconds since the start):")
    for line in done.stderr.splitlines():
        if line.startswith("timeline "):
            print("  " + line[len("timeline "):])
    print(f"  exit seen at {ended:.4f}")


def _measure(kind: str, argv: list[str], env: dict, cwd: Path) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds or None) of one start-up: ``whole`` until exit, ``stdout``/``stderr``
    until the first line there, ``terminal`` until the first stderr line on a pty (then Ctrl-C).
    ``cwd``: the checkout whose ``lymph_cv`` ``python -m`` finds first."""
    if kind == "whole":
        started, cpu = time.perf_counter(), _children_cpu()
        subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - started, _children_cpu() - cpu
    if kind == "terminal":
        return _terminal_first_line(argv, env, cwd), None
    pipe = {"stdout": subprocess.PIPE if kind == "stdout" else subprocess.DEVNULL,
            "stderr": subprocess.PIPE if kind == "stderr" else subprocess.DEVNULL}
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, cwd=cwd, **pipe)
    (process.stdout if kind == "stdout" else process.stderr).readline()
    elapsed = time.perf_counter() - started
    process.communicate()
    return elapsed, None


def _startup(args, python: str, work: Path, tmp: Path, mean_db: Path, bytecode_off: bool) -> None:
    """Every command's ``--help``, the tools' ``-help`` and the first useful lines, interleaved rounds
    (``--against TREE``: each also from that checkout, alternating, for paired before/after figures)."""
    from lymph_cv.cli import COMMANDS

    def cases(root: Path) -> list[tuple[str, str, list[str]]]:
        tools = root / "tools"
        found = [("lymph-cv --help", "whole", [python, "-m", "lymph_cv", "--help"])]
        found += [(f"lymph-cv {name} --help", "whole", [python, "-m", "lymph_cv", name, "--help"])
                  for name in sorted(COMMANDS)]
        found += [(f"{tool} -help", "whole", [python, str(tools / tool), "-help"])
                  for tool in ("convert_imageset", "compute_image_mean", "caffe")]
        found += [("lymph-cv inspect DB: first line", "stdout", [python, "-m", "lymph_cv", "inspect", str(mean_db)]),
                  ("compute_image_mean: first log line", "stderr",
                   [python, str(tools / "compute_image_mean"), "-backend", "leveldb", str(mean_db)]),
                  ("lymph-cv jobs WORK: first line", "stdout", [python, "-m", "lymph_cv", "jobs", str(work)]),
                  ("lymph-cv report WORK: first line", "stdout", [python, "-m", "lymph_cv", "report", str(evaluated)])]
        if slide.is_file():
            found.append(("lymph-cv slides info SLIDE: first line", "stdout",
                          [python, "-m", "lymph_cv", "slides", "info", str(slide)]))
        found.append(("lymph-cv run: plan line (terminal)", "terminal",
                      [python, "-m", "lymph_cv", "run", str(tmp / "run"), "--data", str(tmp / "run_data")]))
        return found

    evaluated = _evaluated(tmp / "evaluated")
    slide = args.slide or Path(os.environ.get("LYMPH_CV_TESTDATA", "")) / "cmu_small_region.svs"
    (tmp / "run_data").mkdir(exist_ok=True)  # no class folders: run stops after its checks
    trees = {"ours": (REPO, {**os.environ})}
    if args.against is not None:
        trees["against"] = (args.against.resolve(), {**os.environ, "PYTHONPATH": str(args.against.resolve())})
    runs = {label: cases(root) for label, (root, _env) in trees.items()}
    for label, (root, env) in trees.items():  # untimed: the bytecode caches written once
        for _name, kind, argv in runs[label]:
            if kind == "whole":
                subprocess.run(argv, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[tuple[str, str], list] = {}
    for round_ in range(args.rounds):
        for index, (name, _kind, _argv) in enumerate(runs["ours"]):
            for label in (list(trees) if round_ % 2 == 0 else list(reversed(trees))):
                _name, kind, argv = runs[label][index]
                shutil.rmtree(tmp / "run", ignore_errors=True)
                try:
                    results.setdefault((name, label), []).append(_measure(kind, argv, trees[label][1],
                                                                          trees[label][0]))
                except subprocess.CalledProcessError:  # a command the other checkout does not have
                    results.setdefault((name, label), [])
    print(f"\nbytecode caches in use{' (PYTHONDONTWRITEBYTECODE=1 was set here: not for these runs)' if bytecode_off else ''}; "
          f"{args.rounds} rounds, medians; load average {os.getloadavg()[0]:.1f}"
          + (f"; against {args.against} (alternating)" if args.against is not None else ""))

    def cell(name: str, label: str) -> tuple[str, float | None]:
        values = results.get((name, label)) or []
        if not values:
            return f"{'n/a':>9} {'':>6}", None
        wall = statistics.median(v[0] for v in values)
        cpus = [v[1] for v in values if v[1] is not None]
        return f"{wall:>9.3f} {statistics.median(cpus) if cpus else float('nan'):>6.3f}".replace("nan", "  - "), wall

    header = f"{'start-up (whole process)':<44} {'median s':>9} {'CPU s':>6}"
    if args.against is not None:
        header += f" {'against s':>9} {'CPU s':>6} {'ours/against':>12}"
    print(header + f" {'vs Caffe binary':>15}  target {STARTUP_TARGET} s")
    for name, _kind, _argv in runs["ours"]:
        text, wall = cell(name, "ours")
        line = f"{name:<44} {text}"
        if args.against is not None:
            other, before = cell(name, "against")
            line += f" {other} " + (f"{wall / before:>11.2f}x" if before else f"{'':>12}")
        print(line + f" {wall / CAFFE['binary start-up']:>14.1f}x  {'met' if wall <= STARTUP_TARGET else 'MISSED'}")

if __name__ == "__main__":
    main()
