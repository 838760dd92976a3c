"""Slide-level evaluation (tile fractions, tile metrics, slides.csv), heatmaps and class activation
maps: on small pyramidal TIFFs, on the real Aperio SVS of tests/testdata.py, and in the report page
opened in headless Chromium."""
from __future__ import annotations

import csv
import json
import re

import cv2
import numpy as np
import pytest

from browser import render
from lymph_cv.errors import ConfigError, UnsupportedError
from lymph_cv.formats.caffe.blob import read_mean
from lymph_cv.stages import slide_eval
from lymph_cv.stages.evaluate import WindowClassifier
from lymph_cv.stages.tiles import TileParams
from slideutil import random_net
from testdata import wheel_file

CLASSES = ["A", "B"]
#: Tiles of the small slides: 32 pixels at level 1 (64 level-0 pixels), the patch the net takes.
PATCH = 32


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    work = tmp_path_factory.mktemp("net")
    deploy, model, mean = random_net(work, PATCH)
    return work, deploy, model, mean


@pytest.fixture(scope="module")
def classifier(net):
    _, deploy, model, _ = net
    return WindowClassifier(deploy, model)


def test_cams_average_to_the_class_scores(classifier):
    head = slide_eval.cam_head(classifier, "fc")
    assert head.features == "res5b" and head.classifier == "fc" and head.weights.shape == (2, 512)
    crops = np.random.default_rng(0).uniform(-60, 60, (3, 3, classifier.crop, classifier.crop)).astype(np.float32)
    blobs = classifier.forward(crops, (head.features, "fc"))
    cams = head.maps(blobs[head.features])
    assert cams.shape[:2] == (3, 2) and cams.shape[2] == cams.shape[3] > 1
    # Global average pooling then the classifier = the classifier at every position, averaged.
    np.testing.assert_allclose(cams.mean(axis=(2, 3)), blobs["fc"], rtol=1e-4, atol=1e-4)
    assert slide_eval.cam_head(classifier).classifier == "fc"  # found without the registry's name too


def test_a_net_without_global_pooling_has_no_cam(tmp_path):
    deploy, model, mean = random_net(tmp_path, 36, arch="alexnet32w")
    alexnet = WindowClassifier(deploy, model, backend="torch")
    with pytest.raises(UnsupportedError, match="global average pooling"):
        slide_eval.cam_head(alexnet)
    if WindowClassifier(deploy, model).net is None:  # natively (AVX2 or later): no torch layers to read
        with pytest.raises(UnsupportedError, match="natively"):
            slide_eval.cam_head(WindowClassifier(deploy, model))
    svs = wheel_file("cmu_small_region.svs")
    tiles = slide_eval.plan_test_slide(svs, "FL/cmu_small_region.svs", 1, TileParams(512, resize=36))
    with pytest.raises(UnsupportedError):
        slide_eval.evaluate_slides(alexnet, [tiles], read_mean(mean), CLASSES)
    fold = slide_eval.evaluate_slides(alexnet, [tiles], read_mean(mean), CLASSES, cams=None)  # as the run does
    assert fold.slides[0].cams is None and fold.result.settings["cam"] is None and len(fold.slides[0].probs) == len(tiles)


def test_slide_decision_by_fraction_or_threshold():
    assert slide_eval.slide_decision(np.array([0.6, 0.4])) == 0
    assert slide_eval.slide_decision(np.array([0.5, 0.5])) == 0  # ties to the lower index, as np.argmax
    assert slide_eval.slide_decision(np.array([0.7, 0.3]), threshold=0.25) == 1
    assert slide_eval.slide_decision(np.array([0.1, 0.2, 0.7])) == 2
    with pytest.raises(ConfigError, match="two classes"):
        slide_eval.slide_decision(np.array([0.1, 0.2, 0.7]), threshold=0.5)


def test_slides_evaluate_without_a_tile_manifest_is_one_line(runner, cli, tmp_path):
    result = runner.invoke(cli, ["slides", "evaluate", str(tmp_path), "-k", "1"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "tiles.json" in result.stderr


def test_the_real_svs_is_tiled_scored_and_heatmapped(classifier, net, tmp_path):
    svs = wheel_file("cmu_small_region.svs")
    tiles = slide_eval.plan_test_slide(svs, "FL/cmu_small_region.svs", 1, TileParams(256, resize=PATCH))
    assert 15 < len(tiles) < (2220 // 256) * (2967 // 256)  # tissue tiles only: about a third of the region
    assert tiles.out_size == PATCH and tiles.extent == 256
    empty = slide_eval.SlideTiles(svs, "FL/glass.svs", 1, [])  # a slide without tissue: left out, named
    fold = slide_eval.evaluate_slides(classifier, [tiles, empty], read_mean(net[3]), CLASSES)
    assert [r.entry for r in fold.result.images] == [tiles.entry] and fold.result.settings["unscored"] == ["FL/glass.svs"]
    scores = fold.slides[0]
    assert scores.probs.shape == (len(tiles), 2) and scores.cams.shape[:2] == (len(tiles), 2)
    figures = dict(slide_eval.slide_figures(scores, fold.result.images[0], CLASSES, thumb_side=512))
    assert sorted(figures) == ["FL__cmu_small_region.svs.cam.png", "FL__cmu_small_region.svs.png"]
    for png in figures.values():
        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[1] > image.shape[0] > 300
        # the colour scale: a column of distinct colours right of the two panels
        scale = image[image.shape[0] // 3 : 2 * image.shape[0] // 3, int(image.shape[1] * 0.85) :]
        assert len(np.unique(scale.reshape(-1, 3), axis=0)) > 30


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory):
    """Twelve synthetic 768-pixel slides, six of each class in three cases each."""
    from lymph_cv.stages.synth_slides import generate_slides

    data = tmp_path_factory.mktemp("slides") / "data"
    generate_slides(data, per_class=6, cases_per_class=3, width=768, height=768, compression="deflate",
                    classes=CLASSES, workers=1)
    return data


def test_the_tiles_stage_writes_no_tile_files_with_direct(slide_set, tmp_path):
    from lymph_cv.stages.stage import RunOptions
    from lymph_cv.stages.tiling import STAGE

    options = RunOptions(tmp_path / "w", data=slide_set, classes=CLASSES, direct=True, tile_size=32, tile_mpp=2.0,
                         tile_resize=16, workers=1)
    assert STAGE.enabled(options) and STAGE.params(options)["direct"] is True
    STAGE.check(options)
    STAGE.run(options, fresh=True)
    assert STAGE.complete(options)
    subs = tmp_path / "w" / "subs"
    assert not list(subs.glob("*_sub_*.tif"))  # the dbs stage reads the tiles from the slides
    assert json.loads((subs / "tiles.json").read_text())["total_tiles"] > 12


def test_run_over_slides_end_to_end(runner, cli, slide_set, tmp_path):
    """``run --data SLIDES --arch resnet18 --tile-size …``: tiles instead of patches, folds by case, dbs,
    render and train unchanged, slide-level evaluation with fractions, heatmaps and CAMs in the report
    (opened in Chromium); then `slides evaluate` of the same fold with a threshold."""
    data = slide_set
    work = tmp_path / "w"
    args = ["run", str(work), "--data", str(data), "--classes", "A,B", "--k", "3", "--folds", "1", "--group-by", "case",
            "--arch", "resnet18", "--tile-size", "32", "--tile-mpp", "2", "--tile-resize", "16", "--max-iter", "1",
            "--set", "batch_size=8", "--set", "test_iter=1", "--workers", "1"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "== tiles: running" in result.stderr and "== patches" not in result.stderr
    assert "== slide_eval: running" in result.stderr and "== evaluate" not in result.stderr
    assert "4 slides over folds 1" in result.stdout
    assert (work / "subs" / "tiles.json").is_file() and (work / "subs" / "qc").is_dir()
    fold = work / "eval" / "fold_1"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["unit"] == "slide" and metrics["images"] == 4 and metrics["settings"]["cam"]["features"] == "res5b"
    rows = list(csv.DictReader((fold / "slides.csv").open()))
    assert list(rows[0]) == ["slide", "true", "predicted", "correct", "tiles", "fraction_A", "fraction_B",
                             "mean_prob_A", "mean_prob_B"]
    assert sorted(r["true"] for r in rows) == ["A", "A", "B", "B"]  # folds by case: whole cases are tested
    for row, item in zip(rows, metrics["slides"]):
        assert row["slide"] == item["slide"] and int(row["tiles"]) == item["tiles"] > 0
        assert float(row["fraction_A"]) + float(row["fraction_B"]) == pytest.approx(1.0)
        assert float(row["mean_prob_A"]) + float(row["mean_prob_B"]) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == CLASSES[int(float(row["fraction_B"]) > 0.5)]  # argmax, ties to A
        for name in (item["heatmap"], item["cam"]):
            png = cv2.imread(str(fold / "heatmaps" / name))
            assert png is not None and png.shape[0] > 300 and png.shape[1] > 1.5 * png.shape[0]
    assert metrics["tiles"]["tiles"] == sum(int(r["tiles"]) for r in rows)
    assert np.array(metrics["tiles"]["confusion"]).sum() == metrics["tiles"]["tiles"]
    md = (work / "eval" / "report.md").read_text()
    assert "## Slides" in md and "4 test slides" in md and md.count("[CAM](fold_1/heatmaps/") == 4
    assert "## Misclassified slides (" in md and "| fold | slides | accuracy |" in md
    assert json.loads((work / "eval" / "report.json").read_text())["tiles"]["tiles"] == metrics["tiles"]["tiles"]
    page = render((work / "eval" / "report.html").as_uri(), tmp_path / "report.png")
    assert page.console == [], page.console
    maps = re.search(r'<div class="thumbs" id="slide-maps">(.*?)</div>', page.dom, re.S)
    assert maps is not None
    assert len(re.findall(r'<a href="fold_1/heatmaps/[AB]__[^"]+\.png"><img src="data:image/png;base64,',
                          maps.group(1))) == 8 and maps.group(1).count("class activation map of") == 4
    assert 'id="tile-matrix"' in page.dom and "Tile level" in page.dom and "4 slides: accuracy" in page.dom
    stages = json.loads((work / "run.json").read_text())["stages"]
    assert "tiles" in stages and "slide_eval" in stages and "patches" not in stages
    # Unchanged, a rerun skips every stage.
    again = runner.invoke(cli, args)
    assert again.exit_code == 0 and "running" not in again.stderr, again.stderr[-2000:]
    # `slides evaluate` of the same fold: threshold 0 calls every slide the second class.
    out = work / "eval" / "threshold"
    result = runner.invoke(cli, ["slides", "evaluate", str(work), "-k", "1", "--threshold", "0", "--no-heatmaps",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "tile level:" in result.stdout and not (out / "heatmaps").exists()
    assert {r["predicted"] for r in csv.DictReader((out / "slides.csv").open())} == {"B"}


def test_bad_slide_run_options_are_one_line(runner, cli, tmp_path):
    result = runner.invoke(cli, ["run", str(tmp_path / "w"), "--data", str(tmp_path), "--min-tissue", "0.3"])
    assert result.exit_code == 2 and "--tile-size" in result.stderr
    both = runner.invoke(cli, ["run", str(tmp_path / "w"), "--data", str(tmp_path), "--tile-size", "32",
                               "--tile-mpp", "2", "--tile-level", "1"])
    assert both.exit_code == 2 and both.stderr == "error: --tile-mpp and --tile-level are alternatives; give one\n"
    three = runner.invoke(cli, ["run", str(tmp_path / "w"), "--data", str(tmp_path), "--tile-size", "32",
                                "--slide-threshold", "0.5"])
    assert three.exit_code == 2 and "--slide-threshold: is for two classes; there are 3" in three.stderr
