"""``macenko``: stain vectors from the optical-density plane, concentrations rescaled (Macenko 2009).

Every constant, in RGB channel order (the images arrive as BGR and are read reversed):

* optical density OD = −ln((I + 1) / Io) per channel, Io = 240 by default (``io``): the light level
  of glass; brighter pixels get a small negative OD;
* a pixel takes part in the fit only when its OD is at least β = 0.15 in every channel (``beta``):
  glass and very pale pixels are dropped;
* the two principal eigenvectors of the covariance of those ODs span the stain plane; each is
  flipped to have a positive component sum, so tissue projects to angles in (−π/2, π/2) and the
  percentiles below never straddle the ±π seam;
* the extreme directions are the α = 1st and 99th percentiles of the projected angles (``alpha``);
* haematoxylin is the one with the larger red-channel OD (it absorbs red; eosin hardly does);
* concentrations of every pixel by least squares (the pseudo-inverse of the 3 × 2 stain matrix);
* each stain's concentrations are scaled so that their 99th percentile (``percentile``) over the
  fitted pixels equals the target's (over every pixel, glass included, with
  ``percentile_of_all_pixels``: the original code's and torchstain's rule, which makes the scale
  depend on how much glass an image shows), then recomposed with the target's stain vectors:
  Io · exp(−OD), rounded and clipped to 0..255 (normalised glass therefore comes out near Io).

An image with too few tissue pixels, or whose stain plane is degenerate (one colour only), is
returned unchanged (the caller reports it); no NaN can reach the output.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import cv2
import numpy as np

from lymph_cv.errors import ConfigError
from lymph_cv.stages.stain.registry import Normaliser, enough_tissue, register

#: Smallest spread of the extreme angles (radians) and concentration percentile still usable.
MIN_ANGLE_SPREAD = 1e-3
MIN_CONCENTRATION = 1e-6
CHANNELS = 3


@register("macenko")
class Macenko(Normaliser):
    """Haematoxylin and eosin vectors and their 99th-percentile concentrations matched to the target's."""

    defaults = {"io": 240.0, "alpha": 1.0, "beta": 0.15, "percentile": 99.0, "percentile_of_all_pixels": False}
    target_shapes = {"stain_matrix": (2, 3), "max_concentration": (2,)}

    def check(self) -> None:
        p = self.params
        for name in ("io", "alpha", "beta", "percentile"):
            value = p[name]
            try:
                if isinstance(value, bool):
                    raise TypeError(value)
                float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"--stain macenko: {name} must be a number, got {value!r}") from None
        if not 0 < float(p["io"]) <= 255:
            raise ConfigError(f"--stain macenko: io must be in (0, 255], got {p['io']}")
        if not 0 <= float(p["alpha"]) < 50:
            raise ConfigError(f"--stain macenko: alpha must be in [0, 50), got {p['alpha']}")
        if not float(p["beta"]) >= 0:
            raise ConfigError(f"--stain macenko: beta must be at least 0, got {p['beta']}")
        if not 0 < float(p["percentile"]) <= 100:
            raise ConfigError(f"--stain macenko: percentile must be in (0, 100], got {p['percentile']}")
        if not isinstance(p["percentile_of_all_pixels"], bool):
            raise ConfigError("--stain macenko: percentile_of_all_pixels must be true or false")

    def optical_density(self, bgr: np.ndarray) -> np.ndarray:
        """(pixels, 3) float32 OD in the image's BGR order, through a 256-entry table (no per-pixel log)."""
        table = (-np.log((np.arange(256, dtype=np.float64) + 1) / float(self.params["io"]))).astype(np.float32)
        return table[bgr.reshape(-1, CHANNELS)]

    def _fitted(self, bgr: np.ndarray) -> np.ndarray:
        """Pixels whose OD is at least beta in every channel: their brightest channel is dark enough."""
        # OD falls as I rises, so OD >= beta  <=>  I + 1 <= Io * exp(-beta).
        limit = float(self.params["io"]) * np.exp(-float(self.params["beta"])) - 1
        flat = np.ascontiguousarray(bgr).reshape(-1, CHANNELS)
        brightest = np.maximum(np.maximum(flat[:, 0], flat[:, 1]), flat[:, 2])  # far faster than max(axis=1)
        return brightest <= limit

    def _fit(self, bgr: np.ndarray, od: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(stain matrix 2×3 [H; E] in RGB order, concentrations of every pixel and of the fitted ones) or None."""
        fitted = self._fitted(bgr)
        count = int(np.count_nonzero(fitted))
        if not enough_tissue(count, len(od)):
            return None
        tissue = od[fitted]
        # Covariance in float64 through BLAS (numpy's mean/cov over axis 0 are several times slower).
        wide = tissue.astype(np.float64)
        mean = (np.ones(count) @ wide) / count
        wide -= mean
        covariance = (wide.T @ wide) / count
        _, vectors = np.linalg.eigh(covariance)
        plane = vectors[:, 1:3]  # eigh sorts ascending: the two largest
        plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
        projected = tissue @ plane.astype(np.float32)
        angles = np.arctan2(projected[:, 1], projected[:, 0])
        alpha = float(self.params["alpha"])
        low, high = np.percentile(angles, [alpha, 100 - alpha])
        if not high - low > MIN_ANGLE_SPREAD:
            return None
        first = (plane @ np.array([np.cos(low), np.sin(low)]))[::-1]  # BGR -> RGB
        second = (plane @ np.array([np.cos(high), np.sin(high)]))[::-1]
        stains = np.stack([first, second] if first[0] > second[0] else [second, first])
        # Least squares for every pixel at once: OD (pixels×3, BGR) times the pseudo-inverse.
        unmix = np.linalg.pinv(stains[:, ::-1]).astype(np.float32)  # (3, 2)
        return stains, od @ unmix, tissue @ unmix

    def _maxima(self, concentrations: np.ndarray, fitted: np.ndarray) -> Optional[np.ndarray]:
        """Each stain's percentile of the fitted pixels' concentrations (or of all pixels')."""
        pixels = concentrations if self.params["percentile_of_all_pixels"] else fitted
        # One contiguous row per stain: np.percentile along axis 0 of (N, 2) is far slower.
        maxima = np.percentile(np.ascontiguousarray(pixels.T), float(self.params["percentile"]), axis=1)
        return maxima if np.all(np.isfinite(maxima)) and np.all(maxima > MIN_CONCENTRATION) else None

    def statistics(self, bgr: np.ndarray) -> Optional[dict]:
        fit = self._fit(bgr, self.optical_density(bgr))
        if fit is None:
            return None
        stains, concentrations, fitted = fit
        maxima = self._maxima(concentrations, fitted)
        if maxima is None:
            return None
        return {"stain_matrix": stains.tolist(), "max_concentration": maxima.tolist()}

    def combine(self, stats) -> dict:
        """Element-wise medians of the stain vectors (each made unit length again) and of the maxima."""
        target = super().combine(stats)
        matrix = np.asarray(target["stain_matrix"])
        target["stain_matrix"] = (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).tolist()
        return target

    def normalise(self, bgr: np.ndarray, target: Mapping[str, Any]) -> tuple[np.ndarray, bool]:
        od = self.optical_density(bgr)
        fit = self._fit(bgr, od)
        if fit is None:
            return bgr, False
        _, concentrations, fitted = fit
        maxima = self._maxima(concentrations, fitted)
        if maxima is None:
            return bgr, False
        scale = np.asarray(target["max_concentration"], np.float64) / maxima
        # Scaling folded into the target's stain matrix (BGR order): one (pixels×2)·(2×3) product.
        mixing = (scale[:, None] * np.asarray(target["stain_matrix"], np.float64)[:, ::-1]).astype(np.float32)
        density = concentrations @ -mixing
        np.exp(density, out=density)
        # Io·exp(−OD), rounded to nearest and saturated to 0..255 in one SIMD pass (values are ≥ 0).
        out = cv2.convertScaleAbs(density, alpha=float(self.params["io"]))
        return out.reshape(bgr.shape), True
