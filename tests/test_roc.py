"""ROC analysis against hand-computed values, test-time augmentation crops, and the report's ROC parts."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lymph_cv.errors import EvaluationError
from lymph_cv.stages.evaluate import Crop, FoldResult, ImageResult, crop_boxes, make_crops
from lymph_cv.stages.report import ROC_PNG, build_report, format_markdown, write_fold, write_report
from lymph_cv.stages.roc import average_ranks, binary_record, one_vs_rest, roc_auc, roc_curve, roc_record


def test_auc_by_hand_with_and_without_ties():
    # 4 pairs, 3 ordered: 0.75 (the textbook example)
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    # positives {0.5, 0.9}, negatives {0.5, 0.2}: the tied pair counts half → 3.5 / 4
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [True, False, False, True]) == pytest.approx(0.875)
    assert roc_auc([0.3, 0.3, 0.3], [True, False, True]) == pytest.approx(0.5)  # all tied: chance
    assert roc_auc([1, 2, 3], [True, True, False]) == pytest.approx(0.0)
    assert roc_auc([1, 2], [True, True]) is None  # no negatives: undefined
    assert average_ranks(np.array([5.0, 1.0, 5.0, 3.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    with pytest.raises(EvaluationError):
        roc_auc([1, 2, 3], [True, False])


def test_curve_area_and_operating_threshold_by_hand():
    scores, positive = [0.5, 0.5, 0.2, 0.9], [True, False, False, True]
    curve = roc_curve(scores, positive)
    assert curve.fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert curve.tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert curve.thresholds.tolist() == [np.inf, 0.9, 0.5, 0.2]
    assert curve.area == pytest.approx(roc_auc(scores, positive))
    record = binary_record(scores, positive, "FL")
    # Youden J = tpr − fpr: 0, 0.5, 0.5, 0 → the first maximum, the higher threshold
    assert (record["threshold"], record["sensitivity"], record["specificity"]) == (0.9, 0.5, 1.0)
    assert record["curve"]["thresholds"][0] is None  # +∞ is not JSON
    # A score that ranks positives below negatives: the best J is at +∞ (nothing called positive), which
    # is no threshold; the operating point is the best finite one and the record strict JSON.
    worse = binary_record([0.9, 0.8, 0.2, 0.1], [False, False, True, True], "FL")
    assert worse["auc"] == 0.0 and np.isfinite(worse["threshold"]) and worse["threshold"] == 0.1
    json.dumps(worse, allow_nan=False)
    rng = np.random.default_rng(0)
    many = rng.integers(0, 5, size=200) / 4.0  # heavy ties
    flags = rng.random(200) < 0.4
    assert roc_curve(many, flags).area == pytest.approx(roc_auc(many, flags))


def test_one_vs_rest_by_hand():
    scores = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])
    labels = [0, 1, 1, 2]
    per_class = one_vs_rest(scores, labels, ["a", "b", "c"])
    # a: positive {0.7}, negatives {0.6, 0.2, 0.1} → 1; b: positives {0.3, 0.5} vs {0.2, 0.3}: 3.5/4
    assert per_class == {"a": pytest.approx(1.0), "b": pytest.approx(0.875), "c": pytest.approx(1.0)}
    record = roc_record(scores, labels, ["a", "b", "c"])
    assert record["kind"] == "one_vs_rest" and record["macro_auc"] == pytest.approx((1 + 0.875 + 1) / 3)
    two = roc_record(np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]]), [0, 1, 0], ["neg", "pos"])
    assert two["kind"] == "binary" and two["positive"] == "pos" and two["auc"] == pytest.approx(0.5)


def test_tta_crops_are_the_turned_views():
    assert len(crop_boxes(36, 36, 32)) == 10
    boxes = crop_boxes(36, 36, 32, tta=True)
    assert len(boxes) == 40 and boxes[:10] == crop_boxes(36, 36, 32)  # pycaffe's 10 first, unchanged
    assert [b.turns for b in boxes[10::10]] == [1, 2, 3]
    centre = crop_boxes(36, 36, 32, oversample=False, tta=True)
    assert len(centre) == 8 and len({(b.mirrored, b.turns) for b in centre}) == 8  # the square's symmetries
    window = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)
    out = make_crops(window, [Crop(0, 1, False, 1), Crop(1, 0, True, 2)], 3)
    np.testing.assert_array_equal(out[0], np.rot90(window[0, :, 0:3, 1:4], 1, axes=(1, 2)))
    np.testing.assert_array_equal(out[1], np.rot90(window[0, :, 1:4, 0:3][..., ::-1], 2, axes=(1, 2)))


def _binary_fold(fold, labels, positive_scores):
    images = []
    for i, (label, score) in enumerate(zip(labels, positive_scores)):
        scores = np.array([1 - score, score])
        probs = np.tile(scores.astype(np.float32), (4, 1))
        images.append(ImageResult(f"img{fold}_{i}.tif", Path(f"/nonexistent/img{fold}_{i}.tif"), label,
                                  int(score >= 0.5), np.array([4 * (score < 0.5), 4 * (score >= 0.5)]), scores,
                                  np.zeros((4, 2), np.int64), probs))
    return FoldResult(fold, ["benign", "tumour"], images, {"aggregate": "mean", "crops": 40, "tta": True})


def test_two_class_report_has_auc_roc_pngs_and_threshold(tmp_path):
    work = tmp_path / "work"
    record = write_fold(_binary_fold(1, [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), work / "eval" / "fold_1")
    write_fold(_binary_fold(2, [1, 0, 0, 1], [0.5, 0.5, 0.2, 0.9]), work / "eval" / "fold_2")
    saved = json.loads((work / "eval" / "fold_1" / "metrics.json").read_text())
    assert saved["roc"]["auc"] == pytest.approx(0.75) and saved["roc"] == json.loads(json.dumps(record["roc"]))
    png = cv2.imread(str(work / "eval" / "fold_1" / ROC_PNG))
    assert png is not None and png.shape[0] > 300
    assert "ROC AUC (tumour positive) 0.750" in (work / "eval" / "fold_1" / "summary.txt").read_text()
    report = build_report(work)
    paths = write_report(report)
    assert work / "eval" / ROC_PNG in paths and cv2.imread(str(work / "eval" / ROC_PNG)) is not None
    pooled = json.loads((work / "eval" / "report.json").read_text())
    expected = roc_auc([0.1, 0.4, 0.35, 0.8, 0.5, 0.5, 0.2, 0.9], [0, 0, 1, 1, 1, 0, 0, 1] == np.array(1))
    assert pooled["roc"]["auc"] == pytest.approx(expected)
    assert pooled["fold_auc"]["values"] == pytest.approx([0.75, 0.875])
    markdown = format_markdown(report)
    assert "## ROC" in markdown and f"![pooled ROC curve]({ROC_PNG})" in markdown
    assert "Per fold AUC 0.812 ± 0.088" in markdown
    page = (work / "eval" / "report.html").read_text()
    assert '<p id="roc">AUC (tumour positive) <b>' in page and 'alt="pooled ROC curve"' in page
