"""``topk:K``: per class, the mean of its K highest window probabilities (the multiple-instance view;
K above the window count is the mean)."""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from lymph_cv.stages.aggregate.registry import register


@register("topk")
class TopK:
    syntax = "topk:K"

    @staticmethod
    def parse(argument: Optional[str]) -> int:
        if argument is None or not re.fullmatch(r"\d+", argument) or int(argument) < 1:
            raise ValueError(argument)
        return int(argument)

    @staticmethod
    def scores(window_probs: np.ndarray, argument: int) -> np.ndarray:
        k = min(argument, window_probs.shape[0])
        top = -np.partition(-window_probs, k - 1, axis=0)[:k]
        return top.mean(axis=0, dtype=np.float64)
