"""eval/report.html: self-contained, and rendered by headless Chromium without console errors."""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import cv2
import numpy as np

from browser import render
from logutil import CAFFE_LOG
from lymph_cv.stages.evaluate import FoldResult, ImageResult, window_grid
from lymph_cv.stages.html_report import FULL_CELL, RECALL_NOTE, matrix_table
from lymph_cv.stages.report import build_report, write_fold, write_report

CLASSES = ["CLL", "FL", "MCL"]
SIZE = (100, 132)  # a 3 x 4 window grid


def _image(folder: Path, rng, entry: str, label: int, winner: int) -> ImageResult:
    path = folder / entry
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(120, 230, (*SIZE, 3), dtype=np.uint8))
    grid = window_grid(*SIZE)
    probs = rng.dirichlet(np.ones(3), len(grid)).astype(np.float32)
    probs[:, winner] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    votes = np.bincount(probs.argmax(1), minlength=3)
    return ImageResult(entry, path, label, int(np.argmax(votes)), votes, votes / len(grid), grid, probs)


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    rng = np.random.default_rng(0)
    for fold, pairs in ((1, [(0, 0), (1, 1), (2, 2), (2, 1)]), (2, [(0, 0), (1, 0), (2, 2)])):
        images = [_image(tmp_path / "data", rng, f"{CLASSES[t]}/sj-0{fold}-{i}_001.tif", t, p) for i, (t, p) in enumerate(pairs)]
        result = FoldResult(fold, list(CLASSES), images, {"aggregate": "vote", "crops": 10, "mean_mode": "resize",
                                                          "window": 36, "stride": 32, "model": f"{fold}_x_iter_9.caffemodel"})
        write_fold(result, work / "eval" / f"fold_{fold}", heatmaps=True)
        (work / str(fold)).mkdir()
        (work / str(fold) / "train.log").write_text(CAFFE_LOG)
        (work / str(fold) / "train.json").write_text(json.dumps({"seed": 7}))
    # What `lymph-cv heldout` leaves (PCam's held-out test split scored by fold 1's model).
    (work / "eval" / "heldout_1").mkdir()
    (work / "eval" / "heldout_1" / "metrics.json").write_text(json.dumps(
        {"model": "1_x_iter_9.caffemodel", "records": 40, "accuracy": 0.9, "auc": 0.95, "threshold": 0.4, "tta": False,
         "views": 1, "confusion": [[18, 2], [2, 18]], "classes": ["normal", "tumour"]}))
    return work


def test_matrix_table_shows_counts_and_row_percentages():
    table = matrix_table([[3, 1], [0, 4]], ["a", "b"], "m")
    assert '<table class="matrix" id="m">' in table and "3<small>75%</small>" in table and "4<small>100%</small>" in table
    assert f"background:rgb{FULL_CELL}" in table  # a 100 % cell has the full colour


def test_report_html_in_headless_chromium(tmp_path):
    work = _workdir(tmp_path)
    paths = write_report(build_report(work))
    page_path = work / "eval" / "report.html"
    assert page_path in paths
    text = page_path.read_text(encoding="utf-8")
    # Self-contained: every image is embedded, nothing is fetched.
    sources = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(sources) == 1 + 2  # the learning curves and the two misclassified images' heatmaps
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert cv2.imdecode(np.frombuffer(base64.b64decode(source.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR) is not None
    assert not re.search(r'(?:href|src)="(?:https?:|file:|/)', text)
    assert html.escape(RECALL_NOTE) in text and "fold 1: <code>MCL/sj-01-3_001.tif</code>" in text
    assert "<code>1/train.json: seed</code></td><td class=\"l\">7" in text

    page = render(page_path.as_uri(), tmp_path / "report.png")
    assert page.console == [], page.console
    pooled = re.search(r'<table class="matrix" id="pooled-matrix">(.*?)</table>', page.dom, re.S)
    assert pooled is not None
    cells = re.findall(r"<td[^>]*>(\d+)<small>", pooled.group(1))
    assert [int(c) for c in cells] == [2, 0, 0, 1, 1, 0, 0, 1, 2]
    assert 'id="curves"' in page.dom and "Leak check" in page.dom
    assert "Held-out split" in page.dom and 'id="matrix-heldout-1"' in page.dom
    # The first screen shows the pooled matrix: its full-colour cells (CLL→CLL, 100 %) are painted.
    shot = cv2.imread(str(page.screenshot))
    assert shot is not None and shot.shape[:2] == (1000, 1280)
    full_bgr = np.array(FULL_CELL[::-1])
    assert (np.abs(shot.astype(int) - full_bgr).sum(axis=2) < 12).sum() > 2000

    # The console check is not vacuous: an image that does not decode is reported there.
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace(sources[0], "data:image/png;base64,AAAA", 1), encoding="utf-8")
    assert any("image did not load" in line for line in render(broken.as_uri(), tmp_path / "broken.png").console)
