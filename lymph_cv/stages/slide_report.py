"""The slide-level parts of the report: pooled tile-level metrics, the slides table and its text.

A fold evaluated slide by slide (:mod:`lymph_cv.stages.slide_eval`) has ``unit: "slide"``, a
``tiles`` record (tile-level matrix and metrics) and a ``slides`` list in its ``metrics.json``;
the report's pooled matrix is then the slide-level one and these sections come beside it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

from lymph_cv.stages.metrics import summary_metrics
from lymph_cv.stages.report_folds import is_slide_report  # there: numpy-free, for the headline
from lymph_cv.workdir.layout import EVAL_FOLD_DIR, HEATMAP_DIR

#: Decimal places of fractions and metrics.
DIGITS = 3


def pooled_tiles(folds: Sequence[dict], classes: Sequence[str]) -> Optional[dict]:
    """Tile-level matrix and metrics pooled over the folds (None unless every fold has them)."""
    if not is_slide_report(folds) or not all(isinstance(f.get("tiles"), dict) for f in folds):
        return None
    matrix = sum(np.array(f["tiles"]["confusion"], dtype=np.int64) for f in folds)
    return {"tiles": int(matrix.sum()), "confusion": matrix.tolist(), **summary_metrics(matrix, classes),
            "fold_accuracy": [f["tiles"]["accuracy"] for f in folds]}


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{DIGITS}f}"


def intro(settings: dict) -> str:
    """How a slide was labelled, in one sentence."""
    threshold = settings.get("threshold")
    rule = ("the class with the largest fraction of tiles" if threshold is None
            else f"the second class when its tile fraction is at least {threshold:g}")
    return (f"Slide label = {rule} (each tile scored at {settings.get('window', '?')} pixels, "
            f"{settings.get('crops', '?')} crop(s) per tile, mean mode {settings.get('mean_mode', '?')}).")


def heatmap_path(fold: int, name: Optional[str]) -> Optional[str]:
    """A heatmap's path relative to ``eval/`` (None when not drawn)."""
    return None if not name else f"{EVAL_FOLD_DIR.format(fold=fold)}/{HEATMAP_DIR}/{name}"


def markdown_section(folds: Sequence[dict], classes: Sequence[str]) -> List[str]:
    """The report.md section: tile-level metrics, then every slide with its fractions and maps."""
    tiles = pooled_tiles(folds, classes)
    lines = ["", "## Slides", ""]
    if tiles is not None:
        lines += [f"Tile level (each tile labelled with its slide's class): {tiles['tiles']} tiles, accuracy "
                  f"{_num(tiles['accuracy'])}, balanced accuracy {_num(tiles['balanced_accuracy'])}.", ""]
    header = ["fold", "slide", "true", "predicted", "tiles", *[f"fraction {c}" for c in classes],
              *[f"mean P({c})" for c in classes], "maps"]
    lines += ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    for fold in folds:
        for row in fold.get("slides", []):
            maps = [f"[{what}]({path})" for what, path in (("tiles", heatmap_path(fold["fold"], row.get("heatmap"))),
                                                            ("CAM", heatmap_path(fold["fold"], row.get("cam")))) if path]
            cells = [fold["fold"], f"`{row['slide']}`", row["true"], row["predicted"], row["tiles"],
                     *[_num(row["fractions"][c]) for c in classes], *[_num(row["mean_probs"][c]) for c in classes],
                     " ".join(maps) or "-"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines
