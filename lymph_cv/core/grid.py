"""The tutorial's window grid and its defaults, once.

Two scripts of the tutorial walk the same grid with different edge rules, and both are kept:

* step 1 (patches, Matlab ``rr = 1:step:H-size``): 0-based window origins ``1, 1+step, …`` while
  ``origin ≤ H − size``;
* step 5 (evaluation, Python ``range(hwsize+1, H-hwsize, stride)``): window centres
  ``hwsize+1, hwsize+1+stride, …`` while ``centre < H − hwsize`` (``hwsize = size // 2``), the window
  of centre ``c`` covering ``[c − hwsize, c + hwsize)``; one origin fewer at an exact fit.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

#: The tutorial's window (the step-1 patch size) and grid step.
WINDOW_SIZE = 36
WINDOW_STEP = 32
#: Matlab's loops start at 1 (``rr = 1:step:H-size``): the first window starts at 0-based row 1.
FIRST_ORIGIN = 1


def window_origins(height: int, width: int, size: int = WINDOW_SIZE, step: int = WINDOW_STEP) -> np.ndarray:
    """0-based (row, col) of every step-1 window, row-major, per Matlab ``rr = 1:step:H-size``."""
    rows = np.arange(FIRST_ORIGIN, height - size + 1, step)
    cols = np.arange(FIRST_ORIGIN, width - size + 1, step)
    return _row_major(rows, cols)


def window_centres(height: int, width: int, size: int = WINDOW_SIZE, stride: int = WINDOW_STEP) -> Tuple[np.ndarray, np.ndarray]:
    """Row and column centres of the step-5 windows: ``hwsize+1, hwsize+1+stride, …`` while the
    centre stays below ``extent − hwsize``, so the grid starts at pixel 1 and a border may be left out."""
    half = size // 2
    rows = np.arange(half + 1, height - half, stride, dtype=np.int64)
    cols = np.arange(half + 1, width - half, stride, dtype=np.int64)
    return rows, cols


def window_grid(height: int, width: int, size: int = WINDOW_SIZE, stride: int = WINDOW_STEP) -> np.ndarray:
    """(N, 2) step-5 window centres (row, col) in the tutorial's visiting order (row-major)."""
    return _row_major(*window_centres(height, width, size, stride))


def _row_major(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
