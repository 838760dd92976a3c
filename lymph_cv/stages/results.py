"""What evaluation returns and reports read: one image's result, one fold's (kept apart from both, so
``report`` needs nothing of ``evaluate``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np

from lymph_cv.stages.metrics import confusion_matrix


@dataclass
class ImageResult:
    """One test image's windows, their probabilities and the image's decision."""

    entry: str
    path: Path
    label: int
    predicted: int
    votes: np.ndarray  # (classes,) int
    scores: np.ndarray  # (classes,) aggregate scores the decision was taken on
    centres: np.ndarray  # (windows, 2) row, col
    probs: np.ndarray  # (windows, classes) float32, averaged over the crops

    @property
    def correct(self) -> bool:
        return self.predicted == self.label


@dataclass
class FoldResult:
    """A fold's evaluation: per-image results, the confusion matrix and the settings used."""

    fold: int
    classes: List[str]
    images: List[ImageResult]
    settings: dict = field(default_factory=dict)

    @property
    def confusion(self) -> np.ndarray:
        """Counts with rows = true class, columns = predicted class."""
        return confusion_matrix([r.label for r in self.images], [r.predicted for r in self.images], len(self.classes))

    @property
    def misclassified(self) -> List[ImageResult]:
        return [r for r in self.images if not r.correct]
