"""``mean``: the mean window probability per class."""
from __future__ import annotations

import numpy as np

from lymph_cv.stages.aggregate.registry import register


@register("mean")
def mean(window_probs: np.ndarray, argument: int) -> np.ndarray:
    return window_probs.mean(axis=0, dtype=np.float64)
