"""``vote``, the tutorial's rule: each window votes for its most probable class; scores are vote fractions."""
from __future__ import annotations

import numpy as np

from lymph_cv.stages.aggregate.registry import register


def vote_counts(window_probs: np.ndarray, n_classes: int) -> np.ndarray:
    """Votes per class: each window votes for its argmax (ties → the lowest class index)."""
    return np.bincount(np.argmax(window_probs, axis=1), minlength=n_classes).astype(np.int64)


@register("vote")
def vote(window_probs: np.ndarray, argument: int) -> np.ndarray:
    n_windows, n_classes = window_probs.shape
    return vote_counts(window_probs, n_classes) / float(n_windows)
