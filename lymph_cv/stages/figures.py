"""The confusion-matrix figure (matplotlib Agg): cells shaded by their share of the true class,
count and percentage in each, a colour scale that says what the shade means."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

#: Colour of a 100 % cell (dark blue, RGB 0–1), as the HTML report's tables use it.
FULL_CELL = (20 / 255, 60 / 255, 150 / 255)
#: Row fraction above which a cell's text turns white.
DARK_CELL = 0.5
#: Inches per class (cell), plus the room for labels, title and scale.
CELL_INCHES = 1.1
MARGIN_INCHES = (2.4, 1.6)
DPI = 100
#: The matplotlib modules the figures import (for :class:`lymph_cv.core.preload.Preload`).
MODULES = ("matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.colors")


def row_fractions(matrix: np.ndarray) -> np.ndarray:
    """Each cell's share of its row (the true class): recall on the diagonal; 0 for empty rows."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)


def confusion_png(matrix: np.ndarray, classes: Sequence[str], title: str = "") -> bytes:
    """PNG of the matrix: rows = true class, columns = predicted class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    n = len(classes)
    fractions = row_fractions(matrix)
    size = (n * CELL_INCHES + MARGIN_INCHES[0], n * CELL_INCHES + MARGIN_INCHES[1])
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    shades = LinearSegmentedColormap.from_list("share", [(1, 1, 1), FULL_CELL])
    image = axis.imshow(fractions, cmap=shades, vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ink = "white" if fractions[i, j] > DARK_CELL else "black"
            axis.text(j, i - 0.1, str(int(matrix[i, j])), ha="center", va="center", color=ink, fontsize="large",
                      fontweight="bold")
            axis.text(j, i + 0.22, f"{100 * fractions[i, j]:.0f}%", ha="center", va="center", color=ink, fontsize="small")
    axis.set_xticks(range(n), classes)
    axis.set_yticks(range(n), classes)
    axis.xaxis.tick_top()
    axis.xaxis.set_label_position("top")
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    axis.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    axis.grid(which="minor", color="black", linewidth=0.8)
    axis.tick_params(which="minor", length=0)
    scale = figure.colorbar(image, ax=axis, shrink=0.8)
    scale.set_label("share of the true class (diagonal: recall)")
    if title:
        axis.set_title(title, fontsize="medium", pad=12, y=-0.12 if n else 1.0)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
