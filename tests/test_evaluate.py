"""Step 5: windows, crops, votes, parent lists, the published model, end to end and bad input."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lymph_cv.errors import ConfigError, EvaluationError, InputError
from lymph_cv.evaluate import (Aggregate, Crop, aggregate_scores, crop_boxes, decide, extract_windows, load_image,
                               make_crops, parse_aggregate, prepare_mean, read_parent_list, resize_image, vote_counts,
                               window_centres, window_grid)

CLASSES = ["CLL", "FL", "MCL"]


# ----------------------------------------------------------------------------- geometry
def test_window_centres_of_a_full_size_image():
    rows, cols = window_centres(1040, 1388)
    # The tutorial's loop: centres 19, 51, … below 1040 − 18 and 1388 − 18.
    assert (rows[0], rows[-1], len(rows)) == (19, 1011, 32)
    assert (cols[0], cols[-1], len(cols)) == (19, 1363, 43)
    assert np.all(np.diff(rows) == 32) and np.all(np.diff(cols) == 32)
    assert len(window_grid(1040, 1388)) == 1376  # ×10 crops = the 13,760 forward passes per image


def test_window_centres_edge_cases():
    # A centre c is used while c < extent − 18: 37 pixels hold none, 38 hold one, 69 one, 70 two.
    assert [len(window_centres(h, 100)[0]) for h in (37, 38, 69, 70)] == [0, 1, 1, 2]
    grid = window_grid(70, 38)
    assert grid.tolist() == [[19, 19], [51, 19]]


def test_extract_windows_cuts_the_tutorial_patch():
    image = np.arange(3 * 80 * 90, dtype=np.float32).reshape(3, 80, 90)
    grid = window_grid(80, 90)
    windows = extract_windows(image, grid)
    assert windows.shape == (len(grid), 3, 36, 36)
    for (row, col), window in zip(grid, windows):
        np.testing.assert_array_equal(window, image[:, row - 18 : row + 18, col - 18 : col + 18])
    assert windows[0, 0, 0, 0] == image[0, 1, 1]  # the grid starts at pixel 1, as in the tutorial


def test_crop_boxes_follow_caffe_io_oversample():
    boxes = crop_boxes(36, 36, 32)
    plain = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
    assert [(b.top, b.left) for b in boxes] == plain + plain
    assert [b.mirrored for b in boxes] == [False] * 5 + [True] * 5
    assert crop_boxes(36, 36, 32, oversample=False) == [Crop(2, 2, False)]
    assert crop_boxes(35, 35, 32, oversample=False) == [Crop(1, 1, False)]  # int(35/2 − 16) truncates
    with pytest.raises(EvaluationError):
        crop_boxes(30, 30, 32)


def test_make_crops_order_and_mirroring():
    windows = np.random.default_rng(0).random((2, 3, 36, 36), dtype=np.float32)
    crops = make_crops(windows, crop_boxes(36, 36, 32), 32)
    assert crops.shape == (20, 3, 32, 32)
    for w in range(2):
        for k, box in enumerate(crop_boxes(36, 36, 32)):
            expected = windows[w, :, box.top : box.top + 32, box.left : box.left + 32]
            if box.mirrored:
                expected = expected[:, :, ::-1]
            np.testing.assert_array_equal(crops[w * 10 + k], expected)


# ----------------------------------------------------------------------------- pixels and means
def test_resize_image_matches_an_independent_bilinear():
    mean = np.random.default_rng(1).uniform(80, 160, (36, 36, 3))
    ours = resize_image(mean, 32, 32)
    theirs = cv2.resize(mean.astype(np.float64), (32, 32), interpolation=cv2.INTER_LINEAR)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(resize_image(np.full((36, 36, 3), 7.0), 32, 32), np.full((32, 32, 3), 7.0, np.float32))


def test_prepare_mean_modes_and_shape_check():
    mean = np.random.default_rng(2).uniform(0, 255, (3, 36, 36)).astype(np.float32)
    resized = prepare_mean(mean, 3, 36, 32, "resize")
    assert resized.shape == (3, 32, 32)
    np.testing.assert_allclose(resized, resize_image(mean.transpose(1, 2, 0), 32, 32).transpose(2, 0, 1))
    np.testing.assert_array_equal(prepare_mean(mean, 3, 36, 32, "crop"), mean)
    with pytest.raises(EvaluationError, match=r"expected \(3, 36, 36\)"):
        prepare_mean(mean[:, :32, :32], 3, 36, 32, "resize")
    with pytest.raises(ConfigError, match="valid: resize, crop"):
        prepare_mean(mean, 3, 36, 32, "centre")


def test_load_image_is_bgr_times_255(tmp_path):
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 128, 255  # R, G, B
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    image = load_image(path)
    assert image.shape == (3, 4, 5) and image.dtype == np.float32
    # caffe.io.load_image gives float32(u/255); ×255 in float32 after the swap to BGR.
    expected = [np.float32(np.float32(u / 255.0) * np.float32(255)) for u in (255, 128, 10)]
    assert [image[c, 0, 0] for c in range(3)] == expected


# ----------------------------------------------------------------------------- votes and aggregation
def test_votes_and_the_tie_rule():
    probs = np.array([[0.5, 0.5, 0.0],  # tie inside a window → class 0
                      [0.1, 0.2, 0.7],
                      [0.2, 0.7, 0.1],
                      [0.2, 0.1, 0.7]], dtype=np.float32)
    votes = vote_counts(probs, 3)
    assert votes.tolist() == [1, 1, 2]
    assert decide(votes) == 2
    assert decide(np.array([2, 2, 1])) == 0  # tie between images' classes → lowest index
    assert decide(np.array([0, 3, 3])) == 1


def test_aggregations():
    probs = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.3, 0.7, 0.0], [0.2, 0.8, 0.0]])
    np.testing.assert_allclose(aggregate_scores(probs, Aggregate("vote")), [0.25, 0.75, 0.0])
    np.testing.assert_allclose(aggregate_scores(probs, Aggregate("mean")), [0.45, 0.55, 0.0])
    # The two most confident windows per class: CLL (0.9 + 0.4)/2, FL (0.8 + 0.7)/2.
    np.testing.assert_allclose(aggregate_scores(probs, Aggregate("topk", 2)), [0.65, 0.75, 0.0])
    np.testing.assert_allclose(aggregate_scores(probs, Aggregate("topk", 1)), [0.9, 0.8, 0.0])
    np.testing.assert_allclose(aggregate_scores(probs, Aggregate("topk", 99)), aggregate_scores(probs, Aggregate("mean")))
    assert parse_aggregate("topk:3") == Aggregate("topk", 3) and str(parse_aggregate("topk:3")) == "topk:3"
    for bad in ("topk:0", "topk", "max"):
        with pytest.raises(ConfigError, match="valid: vote, mean, topk:K"):
            parse_aggregate(bad)


# ----------------------------------------------------------------------------- parent lists
def _touch_images(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.zeros((40, 40, 3), np.uint8))


def test_parent_list_entries(tmp_path):
    _touch_images(tmp_path / "img", ["CLL/a.tif", "FL/b.tif", "MCL/c.tif", "Mx.tif"])
    listing = tmp_path / "list.txt"
    listing.write_text("CLL/a.tif\nFL/b\n\nMCL/c.tif\nMx\n")
    entries = read_parent_list(listing, tmp_path / "img", CLASSES)
    assert [(e.line, e.label, e.path.name) for e in entries] == [(1, 0, "a.tif"), (2, 1, "b.tif"), (4, 2, "c.tif"), (5, 2, "Mx.tif")]


@pytest.mark.parametrize("text, message", [
    ("Q/a.tif\n", r"list.txt:1: cannot tell the class of 'Q/a.tif'"),
    ("CLL/a.tif\nCLL/zz.tif\n", r"list.txt:2: image not found under .*img \(tried CLL/zz.tif\)"),
    ("CLL/../../x.tif\n", r"list.txt:1: .* must be a path inside the image folder"),
    ("\n\n", r"list.txt: the parent list is empty"),
])
def test_parent_list_errors(tmp_path, text, message):
    _touch_images(tmp_path / "img", ["CLL/a.tif"])
    listing = tmp_path / "list.txt"
    listing.write_text(text)
    with pytest.raises((InputError, EvaluationError), match=message):
        read_parent_list(listing, tmp_path / "img", CLASSES)
