"""Evaluating a MIL model on bags: each bag's probabilities, decision and instance scores, the
metrics (balanced accuracy first, accuracy, ROC AUC, confusion matrix), ``patients.csv``, and the
figures: a montage per cell bag (its top-k and bottom-k instances with score and weight) and an
instance-score heatmap over the parent image of an image or slide bag.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from lymph_cv.core.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, make_dirs
from lymph_cv.net.mil.model import pad_bags
from lymph_cv.stages.heatmaps import heatmap_png
from lymph_cv.stages.metrics import confusion_matrix, mean_sd, summary_metrics
from lymph_cv.stages.mil.data import BagData, stack_clinical, to_tensor
from lymph_cv.stages.mil.train import MILTrained, inference_model
from lymph_cv.stages.roc import roc_record

PathLike = Union[str, os.PathLike]
PATIENTS_CSV = "patients.csv"
METRICS_JSON = "mil_metrics.json"
MONTAGE_DIR = "montages"
HEATMAP_DIR = "heatmaps"
#: Instances listed per bag in patients.csv, and shown at each end of a montage.
TOP_INSTANCES = 5
MONTAGE_K = 4
#: Bags per no_grad forward of the bag model.
BAGS_PER_BATCH = 16


@dataclass
class BagResult:
    """One bag's outcome; ``scores`` (n,) each instance's probability of the decided class (of the
    positive class for two classes), ``weights`` (n,) how much it counted in the pooling."""

    bag_id: str
    label: int
    probs: np.ndarray
    decision: int
    scores: np.ndarray
    weights: np.ndarray
    instance_probs: np.ndarray

    def ranked(self) -> np.ndarray:
        """Instance indices, most important first (weight, then score)."""
        return np.lexsort((-self.scores, -self.weights))


def predict_bags(trained: MILTrained, bags: Sequence[BagData], chunk: int = 256) -> List[BagResult]:
    """Every bag's :class:`BagResult` (no gradients; the encoder in Caffe's TEST phase)."""
    model = inference_model(trained)
    results: List[BagResult] = []
    binary = len(trained.classes) == 2
    with torch.no_grad():
        for first in range(0, len(bags), BAGS_PER_BATCH):
            batch = bags[first:first + BAGS_PER_BATCH]
            per_bag = [torch.cat([model.features(p) for p in torch.split(to_tensor(b.images, trained.mean), chunk)])
                       for b in batch]
            features, mask = pad_bags(per_bag)
            prediction = model.predict(features, mask, stack_clinical(batch))
            instance_probs = torch.softmax(prediction.logits, dim=2)
            for i, bag in enumerate(batch):
                probs = prediction.probs[i].numpy().astype(np.float64)
                decision = int(np.argmax(probs))
                n = len(bag)
                column = 1 if binary else decision
                results.append(BagResult(bag.bag_id, bag.label, probs, decision,
                                         instance_probs[i, :n, column].numpy().astype(np.float64),
                                         prediction.weights[i, :n].numpy().astype(np.float64),
                                         instance_probs[i, :n].numpy().astype(np.float64)))
    return results


def bag_metrics(results: Sequence[BagResult], classes: Sequence[str]) -> dict:
    """Balanced accuracy, accuracy, per-class figures, ROC and the confusion matrix of bag decisions."""
    labels = [r.label for r in results]
    matrix = confusion_matrix(labels, [r.decision for r in results], len(classes))
    record = summary_metrics(matrix, classes)
    record.update(bags=len(results), confusion_matrix=matrix.tolist(), classes=list(classes),
                  roc=roc_record(np.stack([r.probs for r in results]), labels, classes) if results else None)
    return record


def auc_of(record: dict) -> Optional[float]:
    roc = record.get("roc") or {}
    return roc.get("auc") if roc.get("kind") == "binary" else roc.get("macro_auc")


def pooled_metrics(per_fold: Dict[str, dict], classes: Sequence[str]) -> dict:
    """Over folds: each figure's mean ± sd, and the confusion matrix of all decisions together."""
    out: dict = {"folds": sorted(per_fold), "classes": list(classes)}
    for key, get in (("balanced_accuracy", lambda r: r["balanced_accuracy"]), ("accuracy", lambda r: r["accuracy"]),
                     ("auc", auc_of)):
        values = [get(r) for r in per_fold.values() if get(r) is not None]
        mean, sd = mean_sd(values) if values else (None, None)
        out[key] = {"mean": mean, "sd": sd, "per_fold": {k: get(r) for k, r in per_fold.items()}}
    matrix = np.sum([np.asarray(r["confusion_matrix"]) for r in per_fold.values()], axis=0)
    out["confusion_matrix"] = matrix.tolist()
    out["pooled"] = summary_metrics(matrix, classes)
    return out


def patients_csv(results: Sequence[BagResult], bags: Sequence[BagData], classes: Sequence[str],
                 top: int = TOP_INSTANCES) -> str:
    """One row per bag: id, true class, decision, score (probability of the positive class for two
    classes, of the decision otherwise), every class's probability, its top instances with scores and weights."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["bag", "label", "decision", "score", *[f"p_{c}" for c in classes], "instances",
                     "top_instances", "top_scores", "top_weights"])
    for result, bag in zip(results, bags):
        order = result.ranked()[:top]
        score = result.probs[1] if len(classes) == 2 else result.probs[result.decision]
        writer.writerow([result.bag_id, classes[result.label], classes[result.decision], f"{score:.6f}",
                         *[f"{p:.6f}" for p in result.probs], len(bag),
                         ";".join(bag.names[i] for i in order),
                         ";".join(f"{result.scores[i]:.4f}" for i in order),
                         ";".join(f"{result.weights[i]:.4f}" for i in order)])
    return buffer.getvalue()


def montage_png(bag: BagData, result: BagResult, classes: Sequence[str], k: int = MONTAGE_K) -> bytes:
    """A cell bag's top-k and bottom-k instances (by weight, then score), each titled with its score
    s and weight w."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = result.ranked()
    k = min(k, len(order))
    rows = [("top", order[:k]), ("bottom", order[::-1][:k])]
    figure = Figure(figsize=(1.6 * k + 0.8, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, k, squeeze=False)
    for row, (name, indices) in enumerate(rows):
        for col in range(k):
            axis = axes[row][col]
            axis.set_xticks([])
            axis.set_yticks([])
            index = indices[col]
            axis.imshow(np.ascontiguousarray(bag.images[index][..., ::-1]), interpolation="nearest")
            axis.set_title(f"s={result.scores[index]:.2f} w={result.weights[index]:.3f}", fontsize="x-small")
        axes[row][0].set_ylabel(f"{name} {k}", fontsize="small")
    figure.suptitle(f"{bag.bag_id}: true {classes[bag.label]}, predicted {classes[result.decision]} "
                    f"(p={result.probs[result.decision]:.2f})", fontsize="small")
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def bag_heatmap_png(bag: BagData, result: BagResult, classes: Sequence[str], image_bgr: np.ndarray, stride: int) -> bytes:
    """The instance-score heatmap of an image bag over its parent image (the evaluate heatmap's figure)."""
    votes = np.bincount(result.instance_probs.argmax(axis=1), minlength=len(classes))
    return heatmap_png(image_bgr, bag.centres, result.instance_probs, stride, classes, entry=bag.bag_id,
                       label=bag.label, predicted=result.decision, votes=votes.tolist())


def evaluate_bags(trained: MILTrained, bags: Sequence[BagData], out_dir: PathLike, *,
                  montages: bool = True, parent_reader=None, stride: Optional[int] = None) -> dict:
    """Predict ``bags``, write ``patients.csv``, ``mil_metrics.json`` and the figures into ``out_dir``;
    returns the metrics.  ``parent_reader(path) → BGR image`` reads the parent images of image bags
    (their heatmaps); cell bags get montages."""
    out = make_dirs(out_dir)
    results = predict_bags(trained, bags)
    metrics = bag_metrics(results, trained.classes)
    atomic_write_text(out / PATIENTS_CSV, patients_csv(results, bags, trained.classes))
    for bag, result in zip(bags, results):
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in bag.bag_id) + ".png"
        if bag.centres is not None and parent_reader is not None and bag.parent is not None:
            png = bag_heatmap_png(bag, result, trained.classes, parent_reader(bag.parent),
                                  stride or int(bag.images.shape[1]))
            atomic_write_bytes(make_dirs(out / HEATMAP_DIR) / name, png)
        elif montages and bag.centres is None:
            atomic_write_bytes(make_dirs(out / MONTAGE_DIR) / name, montage_png(bag, result, trained.classes))
    atomic_write_json(out / METRICS_JSON, metrics)
    return metrics
