"""Metrics, matrix orientation and formatting, fold outputs and the pooled report (no net needed)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lymph_cv.errors import EvaluationError
from lymph_cv.stages.evaluate import FoldResult, ImageResult, window_grid
from lymph_cv.stages.figures import FULL_CELL, confusion_png, row_fractions
from lymph_cv.stages.heatmaps import blend, class_map, colour, heatmap_png, map_only, title_lines
from lymph_cv.stages.report_folds import headline
from lymph_cv.stages.report import (IMAGES_CSV, METRICS_JSON, SUMMARY_TXT, accuracy, balanced_accuracy, build_report,
                             class_metrics, confusion_matrix, format_confusion,
                             format_markdown, format_report, mean_sd, write_fold)

CLASSES = ["CLL", "FL", "MCL"]
# rows = true: 5 CLL all right; FL 4 right, 1 called CLL; MCL 4 right, 1 called FL.
HAND = np.array([[5, 0, 0], [1, 4, 0], [0, 1, 4]])


def test_confusion_matrix_rows_are_true_columns_predicted():
    matrix = confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert matrix[0, 1] == 1  # a true CLL predicted FL


def test_metrics_on_a_hand_made_matrix():
    assert accuracy(HAND) == pytest.approx(13 / 15)
    assert balanced_accuracy(HAND) == pytest.approx((1 + 0.8 + 0.8) / 3)
    per_class = class_metrics(HAND, CLASSES)
    assert per_class["CLL"]["precision"] == pytest.approx(5 / 6)
    assert per_class["CLL"]["recall"] == pytest.approx(1.0)
    assert per_class["CLL"]["f1"] == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))
    assert per_class["FL"]["precision"] == pytest.approx(0.8) and per_class["FL"]["recall"] == pytest.approx(0.8)
    assert per_class["MCL"]["precision"] == pytest.approx(1.0) and per_class["MCL"]["support"] == 5
    # A class never predicted has no precision; one without true images no recall.
    lopsided = class_metrics(np.array([[2, 0], [1, 0]]), ["a", "b"])
    assert lopsided["b"]["precision"] is None and lopsided["b"]["f1"] is None and lopsided["b"]["recall"] == 0.0
    assert balanced_accuracy(np.array([[3, 1], [0, 0]])) == pytest.approx(0.75)  # mean over classes present
    assert mean_sd([0.8, 0.9, 1.0]) == (pytest.approx(0.9), pytest.approx(0.1))
    assert mean_sd([0.7]) == (0.7, None)


def test_format_confusion_orientations():
    lines = format_confusion(HAND, CLASSES).splitlines()
    assert "predicted" in lines[0] and lines[1].startswith("true")
    assert lines[3].split() == ["FL", "1", "4", "0"]  # row = the true FL images
    legacy = format_confusion(HAND, CLASSES, legacy=True).splitlines()
    assert "actual" in legacy[0] and legacy[1].startswith("predicted")
    assert legacy[2].split() == ["CLL", "5", "1", "0"]  # row = predicted CLL: 5 true CLL, 1 true FL


def _image(rng, entry, label, predicted_bias, size=(118, 150)):
    grid = window_grid(*size)
    probs = rng.dirichlet(np.ones(3), len(grid)).astype(np.float32)
    probs[:, predicted_bias] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    votes = np.bincount(probs.argmax(1), minlength=3)
    return ImageResult(entry, Path("/nonexistent") / entry, label, int(np.argmax(votes)), votes, votes / len(grid), grid, probs)


def _fold(fold, pairs, seed=0):
    rng = np.random.default_rng(seed)
    images = [_image(rng, f"{CLASSES[t]}/img{fold}_{i}.tif", t, p) for i, (t, p) in enumerate(pairs)]
    return FoldResult(fold, list(CLASSES), images, {"aggregate": "vote", "crops": 10, "mean_mode": "resize",
                                                    "window": 36, "stride": 32, "model": f"{fold}_x_iter_9.caffemodel"})


def test_write_fold_outputs(tmp_path):
    result = _fold(1, [(0, 0), (1, 1), (1, 0), (2, 2)])
    out = tmp_path / "eval" / "fold_1"
    record = write_fold(result, out, legacy_layout=True)
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", IMAGES_CSV, METRICS_JSON, SUMMARY_TXT]
    saved = json.loads((out / METRICS_JSON).read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]] and saved["accuracy"] == 0.75
    assert saved["misclassified"][0]["image"] == "FL/img1_2.tif" and saved["misclassified"][0]["predicted"] == "CLL"
    assert sum(saved["misclassified"][0]["votes"].values()) == 12
    summary = (out / SUMMARY_TXT).read_text()
    assert "actual" in summary and "FL/img1_2.tif  true FL  predicted CLL" in summary
    rows = (out / IMAGES_CSV).read_text().splitlines()
    assert rows[0].startswith("image,true,predicted,correct,windows,votes_CLL,votes_FL,votes_MCL,fraction_CLL")
    assert rows[3].split(",")[:5] == ["FL/img1_2.tif", "FL", "CLL", "0", "12"]
    png = cv2.imread(str(out / "confusion.png"))
    assert png is not None and png.shape[0] > 300
    # A rerun replaces the folder as a whole; no temporary folder is left beside it.
    write_fold(_fold(1, [(0, 1)]), out)
    assert json.loads((out / METRICS_JSON).read_text())["images"] == 1
    assert [p.name for p in out.parent.iterdir()] == ["fold_1"]
    # A folder holding anything else is never replaced.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(EvaluationError, match="not an evaluation folder"):
        write_fold(result, tmp_path / "precious")
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "x"


def test_report_pools_folds(tmp_path, runner, cli):
    work = tmp_path / "work"
    write_fold(_fold(1, [(0, 0), (1, 1), (2, 2), (2, 1)]), work / "eval" / "fold_1")
    write_fold(_fold(2, [(0, 0), (1, 0), (2, 2)], seed=1), work / "eval" / "fold_2")
    report = build_report(work)
    assert [f["fold"] for f in report.folds] == [1, 2]
    assert report.confusion.tolist() == [[2, 0, 0], [1, 1, 0], [0, 1, 2]]
    mean, sd = report.spread("accuracy")
    assert mean == pytest.approx((0.75 + 2 / 3) / 2) and sd == pytest.approx(np.std([0.75, 2 / 3], ddof=1))
    markdown = format_markdown(report)
    assert "| **FL** | 1 | 1 | 0 | 0.500 |" in markdown and "## Per fold" in markdown
    assert f"{mean:.3f} ± {sd:.3f}" in markdown and "(confusion.png)" in markdown

    result = runner.invoke(cli, ["report", str(work)])
    assert result.exit_code == 0, result.stderr
    assert "pooled accuracy 0.714" in result.stdout  # 5 of 7 images
    # the headline (printed before numpy loads) is the text's first line, printed once
    assert headline(work) == result.stdout.splitlines()[0]
    assert result.stdout == (work / "eval" / "report.txt").read_text()
    for name in ("report.md", "report.json", "report.txt", "confusion.png"):
        assert (work / "eval" / name).is_file()
    assert json.loads((work / "eval" / "report.json").read_text())["fold_accuracy"]["values"] == [0.75, pytest.approx(2 / 3)]
    legacy = runner.invoke(cli, ["report", str(work), "--legacy-layout"])
    assert "actual" in legacy.stdout


def test_report_errors(tmp_path, runner, cli):
    (tmp_path / "eval").mkdir()
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no evaluated fold found" in result.stderr and result.stdout == ""
    write_fold(_fold(1, [(0, 0)]), tmp_path / "eval" / "fold_1")
    other = _fold(2, [(0, 0)])
    other.classes = ["A", "B", "C"]
    write_fold(other, tmp_path / "eval" / "fold_2")
    with pytest.raises(EvaluationError, match="fold 2 has classes"):
        build_report(tmp_path)
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "fold 2 has classes" in result.stderr and result.stdout == ""
    (tmp_path / "eval" / "fold_2" / METRICS_JSON).write_text("{not json")
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "cannot read the fold's metrics" in result.stderr and result.stdout == ""
    # a bad images.csv (read after every record): still one error line and nothing printed before it
    write_fold(_fold(2, [(0, 0)]), tmp_path / "eval" / "fold_2")
    (tmp_path / "eval" / "fold_2" / IMAGES_CSV).write_text("image,true\nx.tif,CLL\n")
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and result.stdout == ""
    assert "fold_2/images.csv: expected the images.csv" in result.stderr


def _metrics(folder: Path, fold: int, confusion) -> None:
    folder.mkdir(parents=True)
    record = {"fold": fold, "classes": ["A", "B"], "confusion": confusion, "accuracy": 0.5, "balanced_accuracy": 0.5,
              "images": int(sum(map(sum, confusion))), "misclassified": [], "settings": {}}
    (folder / METRICS_JSON).write_text(json.dumps(record))


@pytest.mark.parametrize("confusion, early", [([[1, 7], [0, 1]], False),  # recalls 1/8 and 1: mean 0.5625, a midpoint
                                              ([[1.0, 1], [0, 2]], False),  # a float count: numpy's check decides
                                              ([[3, 1], [1, 2]], True)])
def test_report_headline_without_numpy_or_left_to_it(tmp_path, runner, cli, confusion, early):
    _metrics(tmp_path / "eval" / "fold_3", 3, confusion)
    assert (headline(tmp_path) is not None) == early
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (tmp_path / "eval" / "report.txt").read_text()
    if early:
        assert result.stdout.splitlines()[0] == headline(tmp_path)
        record = json.loads((tmp_path / "eval" / "fold_3" / METRICS_JSON).read_text())
        (tmp_path / "eval" / "fold_3" / METRICS_JSON).write_text(json.dumps({**record, "unit": "slide"}))
        assert headline(tmp_path).startswith("7 slides over folds 3: ")
        assert headline(tmp_path) == format_report(build_report(tmp_path)).splitlines()[0]


def test_drawings():
    picture = cv2.imdecode(np.frombuffer(confusion_png(HAND, CLASSES, "title"), np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None and picture.shape[0] > 300
    # The CLL→CLL cell (100 % of its row) has the full colour; the 0 % cells stay white.
    full_bgr = np.array([round(255 * c) for c in reversed(FULL_CELL)])
    assert (np.abs(picture.astype(int) - full_bgr).sum(axis=2) < 6).sum() > 2000
    assert row_fractions(HAND)[1].tolist() == [0.2, 0.8, 0.0] and row_fractions(np.zeros((2, 2))).sum() == 0
    image = np.full((118, 150, 3), 200, np.uint8)
    grid = window_grid(118, 150)
    probs = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (len(grid), 1))
    probs[0] = [1 / 3, 1 / 3, 1 / 3]  # at chance: left untinted
    cmap = class_map(image.shape[:2], grid, probs, 32)
    heat = blend(image, cmap)
    assert heat.shape == image.shape
    assert heat[19, 19].tolist() == [200, 200, 200]
    assert heat[51, 51].tolist() != [200, 200, 200]
    assert heat[0, 0].tolist() == [200, 200, 200]  # outside every window's cell
    assert cmap.winner[0, 0] == -1 and cmap.winner[51, 51] == 0 and cmap.confidence[51, 51] == pytest.approx(1.0)
    alone = map_only(cmap)
    assert alone[19, 19].tolist() == [1, 1, 1] and np.allclose(alone[51, 51], colour(0), atol=1e-6)
    # The explaining figure: title, both panels and a scale per class fit (decodes, wider than two images).
    png = heatmap_png(image, grid, probs, 32, CLASSES, entry="FL/x.tif", label=1, predicted=0, votes=[11, 0, 1])
    figure = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert figure is not None and figure.shape[1] > 2 * 150
    assert title_lines("FL/x.tif", CLASSES, 1, 0, [11, 0, 1]) == (
        "FL/x.tif\ntrue FL, predicted CLL (wrong); votes CLL 92%, FL 0%, MCL 8% of 12 windows")


@pytest.mark.parametrize("text", ["[]", "{}", '{"fold": 1, "classes": ["A", "B"], "confusion": [[1]], "accuracy": 1, '
                                  '"balanced_accuracy": 1}'])
def test_report_of_wrong_kind_of_metrics_is_one_line(tmp_path, runner, cli, text):
    """JSON that is not a fold's metrics used to end in a KeyError/TypeError traceback."""
    write_fold(_fold(1, [(0, 0)]), tmp_path / "eval" / "fold_1")
    (tmp_path / "eval" / "fold_2").mkdir()
    (tmp_path / "eval" / "fold_2" / METRICS_JSON).write_text(text)
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "fold_2/metrics.json: expected a fold's metrics" in result.stderr


def _hand_made(tmp_path: Path, **fields) -> Path:
    """eval/fold_1/metrics.json with only the fields the refusal names, plus ``fields``."""
    folder = tmp_path / "eval" / "fold_1"
    folder.mkdir(parents=True)
    record = {"fold": 1, "classes": ["A", "B"], "confusion": [[3, 1], [0, 2]], "accuracy": 5 / 6,
              "balanced_accuracy": 0.875, **fields}
    (folder / METRICS_JSON).write_text(json.dumps(record))
    return folder / METRICS_JSON


def test_report_of_a_hand_made_record_without_images_or_misclassified(tmp_path, runner, cli):
    """It ended in a KeyError traceback: `images` is the matrix's total, `misclassified` not recorded."""
    _hand_made(tmp_path)
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines()[0] == "6 images over folds 1: pooled accuracy 0.833, balanced accuracy 0.875"
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "| 1 | 6 | 0.833 | 0.875 | n/a |" in markdown
    assert "Not recorded for fold 1" in markdown and "None." not in markdown.split("## Misclassified")[1]
    assert "Not recorded for fold 1" in (tmp_path / "eval" / "report.html").read_text()


@pytest.mark.parametrize("field, value, expected", [
    ("misclassified", [{"image": "x.tif", "true": "A"}], "misclassified: expected a list of {image, true, predicted"),
    ("misclassified", {"x.tif": "A"}, "misclassified: expected a list"),
    ("roc", [0.5], "roc: expected a ROC record"),
    ("roc", {"kind": "binary", "auc": "high"}, "roc: expected a ROC record"),
    ("settings", 5, "settings: expected an object"),
    ("images", "six", "images: expected a count"),
    ("unit", 1, "unit: expected a word"),
    ("tiles", {"confusion": [[1]]}, "tiles: expected tile-level metrics"),
    ("slides", [{"slide": "s.svs"}], "slides: expected a list of {slide, true, predicted"),
])
def test_report_of_a_malformed_field_is_one_line(tmp_path, runner, cli, field, value, expected):
    """Each of these ended in a KeyError, TypeError or AttributeError traceback (or a headline first)."""
    path = _hand_made(tmp_path, **{field: value})
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {path}: {expected}"), result.stderr
    assert not (tmp_path / "eval" / "report.md").exists()


def test_report_of_an_images_csv_that_is_not_text_is_one_line(tmp_path, runner, cli):
    """A UnicodeDecodeError traceback before."""
    path = _hand_made(tmp_path).parent / IMAGES_CSV
    path.write_bytes(b"image,true\n\xff\xfe\x00garbage\n")
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"error: {path}: cannot read the fold's images" in result.stderr
