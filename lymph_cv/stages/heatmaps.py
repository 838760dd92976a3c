"""Per-image heatmaps that explain a decision: where each class won its windows, and how surely.

Each window's stride×stride cell takes the colour of the class that won it, its strength the
window's confidence above chance (0 at 1/classes, 1 at certainty).  The figure (matplotlib Agg)
has the image with the map blended over it, the map alone (nothing hides it), a colour scale per
class, and a title with the image name, true and predicted label and the vote fractions.  The
colours avoid H&E's pinks and purples (hematoxylin made the former blue nearly invisible).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

#: Class colours (RGB, 0–255) that stay visible on H&E: green, yellow, cyan, then orange, white,
#: black; cycled when there are more classes.
COLOURS = ((0, 200, 83), (255, 214, 0), (0, 229, 255), (255, 109, 0), (255, 255, 255), (0, 0, 0))
#: Opacity of a cell at full confidence in the blended view (the image stays readable below).
MAX_ALPHA = 0.6
#: Inches per 100 image pixels, and the least figure height (title and scales need room).
INCHES_PER_100PX = 1.6
MIN_HEIGHT = 3.2
#: Width (inches) of the column of colour scales.
SCALE_WIDTH = 1.5
DPI = 100


@dataclass
class ClassMap:
    """Per pixel: the winning class (−1 outside every window's cell) and its confidence (0–1)."""

    winner: np.ndarray  # (H, W) int
    confidence: np.ndarray  # (H, W) float32


def class_map(shape: Tuple[int, int], centres: np.ndarray, probs: np.ndarray, stride: int) -> ClassMap:
    """The map of an image of ``shape`` (H, W) from its windows' centres (row, col) and
    probabilities: each window colours the stride×stride cell around its centre."""
    height, width = shape
    n_classes = probs.shape[1]
    chance = 1.0 / n_classes
    winners = probs.argmax(axis=1)
    confidence = np.clip((probs.max(axis=1) - chance) / (1.0 - chance), 0.0, 1.0)
    winner = np.full((height, width), -1, dtype=np.int64)
    strength = np.zeros((height, width), dtype=np.float32)
    half = stride // 2
    for (row, col), cls, conf in zip(np.asarray(centres, dtype=np.int64), winners, confidence):
        y0, x0 = max(0, row - half), max(0, col - half)
        y1, x1 = min(height, row - half + stride), min(width, col - half + stride)
        winner[y0:y1, x0:x1] = cls
        strength[y0:y1, x0:x1] = conf
    return ClassMap(winner, strength)


def colour(index: int) -> np.ndarray:
    """RGB (0–1) of class ``index``."""
    return np.array(COLOURS[index % len(COLOURS)], dtype=np.float32) / 255.0


def blend(image_rgb: np.ndarray, cmap: ClassMap, alpha: float = MAX_ALPHA) -> np.ndarray:
    """The image (uint8 RGB) with each cell tinted by its class, opacity ``alpha`` × confidence."""
    n = int(cmap.winner.max(initial=-1)) + 1
    tint = np.zeros(image_rgb.shape, dtype=np.float32)
    for k in range(n):
        tint[cmap.winner == k] = colour(k) * 255.0
    weight = (alpha * cmap.confidence * (cmap.winner >= 0))[..., None]
    return np.clip(image_rgb.astype(np.float32) * (1 - weight) + tint * weight + 0.5, 0, 255).astype(np.uint8)


def map_only(cmap: ClassMap) -> np.ndarray:
    """The map alone on white: class colour at full confidence, fading to white at chance."""
    n = int(cmap.winner.max(initial=-1)) + 1
    out = np.ones(cmap.winner.shape + (3,), dtype=np.float32)
    for k in range(n):
        mask = cmap.winner == k
        out[mask] = 1.0 - cmap.confidence[mask, None] * (1.0 - colour(k))
    return out


def title_lines(entry: str, classes: Sequence[str], label: Optional[int], predicted: int, votes: Sequence[int]) -> str:
    """``entry``, true and predicted label, and the vote fractions, on two lines."""
    total = max(int(sum(votes)), 1)
    truth = classes[label] if label is not None and label >= 0 else "?"
    verdict = "right" if label == predicted else "wrong"
    fractions = ", ".join(f"{c} {int(v) / total:.0%}" for c, v in zip(classes, votes))
    return f"{entry}\ntrue {truth}, predicted {classes[predicted]} ({verdict}); votes {fractions} of {total} windows"


def heatmap_png(image_bgr: np.ndarray, centres: np.ndarray, probs: np.ndarray, stride: int, classes: Sequence[str], *,
                entry: str, label: Optional[int], predicted: int, votes: Sequence[int]) -> bytes:
    """The explaining figure as PNG bytes (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    rgb = np.ascontiguousarray(image_bgr[..., ::-1])
    height, width = rgb.shape[:2]
    cmap = class_map((height, width), centres, probs, stride)
    panel_w = max(width / 100 * INCHES_PER_100PX, 2.0)
    panel_h = max(height / 100 * INCHES_PER_100PX, MIN_HEIGHT - 1.0)
    figure = Figure(figsize=(2 * panel_w + SCALE_WIDTH, panel_h + 1.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, 3, width_ratios=[panel_w, panel_w, SCALE_WIDTH])
    left, right = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
    left.imshow(blend(rgb, cmap), interpolation="nearest")
    left.set_title("image, cells tinted by their class", fontsize="small")
    right.imshow(map_only(cmap), interpolation="nearest")
    right.set_title("class map alone", fontsize="small")
    for axis in (left, right):
        axis.set_xticks([])
        axis.set_yticks([])
    # One horizontal colour scale per class, stacked: white at chance, the class colour when sure.
    scales = grid[0, 2].subgridspec(len(classes) + 2, 1)
    for k, name in enumerate(classes):
        axis = figure.add_subplot(scales[k + 1, 0])
        ramp = LinearSegmentedColormap.from_list(name, [(1, 1, 1), tuple(colour(k))])
        axis.imshow(np.linspace(0, 1, 64)[None, :], aspect="auto", cmap=ramp, vmin=0, vmax=1)
        axis.set_yticks([])
        axis.set_ylabel(name, rotation=0, ha="right", va="center", fontsize="small")
        last = k == len(classes) - 1
        axis.set_xticks([0, 63] if last else [])
        if last:
            axis.set_xticklabels(["chance", "sure"], fontsize="x-small")
    figure.suptitle(title_lines(entry, classes, label, predicted, votes), fontsize="medium")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
