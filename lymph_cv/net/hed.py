"""Stain augmentation: random jitter of each sample's haematoxylin, eosin and DAB densities (HED space).

After Tellez et al. (2018): each BGR uint8 sample is turned into optical density
OD = −ln((I + 1) / 256) per channel, unmixed into H, E and D concentrations with Ruifrok & Johnston's
stain matrix (the one scikit-image's ``rgb2hed`` uses, rows made unit length), and per sample and
stain channel rescaled ``c' = c · a + b`` with a ~ U(1 − σ₁, 1 + σ₁) and b ~ U(−σ₂, σ₂)
(concentrations in natural-log OD units; defaults σ₁ = σ₂ = 0.05), then mixed back, rounded and
clipped to 0..255. Background pixels (glass: bright and grey, the stain normaliser's rule) keep
their values, so the jitter never tints the glass. The draws come from the caller's generator
(the data layer seeds it per (seed, phase, batch)), so a resumed run sees the same batches.
"""
from __future__ import annotations

import numpy as np

from lymph_cv.errors import ConfigError

#: Ruifrok & Johnston's H, E and DAB optical-density vectors (RGB), as in scikit-image's rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
STAINS = 3
#: Glass, as the stain normalisers see it (8-bit HSV value at least, saturation at most).
BACKGROUND_MIN_VALUE = 200
BACKGROUND_MAX_SATURATION = 25
#: OD of every 8-bit level: −ln((I + 1) / 256).
_OD_TABLE = (-np.log((np.arange(256, dtype=np.float64) + 1) / 256)).astype(np.float32)
DEFAULT_SCALE_SIGMA = 0.05
DEFAULT_SHIFT_SIGMA = 0.05


def check_sigmas(scale_sigma: float, shift_sigma: float) -> None:
    """ConfigError unless 0 ≤ σ₁ < 1 and σ₂ ≥ 0 (finite)."""
    if not (np.isfinite(scale_sigma) and 0 <= scale_sigma < 1):
        raise ConfigError(f"--stain-augment-scale: must be in [0, 1), got {scale_sigma:g}")
    if not (np.isfinite(shift_sigma) and shift_sigma >= 0):
        raise ConfigError(f"--stain-augment-shift: must be a finite number >= 0, got {shift_sigma:g}")


def background(images: np.ndarray) -> np.ndarray:
    """(N, H, W) True where a pixel of an (N, 3, H, W) uint8 batch is glass (bright and grey)."""
    high = images.max(axis=1)
    low = images.min(axis=1)
    # HSV saturation on 0..255: 255 · (max − min) / max; compared without dividing.
    grey = (high.astype(np.int32) - low) * 255 <= BACKGROUND_MAX_SATURATION * high.astype(np.int32)
    return (high >= BACKGROUND_MIN_VALUE) & grey


def hed_jitter(images: np.ndarray, rng: np.random.Generator, scale_sigma: float = DEFAULT_SCALE_SIGMA,
               shift_sigma: float = DEFAULT_SHIFT_SIGMA) -> np.ndarray:
    """A jittered copy of an (N, 3, H, W) BGR uint8 batch; draws: N×3 scales, then N×3 shifts."""
    n = images.shape[0]
    scale = rng.uniform(1 - scale_sigma, 1 + scale_sigma, size=(n, STAINS))
    shift = rng.uniform(-shift_sigma, shift_sigma, size=(n, STAINS))
    od = _OD_TABLE[images[:, ::-1]]  # (N, 3 RGB, H, W)
    # Per sample: concentrations = HED_FROM_RGB-mixing, jittered, mixed back; folded into one 3×3 map
    # and an offset per sample: od' = od · (M⁻¹ · diag(a) · M) + b · M (row vectors).
    mixing = np.einsum("cs,ns,sd->ncd", HED_FROM_RGB, scale, RGB_FROM_HED).astype(np.float32)
    offset = (shift @ RGB_FROM_HED).astype(np.float32)  # (N, 3)
    flat = od.reshape(n, STAINS, -1)
    jittered = (np.matmul(mixing.transpose(0, 2, 1), flat) + offset[:, :, None]).reshape(od.shape)
    np.exp(-jittered, out=jittered)
    jittered *= 256
    jittered -= 1
    np.rint(jittered, out=jittered)
    np.clip(jittered, 0, 255, out=jittered)
    out = jittered[:, ::-1].astype(np.uint8)  # back to BGR
    glass = background(images)
    return np.where(glass[:, None], images, out)
