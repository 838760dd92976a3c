"""The MIL done-when table: on synthetic patient bags, the instance vote vs mean vs top-k vs attention vs
attention + clinical attributes, balanced accuracy mean ± sd over seeds.

Per seed s: `synth --layout bags` with seed s (80 patients, 20-60 cells of --cell-size px, 20-40 %
abnormal cells in tumoral patients, the weak default clinical signal), one stratified 50/50 patient split
seeded s, every method trained with seed s on the train half (end to end, gradients through
--grad-instances cells per bag) and scored on the test half.  Prints a Markdown table and the settings.

    .venv/bin/python benchmarks/mil_table.py [--seeds 5] [--epochs 10] [--cell-size 32] [--arch alexnet32w]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lymph_cv.stages.bag_folds import bags_of_split, split_bags
from lymph_cv.stages.bags import load_bags
from lymph_cv.stages.metrics import mean_sd
from lymph_cv.stages.mil.data import bag_data
from lymph_cv.stages.mil.evaluate import bag_metrics, predict_bags
from lymph_cv.stages.mil.train import MILConfig, train_mil
from lymph_cv.stages.synth_bags import generate_bags

#: Table rows: label → (method, fusion).
ROWS = {"instance vote": ("vote", None), "mean": ("mean", None), "max": ("max", None), "top-k": ("topk", None),
        "learned": ("learned", None), "attention": ("attention", None),
        "attention + clinical (concat)": ("attention", "concat"), "attention + clinical (sum)": ("attention", "sum"),
        "attention + clinical (late)": ("attention", "late")}
DEFAULT_ROWS = ("instance vote", "mean", "top-k", "attention", "attention + clinical (concat)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--cell-size", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--grad-instances", type=int, default=8)
    parser.add_argument("--arch", default="alexnet32w")
    parser.add_argument("--k", default="20%,min=3", help="top-k: k_train = k_agg")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS))
    parser.add_argument("--json", type=Path, default=None, help="also write the per-seed figures here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a loaded machine OpenMP's spinning threads cost ~10x the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scores = {row: [] for row in args.rows}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            data = Path(tmp) / f"data_{seed}"
            generate_bags(data, patients=args.patients, cell_size=args.cell_size, seed=seed, workers=1)
            bag_set = load_bags(data)
            split = split_bags(bag_set, Path(tmp) / f"work_{seed}", method="random", repeats=1, seed=seed).splits[0]
            train, test = bags_of_split(bag_set, split)
            arrays = {c: (bag_data(bag_set, train, args.cell_size, c), bag_data(bag_set, test, args.cell_size, c))
                      for c in (False, True)}
            for row in args.rows:
                method, fusion = ROWS[row]
                config = MILConfig(method=method, fusion=fusion, arch=args.arch, crop=args.cell_size,
                                   epochs=args.epochs, grad_instances=args.grad_instances, k_train=args.k,
                                   k_agg=args.k, seed=seed)
                train_data, test_data = arrays[fusion is not None]
                t0 = time.perf_counter()
                trained = train_mil(train_data, bag_set.classes, config,
                                    bag_set.clinical_columns if fusion else None)
                metrics = bag_metrics(predict_bags(trained, test_data), bag_set.classes)
                scores[row].append(metrics["balanced_accuracy"])
                print(f"seed {seed} {row}: balanced accuracy {metrics['balanced_accuracy']:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n{args.patients} patients per seed, 50/50 patient split, {args.seeds} seeds; {args.arch} on "
          f"{args.cell_size} px cells, {args.epochs} epochs, 4 bags a batch, {args.grad_instances} cells a bag "
          f"with gradients, Adam 1e-3; top-k k = {args.k}; {time.perf_counter() - started:.0f} s in all\n")
    print("| method | balanced accuracy (mean ± sd) | per seed |")
    print("| --- | --- | --- |")
    for row, values in scores.items():
        mean, sd = mean_sd(values)
        print(f"| {row} | {mean:.3f} ± {sd or 0:.3f} | {' '.join(f'{v:.2f}' for v in values)} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "scores": scores}, indent=2))


if __name__ == "__main__":
    main()
