"""``none``: no stain normalisation (the tutorial's pixels), so every stage can name a method."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from lymph_cv.stages.stain.registry import Normaliser, register


@register("none")
class Identity(Normaliser):
    """Leaves every image as it is; its target is empty."""

    def statistics(self, bgr: np.ndarray) -> Optional[dict]:
        return {}

    def combine(self, stats) -> dict:
        return {}

    def normalise(self, bgr: np.ndarray, target: Mapping[str, Any]) -> tuple[np.ndarray, bool]:
        return bgr, True
