"""The stain-shift experiment: train on two synthetic sites, test on a third whose staining differs.

A synthetic set from three sites (``synth --sites 3``: standard, pale pink, dark blue-purple) is
split by site (``folds --by-site``); the fold that holds out ``--test-site`` is trained with the
tutorial's 32w net, ``--max-iter`` iterations, under five conditions, each over ``--seeds`` seeds:

* ``none``: the raw images;
* ``reinhard`` / ``macenko``: normalised, targets fitted on the training sites' images only;
* ``augment``: raw images, HED stain jitter in training (``--stain-augment``, σ₁ = σ₂ = ``--sigma``);
* ``reinhard+augment``: both.

Each run is ``lymph-cv run`` (its own work folder under ``--out``); the table gives the test site's
image-level accuracy and balanced accuracy, mean ± sd over the seeds, and a PNG shows them.
Usage: ``python benchmarks/stain_shift.py --out /tmp/stain_shift [--seeds 3] [--max-iter 300]``.
Conditions can run as separate processes (``--conditions augment --out /tmp/a``, …) and be pooled
into one table and PNG with ``--combine /tmp/a/stain_shift.json /tmp/b/stain_shift.json --out DIR``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from lymph_cv.pipeline import RunOptions, run_pipeline
from lymph_cv.stages.synth import generate

#: condition → (stain method or None, HED jitter on?)
CONDITIONS = {
    "none": (None, False),
    "reinhard": ("reinhard", False),
    "macenko": ("macenko", False),
    "augment": (None, True),
    "reinhard+augment": ("reinhard", True),
}
SITES = 3


def run_condition(data: Path, out: Path, name: str, seed: int, fold: int, args) -> dict:
    method, augment = CONDITIONS[name]
    overrides = {"batch_size": str(args.batch_size), "test_iter": "1"}
    if augment:
        overrides.update(stain_jitter="true", stain_scale_sigma=str(args.sigma), stain_shift_sigma=str(args.sigma))
    options = RunOptions(workdir=out / f"{name}_seed{seed}", data=data, k=SITES, folds=[fold], group_by="site",
                         seed=seed, direct=True, max_iter=args.max_iter, overrides=overrides, workers=args.workers,
                         stain=method)
    started = time.perf_counter()
    run_pipeline(options)
    metrics = json.loads((options.workdir / "eval" / f"fold_{fold}" / "metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
            "seconds": time.perf_counter() - started}


def plot(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(names))
    for offset, key, label in ((-0.2, "accuracy", "accuracy"), (0.2, "balanced_accuracy", "balanced accuracy")):
        values = [[r[key] for r in rows[n]] for n in names]
        ax.bar(x + offset, [np.mean(v) for v in values], 0.4, yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in values],
               capsize=3, label=label)
    ax.axhline(1 / 3, color="grey", linestyle=":", linewidth=1, label="chance (3 classes)")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test site, image level")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows: dict) -> None:
    print("| condition | accuracy (mean ± sd) | balanced accuracy (mean ± sd) |")
    print("|---|---|---|")
    for name, results in rows.items():
        cells = []
        for key in ("accuracy", "balanced_accuracy"):
            values = np.array([r[key] for r in results])
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


def combine(paths, out: Path) -> None:
    """Pool the results of several runs of this script (same settings, other conditions)."""
    rows: dict = {}
    for path in paths:
        record = json.loads(Path(path).read_text())
        for name, results in record["results"].items():
            rows.setdefault(name, []).extend(results)
        args = record["args"]
    order = [name for name in CONDITIONS if name in rows]
    rows = {name: rows[name] for name in order}
    print(f"test site{args['test_site']}; {min(len(r) for r in rows.values())}-{max(len(r) for r in rows.values())} "
          f"seeds, {args['max_iter']} iterations, "
          f"{args['per_class']} images per class")
    print_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "stain_shift.png", f"train: 2 sites, test: site{args['test_site']}")
    print(f"wrote {out / 'stain_shift.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", default=None, help="run these seeds only, e.g. 1,2 (default: 0..seeds-1)")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=12, help="images per class (over 6 cases)")
    parser.add_argument("--width", type=int, default=300)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--test-site", type=int, default=3, choices=range(1, SITES + 1))
    parser.add_argument("--sigma", type=float, default=0.05, help="HED jitter σ₁ = σ₂")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--combine", nargs="+", type=Path, default=None, metavar="JSON",
                        help="pool these stain_shift.json files into one table and PNG in --out (no training)")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine, args.out)
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    data = args.out / "data"
    generate(data, per_class=args.per_class, cases_per_class=6, width=args.width, height=args.height, seed=0,
             workers=args.workers, sites=SITES)
    names = [n.strip() for n in args.conditions.split(",")]
    seeds = [int(v) for v in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    rows: dict = {}
    for name in names:
        for seed in seeds:
            result = run_condition(data, args.out, name, seed, args.test_site, args)
            rows.setdefault(name, []).append(result)
            print(f"{name:18s} seed {seed}: accuracy {result['accuracy']:.3f}, balanced {result['balanced_accuracy']:.3f}"
                  f" ({result['seconds']:.0f} s)", flush=True)
    styles = json.loads((data / "synth.json").read_text())["site_styles"]
    test = styles[args.test_site - 1]
    print(f"\ntrained on the other two sites, tested on site{args.test_site} ({test['description']}); "
          f"{args.seeds} seeds, {args.max_iter} iterations, {args.per_class} images per class")
    print_table(rows)
    (args.out / "stain_shift.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": rows}, indent=2))
    plot(rows, args.out / "stain_shift.png", f"train: 2 sites, test: site{args.test_site} ({test['description']})")
    print(f"wrote {args.out / 'stain_shift.png'}")


if __name__ == "__main__":
    main()
