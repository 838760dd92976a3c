"""Slide-level figures: tile probabilities over the thumbnail and stitched class activation maps.

Both figures show the slide's thumbnail with the map blended over it, the map alone, a colour scale
and a title with the slide, its true and predicted label and the tile fractions.  The probability
map colours each tissue tile by the probability of one class (the positive class for two classes,
else the slide's predicted class); the CAM is the class's centred activation map (its score minus
the mean of all classes' at every feature position, so it averages to the centred logit over a
tile), upsampled over each tile and stitched over the slide, on a diverging scale around 0.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

#: Opacity of the map over the thumbnail (the tissue stays readable below).
MAP_ALPHA = 0.55
#: Figure panels: inches per 100 thumbnail pixels (at least MIN_PANEL), and the resolution.
INCHES_PER_100PX = 1.0
MIN_PANEL = 3.0
MAX_PANEL = 5.0
DPI = 100
#: Figure room in inches: left margin, gap between panels, the colour scale's column (bar width
#: inside it), below the panels (legend) and above them (two title lines and the panel titles).
MARGIN, GAP, SCALE_ROOM, SCALE_BAR = 0.1, 0.15, 1.3, 0.25
BOTTOM_ROOM, TITLE_ROOM = 0.45, 0.85
#: zlib level of the PNGs (zlib's default: level 1 saves a fifth of the time, costs a fifth more bytes).
PNG_COMPRESSION = 6
#: Colour maps (matplotlib names): sequential for probabilities, diverging for CAMs.
PROBABILITY_CMAP = "viridis"
CAM_CMAP = "RdBu_r"


@dataclass(frozen=True)
class TileBoxes:
    """Tiles in thumbnail pixels: (N, 4) x0, y0, x1, y1 (integers, x1/y1 exclusive)."""

    boxes: np.ndarray

    @classmethod
    def from_level0(cls, xs: np.ndarray, ys: np.ndarray, size: float, downsample: Tuple[float, float],
                    shape: Tuple[int, int]) -> "TileBoxes":
        """Boxes of tiles with level-0 origins ``xs, ys`` and side ``size`` on a thumbnail of ``shape``
        (H, W) with ``downsample`` (x, y) level-0 pixels per thumbnail pixel."""
        height, width = shape
        x0 = np.floor(np.asarray(xs, dtype=np.float64) / downsample[0]).astype(np.int64)
        y0 = np.floor(np.asarray(ys, dtype=np.float64) / downsample[1]).astype(np.int64)
        x1 = np.ceil((np.asarray(xs, dtype=np.float64) + size) / downsample[0]).astype(np.int64)
        y1 = np.ceil((np.asarray(ys, dtype=np.float64) + size) / downsample[1]).astype(np.int64)
        x0, y0 = np.clip(x0, 0, width - 1), np.clip(y0, 0, height - 1)
        x1, y1 = np.clip(np.maximum(x1, x0 + 1), 1, width), np.clip(np.maximum(y1, y0 + 1), 1, height)
        return cls(np.stack([x0, y0, x1, y1], axis=1))


def paint_tiles(shape: Tuple[int, int], boxes: TileBoxes, values: np.ndarray) -> np.ndarray:
    """(H, W) float32 map: each tile's box holds its value (the mean where tiles overlap), NaN off
    the tiles."""
    return stitch_maps(shape, boxes, np.asarray(values, dtype=np.float32).reshape(-1, 1, 1))


def stitch_maps(shape: Tuple[int, int], boxes: TileBoxes, maps: np.ndarray) -> np.ndarray:
    """(H, W) float32: each tile's (h, w) map resized bilinearly onto its box (overlaps averaged),
    NaN off the tiles."""
    import cv2

    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    for (x0, y0, x1, y1), tile_map in zip(boxes.boxes, maps):
        resized = cv2.resize(np.asarray(tile_map, dtype=np.float32), (int(x1 - x0), int(y1 - y0)),
                             interpolation=cv2.INTER_LINEAR)
        total[y0:y1, x0:x1] += resized
        count[y0:y1, x0:x1] += 1
    out = np.full(shape, np.nan, dtype=np.float32)
    covered = count > 0
    out[covered] = total[covered] / count[covered]
    return out


def title_lines(name: str, classes: Sequence[str], label: Optional[int], predicted: int,
                fractions: Sequence[float], tiles: int, what: str) -> str:
    """Slide name, true and predicted label, tile fractions; and what the map shows."""
    truth = classes[label] if label is not None and label >= 0 else "?"
    verdict = "right" if label == predicted else "wrong"
    shares = ", ".join(f"{c} {f:.0%}" for c, f in zip(classes, fractions))
    return (f"{name}: true {truth}, predicted {classes[predicted]} ({verdict})\n"
            f"tiles predicted {shares} of {tiles}; {what}")


def _figure(thumb_rgb: np.ndarray, value_map: np.ndarray, cmap_name: str, vmin: float, vmax: float,
            scale_label: str, title: str) -> bytes:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    height, width = thumb_rgb.shape[:2]
    scale = min(MAX_PANEL, max(MIN_PANEL, max(width, height) / 100 * INCHES_PER_100PX)) / max(width, height)
    panel_w, panel_h = width * scale, height * scale
    # Fixed margins (inches) instead of a layout engine: the figure is drawn in half the time.
    fig_w = MARGIN + 2 * panel_w + GAP + SCALE_ROOM
    fig_h = BOTTOM_ROOM + panel_h + TITLE_ROOM
    figure = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    FigureCanvasAgg(figure)
    bottom = BOTTOM_ROOM / fig_h
    left = figure.add_axes((MARGIN / fig_w, bottom, panel_w / fig_w, panel_h / fig_h))
    right = figure.add_axes(((MARGIN + panel_w + GAP) / fig_w, bottom, panel_w / fig_w, panel_h / fig_h))
    scale_axis = figure.add_axes(((MARGIN + 2 * panel_w + 2 * GAP) / fig_w, bottom + 0.1 * panel_h / fig_h,
                                  SCALE_BAR / fig_w, 0.8 * panel_h / fig_h))
    norm = Normalize(vmin=vmin, vmax=vmax)
    mappable = ScalarMappable(norm=norm, cmap=colormaps[cmap_name])
    covered = np.isfinite(value_map)
    colours = mappable.to_rgba(np.where(covered, value_map, vmin))[..., :3] * 255.0
    weight = (MAP_ALPHA * covered)[..., None]
    blended = thumb_rgb.astype(np.float32) * (1 - weight) + colours * weight
    left.imshow(np.clip(blended + 0.5, 0, 255).astype(np.uint8), interpolation="nearest")
    left.set_title("slide, tissue tiles coloured", fontsize="small")
    alone = np.where(covered[..., None], colours, 255.0)
    right.imshow(np.clip(alone + 0.5, 0, 255).astype(np.uint8), interpolation="nearest")
    right.set_title("map alone", fontsize="small")
    for axis in (left, right):
        axis.set_xticks([])
        axis.set_yticks([])
    bar = figure.colorbar(mappable, cax=scale_axis)
    bar.set_label(scale_label, fontsize="small")
    figure.legend(handles=[Patch(facecolor="white", edgecolor="0.5", label="no tile (background, holes, little tissue)"),
                           Patch(facecolor=mappable.to_rgba(vmax), label=f"{scale_label}: high")],
                  loc="lower center", ncols=2, fontsize="small", frameon=False)
    figure.suptitle(title, fontsize="medium", y=1 - 0.08 / fig_h, va="top")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", pil_kwargs={"compress_level": PNG_COMPRESSION})
    return buffer.getvalue()


def probability_png(thumb_rgb: np.ndarray, boxes: TileBoxes, probs: np.ndarray, cls: int, classes: Sequence[str], *,
                    name: str, label: Optional[int], predicted: int, fractions: Sequence[float]) -> bytes:
    """The tile-probability heatmap of class ``cls`` (0 to 1 scale) as PNG bytes."""
    value_map = paint_tiles(thumb_rgb.shape[:2], boxes, np.asarray(probs)[:, cls])
    title = title_lines(name, classes, label, predicted, fractions, len(probs), f"colour: P({classes[cls]}) per tile")
    return _figure(thumb_rgb, value_map, PROBABILITY_CMAP, 0.0, 1.0, f"tile probability of {classes[cls]}", title)


def cam_png(thumb_rgb: np.ndarray, boxes: TileBoxes, cams: np.ndarray, cls: int, classes: Sequence[str], *,
            name: str, label: Optional[int], predicted: int, fractions: Sequence[float]) -> bytes:
    """The stitched class activation map of class ``cls`` (``cams``: (N, classes, h, w) per tile)
    on a scale symmetric around 0, as PNG bytes."""
    cams = np.asarray(cams, dtype=np.float32)
    centred = cams[:, cls] - cams.mean(axis=1)
    value_map = stitch_maps(thumb_rgb.shape[:2], boxes, centred)
    finite = value_map[np.isfinite(value_map)]
    limit = float(np.abs(finite).max()) if finite.size else 1.0
    limit = limit if limit > 0 else 1.0
    title = title_lines(name, classes, label, predicted, fractions, len(cams), f"class activation map of {classes[cls]}")
    return _figure(thumb_rgb, value_map, CAM_CMAP, -limit, limit,
                   f"CAM of {classes[cls]} (minus the class mean; > 0: evidence for it)", title)
