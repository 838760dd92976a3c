"""ROC analysis of image scores: AUC (rank-based, ties counted half), the curve, the operating
threshold, one-vs-rest AUC per class, and the curve drawn as a PNG (matplotlib's Agg canvas).

The AUC is the Mann–Whitney statistic: the probability that a random positive scores above a random
negative, a tie counting ½, computed from average ranks (``O(n log n)``, exact for tied scores).
The curve has one point per distinct score, from (0, 0) (threshold +∞) to (1, 1); its trapezoid area
equals the rank AUC.  The operating threshold maximises Youden's J = sensitivity + specificity − 1
(ties: the highest threshold, the fewest positive calls) over the scores (the +∞ point calls nothing
positive: no threshold to report, nor JSON); an image is called positive when its score is ``>=`` it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from lymph_cv.errors import EvaluationError

#: File name of a drawn ROC curve (a fold's, the pooled one, the held-out split's).
ROC_PNG = "roc.png"
#: Decimals kept for curve points and thresholds in JSON.
JSON_DIGITS = 6
#: Figure size (inches) and resolution of roc.png.
FIGURE_SIZE = (4.8, 4.8)
DPI = 110


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # start of each run of equal values, and its length
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    lengths = np.diff(np.r_[starts, len(values)])
    mean_rank = starts + (lengths + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, lengths)
    return ranks


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> Optional[float]:
    """Area under the ROC curve of ``scores`` for the ``positive`` flags; None without both kinds."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise EvaluationError(f"{scores.shape} scores for {positive.shape} labels")
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = float(average_ranks(scores)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


@dataclass
class RocCurve:
    """False and true positive rates at each threshold (descending, the first +∞)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray

    @property
    def area(self) -> float:
        """Trapezoid area under the points (equal to :func:`roc_auc`)."""
        return float(np.sum(np.diff(self.fpr) * (self.tpr[1:] + self.tpr[:-1]) / 2.0))

    def operating_point(self) -> int:
        """Index of the point with the largest Youden J (the first, i.e. highest threshold, of ties),
        among the finite thresholds (a useless score's best would otherwise be +∞)."""
        return 1 + int(np.argmax(self.tpr[1:] - self.fpr[1:]))


def roc_curve(scores: Sequence[float], positive: Sequence[bool]) -> RocCurve:
    """The ROC curve; EvaluationError unless both positives and negatives are present."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise EvaluationError("a ROC curve needs positive and negative images")
    order = np.argsort(-scores, kind="mergesort")
    ordered, hits = scores[order], positive[order]
    last_of_run = np.r_[ordered[1:] != ordered[:-1], True]  # every image up to here is called positive
    tp = np.cumsum(hits)[last_of_run]
    fp = np.cumsum(~hits)[last_of_run]
    return RocCurve(np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, ordered[last_of_run]])


def _rounded(values: np.ndarray) -> List[Optional[float]]:
    return [None if not np.isfinite(v) else round(float(v), JSON_DIGITS) for v in values]


def binary_record(scores: Sequence[float], positive: Sequence[bool], positive_name: str) -> dict:
    """AUC, operating threshold with its sensitivity / specificity, and the curve, as JSON data
    (``auc`` None and no curve when one kind of image is missing)."""
    auc = roc_auc(scores, positive)
    record = {"positive": positive_name, "auc": auc, "threshold": None, "sensitivity": None,
              "specificity": None, "curve": None}
    if auc is None:
        return record
    curve = roc_curve(scores, positive)
    best = curve.operating_point()
    record.update(threshold=float(curve.thresholds[best]), sensitivity=float(curve.tpr[best]),
                  specificity=float(1.0 - curve.fpr[best]),
                  curve={"fpr": _rounded(curve.fpr), "tpr": _rounded(curve.tpr),
                         "thresholds": _rounded(curve.thresholds)})
    return record


def one_vs_rest(scores: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> Dict[str, Optional[float]]:
    """AUC of each class's score column against all other classes (None where undefined)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    return {name: roc_auc(scores[:, k], labels == k) for k, name in enumerate(classes)}


def roc_record(scores: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> dict:
    """ROC figures of images with per-class ``scores`` (N × classes) and true ``labels``: for two
    classes the second class is the positive one (:func:`binary_record`); otherwise one-vs-rest
    AUC per class and their mean over the defined ones."""
    scores = np.asarray(scores, dtype=np.float64).reshape(len(labels), len(classes))
    labels = np.asarray(labels)
    if len(classes) == 2:
        return {"kind": "binary", **binary_record(scores[:, 1], labels == 1, classes[1])}
    per_class = one_vs_rest(scores, labels, classes)
    defined = [v for v in per_class.values() if v is not None]
    return {"kind": "one_vs_rest", "per_class": per_class,
            "macro_auc": float(np.mean(defined)) if defined else None}


def draw_roc(record: dict, title: str = "") -> bytes:
    """PNG of a binary record's curve, with the chance diagonal and the operating point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curve = record.get("curve")
    if not curve:
        raise EvaluationError("no ROC curve to draw (one kind of image is missing)")
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    axis.plot(curve["fpr"], curve["tpr"], color="tab:blue", linewidth=2,
              label=f"AUC {record['auc']:.3f}")
    axis.plot([1 - record["specificity"]], [record["sensitivity"]], "o", color="tab:red",
              label=f"threshold {record['threshold']:.3g}")
    axis.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate (1 − specificity)",
             ylabel=f"true positive rate ({record['positive']})", title=title or "ROC")
    axis.legend(loc="lower right", fontsize="small")
    axis.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
