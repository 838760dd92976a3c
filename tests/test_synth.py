"""The synthetic data set: layout, names, determinism, resumability, colour is not the class."""
from __future__ import annotations

import json
import re
from collections import Counter

import cv2
import numpy as np
import pytest

from lymph_cv.errors import ConfigError
from lymph_cv.stages import synth

SMALL = dict(per_class=3, cases_per_class=2, width=160, height=120)
NAME = re.compile(r"sj-0[3-5]-\d+(-R\d+)?_\d{3}\.tif")


def _read_all(root):
    return {p.relative_to(root).as_posix(): cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(root.rglob("*.tif"))}


def test_layout_names_and_record(tmp_path):
    paths = synth.generate(tmp_path, seed=3, workers=1, **SMALL)
    assert len(paths) == 9
    for label, name in enumerate(synth.DEFAULT_CLASSES):
        files = sorted((tmp_path / name).iterdir())
        assert len(files) == 3
        assert all(NAME.fullmatch(f.name) for f in files)
        cases = {f.name.rsplit("_", 1)[0] for f in files}
        assert len(cases) == 2  # several images per case
    image = cv2.imread(str(paths[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (120, 160, 3) and image.dtype == np.uint8
    record = json.loads((tmp_path / synth.SYNTH_JSON).read_text())
    assert record["seed"] == 3 and record["images_per_class"] == [3, 3, 3]
    all_cases = [c for cases in record["cases"].values() for c in cases]
    assert len(set(all_cases)) == len(all_cases) == 6


def test_deterministic_whatever_the_workers(tmp_path):
    synth.generate(tmp_path / "a", seed=5, workers=1, **SMALL)
    synth.generate(tmp_path / "b", seed=5, workers=2, **SMALL)
    synth.generate(tmp_path / "c", seed=6, workers=1, **SMALL)
    a, b, c = (_read_all(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(k in c and np.array_equal(a[k], c[k]) for k in a)


def test_rerun_keeps_existing_images(tmp_path):
    paths = synth.generate(tmp_path, seed=1, workers=1, **SMALL)
    stamp = paths[0].stat().st_mtime_ns
    paths[1].unlink()
    again = synth.generate(tmp_path, seed=1, workers=1, **SMALL)
    assert again == paths and paths[1].is_file()
    assert paths[0].stat().st_mtime_ns == stamp


def test_image_colour_does_not_give_the_class_away(tmp_path):
    # Mean colour per image, nearest class centroid, leave-one-case-out: near chance.
    synth.generate(tmp_path, seed=2, workers=2, per_class=12, cases_per_class=12, width=96, height=96)
    features, labels = [], []
    for label, name in enumerate(synth.DEFAULT_CLASSES):
        for path in sorted((tmp_path / name).glob("*.tif")):
            features.append(cv2.imread(str(path)).reshape(-1, 3).mean(0))
            labels.append(label)
    x, y = np.array(features), np.array(labels)
    correct = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        centroids = np.stack([x[keep & (y == k)].mean(0) for k in range(3)])
        correct += int(np.argmin(((centroids - x[i]) ** 2).sum(1)) == y[i])
    assert correct / len(y) < 0.6


def test_cli_synth(tmp_path, runner, cli):
    result = runner.invoke(cli, ["synth", str(tmp_path), "--per-class", "1,2,1", "--cases-per-class", "1",
                                 "--width", "64", "--height", "48", "--workers", "1"])
    assert result.exit_code == 0, result.stderr
    assert len(list(tmp_path.rglob("*.tif"))) == 4
    bad = runner.invoke(cli, ["synth", str(tmp_path), "--per-class", "x"])
    assert bad.exit_code == 2 and "--per-class" in bad.stderr


def test_image_counts():
    from lymph_cv.errors import ConfigError

    assert synth._images_per_class(None, synth.DEFAULT_CLASSES) == [113, 139, 122]  # the published set: 374
    assert synth._images_per_class(4, ["A", "B"]) == [4, 4]
    with pytest.raises(ConfigError, match="do not match the 3 classes"):
        synth._images_per_class([1, 2], synth.DEFAULT_CLASSES)
    with pytest.raises(ConfigError, match="give --per-class"):
        synth._images_per_class(None, ["A", "B"])
    assert synth._split(11, 3) == [4, 4, 3]


def test_a_folder_with_other_images_is_refused(tmp_path, runner, cli):
    small = ["--per-class", "2", "--cases-per-class", "1", "--width", "40", "--height", "40", "--workers", "1"]
    assert runner.invoke(cli, ["synth", str(tmp_path), *small]).exit_code == 0
    before = sorted(p.name for p in tmp_path.rglob("*.tif"))
    # Fewer images, or another seed, would leave the earlier images mixed in with the new set.
    for change in (["--per-class", "1"], ["--seed", "4"]):
        result = runner.invoke(cli, ["synth", str(tmp_path), *small, *change])
        assert result.exit_code == 2 and "not part of this set" in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert sorted(p.name for p in tmp_path.rglob("*.tif")) == before
    again = runner.invoke(cli, ["synth", str(tmp_path), *small])  # the same set: kept, nothing redrawn
    assert again.exit_code == 0 and sorted(p.name for p in tmp_path.rglob("*.tif")) == before
    bad = runner.invoke(cli, ["synth", str(tmp_path / "n"), "--classes", "A/B,C"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --classes: 'A/B' is not a plain folder name")


def test_sites_differ_strongly_in_stain_and_are_recorded(tmp_path):
    # One site: exactly the images of a set drawn without sites.
    synth.generate(tmp_path / "one", seed=2, workers=1, sites=1, **SMALL)
    assert json.loads((tmp_path / "one" / synth.SYNTH_JSON).read_text())["sites"] == 1
    params = dict(SMALL, cases_per_class=3, per_class=3)
    synth.generate(tmp_path / "three", seed=2, workers=1, sites=3, **params)
    record = json.loads((tmp_path / "three" / synth.SYNTH_JSON).read_text())
    assert [s["name"] for s in record["site_styles"]] == ["site1", "site2", "site3"]
    assert "pale pink" in record["site_styles"][1]["description"]
    assert sorted(Counter(record["case_sites"].values()).values()) == [3, 3, 3]  # every site holds every class
    mean_colour = {}
    for path in (tmp_path / "three").rglob("*.tif"):
        site = record["case_sites"][path.stem.rsplit("_", 1)[0]]
        mean_colour.setdefault(site, []).append(cv2.imread(str(path)).reshape(-1, 3).mean(axis=0))
    colour = {site: np.mean(values, axis=0) for site, values in mean_colour.items()}  # BGR
    assert colour["site3"][2] < colour["site1"][2] - 15  # dark blue-purple: much less red light
    assert colour["site2"][2] > colour["site1"][2] + 10  # pale pink: more red light (weak haematoxylin)
    with pytest.raises(ConfigError, match="--sites: 4 sites need at least 4 cases"):
        synth.generate(tmp_path / "x", seed=2, workers=1, sites=4, **params)
