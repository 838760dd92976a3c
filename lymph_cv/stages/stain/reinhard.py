"""``reinhard``: per-channel mean and standard deviation in LAB matched to a target's (Reinhard 2001).

LAB is OpenCV's 8-bit LAB (as StainTools and TIAToolbox use it): ``cv2.cvtColor(BGR2LAB)`` on the
uint8 image, read as L = L8 / 2.55 (0..100), a = a8 − 128, b = b8 − 128. The statistics are taken
over tissue pixels only (``include_background=False``, the default; glass would pull every mean
towards white and shrink every spread) or over the whole image (the classic method). The mapping is
applied to every pixel, background included, so the image stays continuous. Because it is an affine
map per channel of the 8-bit LAB image it runs as three 256-entry lookup tables: the result is
rounded and clipped to 0..255 in 8-bit LAB, then converted back to BGR.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import cv2
import numpy as np

from lymph_cv.errors import ConfigError
from lymph_cv.stages.stain.registry import Normaliser, enough_tissue, register, tissue_mask

#: 8-bit LAB → LAB units: value = (v8 − offset) / scale per channel (L, a, b).
LAB8_SCALE = np.array([2.55, 1.0, 1.0])
LAB8_OFFSET = np.array([0.0, 128.0, 128.0])
#: A channel whose spread is below this (LAB units) is only shifted, never divided by ~0.
MIN_STD = 1e-3
LEVELS = np.arange(256, dtype=np.float64)


@register("reinhard")
class Reinhard(Normaliser):
    """Mean and standard deviation of L, a, b (tissue pixels by default) matched to the target's."""

    defaults = {"include_background": False}
    target_shapes = {"mean": (3,), "std": (3,)}

    def check(self) -> None:
        if not isinstance(self.params["include_background"], bool):
            raise ConfigError("--stain-include-background: expected true or false")

    def _lab_stats(self, bgr: np.ndarray) -> tuple[Optional[np.ndarray], Optional[np.ndarray], np.ndarray]:
        lab = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2LAB)
        if self.params["include_background"]:
            mask = None
        else:
            tissue = tissue_mask(bgr)
            if not enough_tissue(int(np.count_nonzero(tissue)), tissue.size):
                return None, None, lab
            mask = tissue.view(np.uint8)
        mean8, std8 = cv2.meanStdDev(lab, mask=mask)
        mean = (mean8.ravel() - LAB8_OFFSET) / LAB8_SCALE
        std = std8.ravel() / LAB8_SCALE
        return mean, std, lab

    def statistics(self, bgr: np.ndarray) -> Optional[dict]:
        mean, std, _ = self._lab_stats(bgr)
        return None if mean is None else {"mean": mean.tolist(), "std": std.tolist()}

    def normalise(self, bgr: np.ndarray, target: Mapping[str, Any]) -> tuple[np.ndarray, bool]:
        mean, std, lab = self._lab_stats(bgr)
        if mean is None:
            return bgr, False
        target_mean = np.asarray(target["mean"], np.float64)
        target_std = np.asarray(target["std"], np.float64)
        gain = np.where(std > MIN_STD, target_std / np.maximum(std, MIN_STD), 1.0)
        # One table per channel over the 256 8-bit LAB levels: units, standardise, rescale, back to 8 bits.
        units = (LEVELS[:, None] - LAB8_OFFSET) / LAB8_SCALE
        mapped = (units - mean) * gain + target_mean
        table = np.clip(np.rint(mapped * LAB8_SCALE + LAB8_OFFSET), 0, 255).astype(np.uint8)
        out = cv2.LUT(lab, np.ascontiguousarray(table.reshape(1, 256, 3)))
        return cv2.cvtColor(out, cv2.COLOR_LAB2BGR), True
