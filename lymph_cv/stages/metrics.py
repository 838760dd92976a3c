"""Classification metrics of confusion matrices (rows = true class, columns = predicted class): the
bottom of step 5; evaluation, results and reports use these, they use nothing of them."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def confusion_matrix(true: Sequence[int], predicted: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = true class, columns = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    return float(numerator) / float(denominator) if denominator else None


def class_metrics(matrix: np.ndarray, classes: Sequence[str]) -> dict:
    """Per class: precision, recall, F1 (``None`` where undefined: nothing predicted / no true
    image) and support (true images)."""
    matrix = np.asarray(matrix)
    result = {}
    for index, name in enumerate(classes):
        hits = matrix[index, index]
        precision = _ratio(hits, matrix[:, index].sum())
        recall = _ratio(hits, matrix[index].sum())
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(matrix[index].sum())}
    return result


def accuracy(matrix: np.ndarray) -> float:
    """Fraction of images on the diagonal (0 for an empty matrix)."""
    total = np.asarray(matrix).sum()
    return float(np.trace(matrix)) / total if total else 0.0


def balanced_accuracy(matrix: np.ndarray) -> float:
    """Mean recall over the classes that have true images."""
    matrix = np.asarray(matrix)
    support = matrix.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def summary_metrics(matrix: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy and per-class metrics of one confusion matrix."""
    return {
        "accuracy": accuracy(matrix),
        "balanced_accuracy": balanced_accuracy(matrix),
        "per_class": class_metrics(matrix, classes),
    }


def mean_sd(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (ddof 1; ``None`` for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)
