"""Step 5: windows, crops, votes, parent lists, the published model, end to end and bad input."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lymph_cv.errors import ConfigError, EvaluationError, InputError
from lymph_cv.stages.evaluate import (Aggregate, Crop, aggregate_scores, crop_boxes, crop_buffer, decide, extract_windows,
                               load_image, make_crops, parse_aggregate, prepare_mean, read_parent_list, resize_image,
                               vote_counts)
from lymph_cv.core.grid import window_centres, window_grid

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
    buffer = crop_buffer(25, 3, 32, channels_last=True)  # channels-last memory, written through the N×C×H×W view
    assert buffer.shape == (25, 3, 32, 32) and buffer.transpose(0, 2, 3, 1).flags.c_contiguous
    np.testing.assert_array_equal(make_crops(windows, crop_boxes(36, 36, 32), 32, buffer[:20]), crops)


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
    entries = read_parent_list(listing, tmp_path / "img", CLASSES).entries
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


# ----------------------------------------------------------------------------- fixtures with nets
SMALL_W, SMALL_H = 150, 118  # 4 × 3 windows per image

TINY_LAYERS = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 16 pad: 2 kernel_size: 5 stride: 2
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 16 pad: 1 kernel_size: 3
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: AVE kernel_size: 8 stride: 8 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
"""
TINY_TRAIN = """name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true crop_size: 32 mean_file: "../DB_train_w32_1.binaryproto" }
  data_param { source: "../DB_train_1" batch_size: 32 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 32 mean_file: "../DB_train_w32_1.binaryproto" }
  data_param { source: "../DB_test_1" batch_size: 32 } }
""" + TINY_LAYERS + """
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""
TINY_DEPLOY = """name: "tiny"
input: "data"
input_dim: 10
input_dim: 3
input_dim: 32
input_dim: 32
""" + TINY_LAYERS + """
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""
TINY_SOLVER = """net: "tiny_train.prototxt"
test_iter: 4
test_interval: 1000
base_lr: 0.001
momentum: 0.9
lr_policy: "fixed"
display: 100
max_iter: {iters}
weight_decay: 0.0005
snapshot: 0
snapshot_prefix: "1_tiny"
solver_mode: CPU
random_seed: 1
"""
TINY_ITERS = 250


def _render_deploy(folder, **overrides):
    """The tutorial's deploy net, rendered by lymph_cv.stages.render (num_classes from one-line lists)."""
    from lymph_cv.stages.render import render_fold

    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"x_{label}.tif\t{label}\n" for label in range(len(CLASSES)))
    for name in ("train_w32_1.txt", "test_w32_1.txt"):
        (folder / name).write_text(lines)
    return render_fold(folder, 1, overrides=overrides).deploy


@pytest.fixture(scope="module")
def published(reference, tmp_path_factory):
    """Synthetic images named like the first real test images of each class in fold 1's
    published parent list, the rendered deploy net, and the published model and mean."""
    from lymph_cv.stages.synth import generate

    root = tmp_path_factory.mktemp("published")
    generate(root / "synth", per_class=1, cases_per_class=1, width=SMALL_W, height=SMALL_H, seed=3, workers=1)
    listed = (reference / "test_w32_parent_1.txt").read_text().split()
    names = [next(n for n in listed if n.startswith(c + "/")) for c in CLASSES]
    for name, cls in zip(names, CLASSES):
        target = root / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        next((root / "synth" / cls).glob("*.tif")).rename(target)
    return {
        "root": root, "names": names, "images": root / "images", "deploy": _render_deploy(root / "render"),
        "model": reference / "1_caffenet_train_w32_iter_600000.caffemodel",
        "mean": reference / "DB_train_w32_1.binaryproto", "parent_list": reference / "test_w32_parent_1.txt",
    }


def _published_args(published, out, **changes):
    options = {"--model": published["model"], "--deploy": published["deploy"], "--mean": published["mean"],
               "--parent-list": published["parent_list"], "--images": published["images"], **changes}
    args = ["evaluate", str(out), "--fold", "1"]
    for key, value in options.items():
        args += [key, str(value)]
    return args


def test_published_model_on_the_images_present(published, runner, cli, tmp_path):
    import json

    out = tmp_path / "w"
    result = runner.invoke(cli, _published_args(published, out) + ["--skip-missing"])
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "eval" / "fold_1" / "metrics.json").read_text())
    assert record["classes"] == CLASSES  # the parent list's class folders, sorted
    assert record["images"] == 3 and sum(map(sum, record["confusion"])) == 3
    assert [row.sum() for row in np.array(record["confusion"])] == [1, 1, 1]
    listed = [line for line in published["parent_list"].read_text().split() if line]
    assert len(record["settings"]["skipped_missing"]) == len(listed) - 3
    assert record["settings"]["crops"] == 10 and record["settings"]["window"] == 36
    assert "predicted" in result.stdout and "not evaluated" in result.stdout
    csv_lines = (out / "eval" / "fold_1" / "images.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[1].split(",")[4] == "12"  # 4 × 3 windows

    result = runner.invoke(cli, _published_args(published, out) + ["--skip-missing", "--no-oversample", "--mean-mode",
                                                                    "crop", "--legacy-layout"])
    assert result.exit_code == 0, result.stderr
    settings = json.loads((out / "eval" / "fold_1" / "metrics.json").read_text())["settings"]
    assert (settings["crops"], settings["mean_mode"], settings["oversample"]) == (1, "crop", False)
    assert "actual" in result.stdout.splitlines()[3]


def test_pycaffe_classifier_and_evaluate_agree(published):
    """Our batched path gives the tutorial loop's per-window probabilities (pycaffe.Classifier)."""
    from lymph_cv import pycaffe
    from lymph_cv.formats.caffe.blob import read_mean
    from lymph_cv.stages.evaluate import ParentEntry, WindowClassifier, evaluate_images
    from lymph_cv.pycaffe import io

    mean = read_mean(published["mean"])
    path = published["images"] / published["names"][1]
    entry = ParentEntry(1, published["names"][1], path, 1)
    classifier = WindowClassifier(published["deploy"], published["model"])
    net = pycaffe.Classifier(str(published["deploy"]), str(published["model"]), image_dims=(36, 36),
                             mean=mean, channel_swap=(2, 1, 0), raw_scale=255)
    image = io.load_image(path)
    for oversample in (True, False):
        ours = evaluate_images(classifier, [entry], mean, oversample=oversample, batch_size=50, progress=False)[0]
        expected = []
        for row, col in window_grid(*image.shape[:2]):  # the tutorial's loop, one window per call
            expected.append(net.predict([image[row - 18 : row + 18, col - 18 : col + 18, :]], oversample=oversample)[0])
        expected = np.array(expected)
        np.testing.assert_allclose(ours.probs, expected, rtol=0, atol=2e-5)
        assert ours.probs.argmax(1).tolist() == expected.argmax(1).tolist()
        assert ours.votes.tolist() == np.bincount(expected.argmax(1), minlength=3).tolist()


def test_mean_mode_crop_uses_the_training_convention(published):
    """--mean-mode crop, centre crop only = the net on window − mean, both cropped at (2, 2)."""
    from lymph_cv.formats.caffe.blob import read_mean
    from lymph_cv.stages.evaluate import ParentEntry, WindowClassifier, evaluate_images

    mean = read_mean(published["mean"])
    path = published["images"] / published["names"][2]
    classifier = WindowClassifier(published["deploy"], published["model"])
    calls = []
    ours = evaluate_images(classifier, [ParentEntry(1, "x", path, 2)], mean, oversample=False, mean_mode="crop",
                           progress=False, batch_size=100, meanwhile=lambda: calls.append(len(calls)))[0]
    assert calls == [0]  # once, before the first of several forward passes
    image = load_image(path)
    grid = window_grid(image.shape[1], image.shape[2])
    crops = np.stack([image[:, r - 16 : r + 16, c - 16 : c + 16] - mean[:, 2:34, 2:34] for r, c in grid])
    np.testing.assert_allclose(ours.probs, classifier.predict(crops.astype(np.float32)), rtol=0, atol=1e-6)


def test_tta_averages_the_eight_symmetries_of_each_crop(published):
    """--tta without oversampling: the centre crop mirrored or not, each turned 0–3 quarter turns."""
    from lymph_cv.formats.caffe.blob import read_mean
    from lymph_cv.stages.evaluate import ParentEntry, WindowClassifier, evaluate_images

    mean = read_mean(published["mean"])
    path = published["images"] / published["names"][2]
    classifier = WindowClassifier(published["deploy"], published["model"])
    ours = evaluate_images(classifier, [ParentEntry(1, "x", path, 2)], mean, oversample=False, tta=True,
                           mean_mode="crop", progress=False)[0]
    image = load_image(path)
    grid = window_grid(image.shape[1], image.shape[2])[:6]
    crops = [image[:, r - 16 : r + 16, c - 16 : c + 16] - mean[:, 2:34, 2:34] for r, c in grid]
    for crop, got in zip(crops, ours.probs):
        views = np.stack([np.rot90(view, k, axes=(1, 2)) for k in range(4) for view in (crop, crop[..., ::-1])])
        np.testing.assert_allclose(got, classifier.predict(views.astype(np.float32)).mean(axis=0), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
def _assert_clean_failure(result, out, message):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "eval").exists()


def test_bad_inputs_fail_cleanly(published, runner, cli, tmp_path):
    from lymph_cv.formats.caffe.blob import write_mean

    out = tmp_path / "w"
    # The published list names 75 images; only 3 are here.
    _assert_clean_failure(runner.invoke(cli, _published_args(published, out)), out, "image not found under")

    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(published["names"]) + "\n")
    broken = tmp_path / "images"
    for name in published["names"]:
        (broken / name).parent.mkdir(parents=True, exist_ok=True)
        (broken / name).write_bytes((published["images"] / name).read_bytes())
    (broken / published["names"][2]).write_bytes(b"not a tiff")
    _assert_clean_failure(runner.invoke(cli, _published_args(published, out, **{"--parent-list": listing, "--images": broken})),
                          out, "cannot read the image")

    two_classes = _render_deploy(tmp_path / "two", num_classes=2)
    _assert_clean_failure(runner.invoke(cli, _published_args(published, out, **{"--parent-list": listing, "--deploy": two_classes})),
                          out, "does not fit deploy net")

    small_mean = tmp_path / "mean32.binaryproto"
    write_mean(small_mean, np.zeros((3, 32, 32), np.float32))
    _assert_clean_failure(runner.invoke(cli, _published_args(published, out, **{"--parent-list": listing, "--mean": small_mean})),
                          out, "mean has shape (3, 32, 32), expected (3, 36, 36)")

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _assert_clean_failure(runner.invoke(cli, _published_args(published, out, **{"--parent-list": empty, "--classes": "CLL,FL,MCL"})),
                          out, "the parent list is empty")

    _assert_clean_failure(runner.invoke(cli, _published_args(published, out, **{"--parent-list": listing, "--model": tmp_path / "none.caffemodel"})),
                          out, "model not found")
    result = runner.invoke(cli, _published_args(published, out, **{"--parent-list": listing, "--aggregate": "median"}))
    assert result.exit_code == 2 and "valid: vote, mean, topk:K" in result.stderr


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-fold synthetic workdir (steps 1-3 by lymph_cv) and a small net trained on fold 1 by
    lymph_cv.stages.train (the tutorial's net takes minutes to learn; evaluation does not care which)."""
    from lymph_cv.stages.dbs import build_dbs
    from lymph_cv.stages.folds import make_folds
    from lymph_cv.stages.patches import extract_patches
    from lymph_cv.stages.synth import generate
    from lymph_cv.stages.train import train

    root = tmp_path_factory.mktemp("e2e")
    work = root / "work"
    generate(root / "data", per_class=4, cases_per_class=2, width=240, height=200, seed=0, workers=1)
    manifest = extract_patches(root / "data", work / "subs", workers=1)
    make_folds(manifest, work, k=2, seed=0)
    build_dbs(work, folds=[1], workers=1)
    fold = work / "1"
    fold.mkdir()
    (fold / "tiny_train.prototxt").write_text(TINY_TRAIN)
    (fold / "deploy_train32.prototxt").write_text(TINY_DEPLOY)
    (fold / "solver.prototxt").write_text(TINY_SOLVER.format(iters=TINY_ITERS))
    train(fold / "solver.prototxt", progress=False)
    return work


def test_end_to_end_evaluate_and_report(trained, runner, cli):
    import json

    result = runner.invoke(cli, ["evaluate", str(trained), "--fold", "1", "--heatmaps"])
    assert result.exit_code == 0, result.stderr
    fold_dir = trained / "eval" / "fold_1"
    record = json.loads((fold_dir / "metrics.json").read_text())
    assert record["settings"]["model"].endswith(f"1_tiny_iter_{TINY_ITERS}.caffemodel")  # the latest snapshot
    tested = [line for line in (trained / "test_w32_parent_1.txt").read_text().split() if line]
    assert record["images"] == len(tested)
    assert record["accuracy"] > 1 / len(CLASSES)  # above chance
    assert sorted(p.name for p in (fold_dir / "heatmaps").iterdir()) == sorted(
        n.replace("/", "__").replace(".tif", ".png") for n in tested)
    heat = cv2.imread(str(next((fold_dir / "heatmaps").iterdir())))
    assert heat.shape[1] > 2 * 240 and heat.shape[0] > 200  # the image and the class map side by side, the scales
    assert cv2.imread(str(fold_dir / "confusion.png")) is not None

    for aggregate in ("mean", "topk:5"):
        tta = ["--tta"] if aggregate == "mean" else []
        other = runner.invoke(cli, ["evaluate", str(trained), "--fold", "1", "--aggregate", aggregate,
                                    "--out", str(trained / f"eval_{aggregate[:4]}")] + tta)
        assert other.exit_code == 0, other.stderr
        settings = json.loads((trained / f"eval_{aggregate[:4]}" / "metrics.json").read_text())["settings"]
        assert settings["aggregate"] == aggregate
        assert (settings["tta"], settings["crops"]) == ((True, 40) if tta else (False, 10))
    roc = record["roc"]  # three classes: one-vs-rest AUC per class
    assert roc["kind"] == "one_vs_rest" and set(roc["per_class"]) == set(CLASSES)

    report = runner.invoke(cli, ["report", str(trained)])
    assert report.exit_code == 0, report.stderr
    assert (trained / "eval" / "report.md").read_text().startswith("# ")
    assert json.loads((trained / "eval" / "report.json").read_text())["confusion"] == record["confusion"]


def test_latest_snapshot_is_the_highest_iteration(tmp_path):
    from lymph_cv.stages.evaluate import latest_snapshot

    for n in (900, 10000, 2000):
        (tmp_path / f"1_caffenet_train_w32_iter_{n}.caffemodel").write_bytes(b"")
    (tmp_path / "other.caffemodel").write_bytes(b"")
    assert latest_snapshot(tmp_path).name == "1_caffenet_train_w32_iter_10000.caffemodel"  # numeric, not text
    with pytest.raises(InputError, match="no snapshot"):
        latest_snapshot(tmp_path / "none")


def test_load_image_16_bit_and_grey(tmp_path):
    deep = np.full((3, 4, 3), 65535, np.uint16)
    deep[..., 0] = 0  # blue channel in OpenCV's order
    cv2.imwrite(str(tmp_path / "deep.tif"), deep)
    image = load_image(tmp_path / "deep.tif")
    assert image[:, 0, 0].tolist() == [0.0, 255.0, 255.0]  # skimage's img_as_float divides by 65535
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((3, 4), 51, np.uint8))
    grey = load_image(tmp_path / "grey.png")
    assert grey.shape == (3, 3, 4) and np.all(grey == grey[0, 0, 0])  # grey tiled to three channels
    with pytest.raises(InputError, match="image not found"):
        load_image(tmp_path / "missing.tif")


def test_workdir_records_of_the_wrong_shape_are_one_error(tmp_path):
    """A folds.json holding a list used to end in an AttributeError traceback."""
    from lymph_cv.errors import InputError
    from lymph_cv.stages.evaluate import workdir_info

    (tmp_path / "folds.json").write_text("[]")
    with pytest.raises(InputError, match=r"folds.json: not a folds.json written by `lymph-cv folds`"):
        workdir_info(tmp_path)


def test_latest_snapshot_takes_the_rendered_solvers_series(tmp_path):
    """With plain and dropout snapshots in one fold folder it used to take whichever sorted last."""
    from lymph_cv.errors import InputError
    from lymph_cv.stages.evaluate import latest_snapshot

    fold = tmp_path / "1"
    fold.mkdir()
    for name in ("1_caffenet_train_w32_iter_20", "1_caffenet_train_w32_dropout_iter_20",
                 "1_caffenet_train_w32_dropout_iter_10"):
        (fold / f"{name}.caffemodel").write_bytes(b"")
    with pytest.raises(InputError, match="snapshots of several nets .*; pass --model"):
        latest_snapshot(fold)
    (fold / "1-alexnet_solver_ada.prototxt").write_text('net: "n"\nsnapshot_prefix: "1_caffenet_train_w32_dropout"\n')
    assert latest_snapshot(fold).name == "1_caffenet_train_w32_dropout_iter_20.caffemodel"
    (fold / "1_caffenet_train_w32_dropout_iter_20.caffemodel").unlink()
    (fold / "1_caffenet_train_w32_iter_20.caffemodel").unlink()
    assert latest_snapshot(fold).name == "1_caffenet_train_w32_dropout_iter_10.caffemodel"


def test_train_net_given_as_deploy_is_named_as_such(published):
    """It used to fail on the net's mean_file (opened relative to the cwd), not on the net."""
    from lymph_cv.errors import EvaluationError
    from lymph_cv.stages.evaluate import WindowClassifier

    train_net = published["deploy"].parent / "1-alexnet_traing_32w_db.prototxt"
    with pytest.raises(EvaluationError, match=r"expected a deploy net .* got one with Data layers"):
        WindowClassifier(train_net, published["model"])


def test_empty_parent_list_without_classes_says_it_is_empty(tmp_path, published, runner, cli):
    """It used to say 'class names unknown ... pass --classes'."""
    empty = tmp_path / "test_w32_parent_1.txt"
    empty.write_text("\n")
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "w"), "--fold", "1", "--model", str(published["model"]),
                                 "--deploy", str(published["deploy"]), "--mean", str(published["mean"]),
                                 "--parent-list", str(empty), "--images", str(published["images"])])
    assert result.exit_code == 2
    assert result.stderr == f"error: {empty}: the parent list is empty (expected one image per line)\n"
