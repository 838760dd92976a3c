"""``topk:K``: per class, the mean of its K highest window probabilities (the multiple-instance view;
K above the window count is the mean)."""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from lymph_cv.stages.aggregate.registry import register


def parse_k(argument: Optional[str]) -> int:
    """K ≥ 1, written in ASCII digits."""
    if argument is None or not re.fullmatch(r"\d+", argument) or int(argument) < 1:
        raise ValueError(argument)
    return int(argument)


@register("topk", syntax="topk:K", parse=parse_k)
def topk(window_probs: np.ndarray, k: int) -> np.ndarray:
    k = min(k, window_probs.shape[0])
    top = -np.partition(-window_probs, k - 1, axis=0)[:k]
    return top.mean(axis=0, dtype=np.float64)
