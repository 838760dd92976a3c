"""`lymph-cv synth --layout bags`: patients, centred cells, the clinical CSV; seeded and loadable."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lymph_cv.errors import ConfigError
from lymph_cv.stages.bags import instance_images, load_bags
from lymph_cv.stages.synth_bags import generate_bags


def test_synthetic_bags_load_back_with_their_truth(tmp_path, runner, cli):
    result = runner.invoke(cli, ["synth", "--layout", "bags", str(tmp_path / "a"), "--patients", "6", "--cells",
                                 "4-6", "--abnormal", "0.3-0.5", "--cell-size", "32", "--seed", "3", "--workers", "1"])
    assert result.exit_code == 0, result.output + str(result.stderr)
    assert "6 patients" in result.output
    record = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert record["seed"] == 3 and record["cells"] == [4, 6] and record["layout"] == "bags"
    bag_set = load_bags(tmp_path / "a")
    assert bag_set.record["synth"]["seed"] == 3 and "truth" not in bag_set.record["synth"]
    assert len(bag_set.bags) == 6 and {b.label for b in bag_set.bags} == {0, 1}
    for bag in bag_set.bags:
        truth = record["truth"][bag.id]
        assert truth["label"] == bag.label and 4 <= len(bag.instances) == truth["cells"] <= 6
        if bag.label == 1:
            assert 0.3 <= len(truth["abnormal"]) / truth["cells"] <= 0.5 + 1 / truth["cells"]
        assert all(b is not None for b in bag.clinical.values())
    pixels = instance_images(bag_set, bag_set.bags[0])
    assert pixels[0].shape == (32, 32, 3) and pixels[0].dtype == np.uint8
    # seeded: the same again, another seed differs; a second run in the same folder keeps it
    generate_bags(tmp_path / "b", patients=6, cells=(4, 6), abnormal=(0.3, 0.5), cell_size=32, seed=3, workers=1)
    assert (tmp_path / "a" / "clinical.csv").read_text() == (tmp_path / "b" / "clinical.csv").read_text()
    first = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert first == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in first)
    other = generate_bags(tmp_path / "c", patients=6, cells=(4, 6), cell_size=32, seed=4, workers=1)
    assert other["truth"] != record["truth"]
    result = runner.invoke(cli, ["synth", "--layout", "bags", str(tmp_path / "d"), "--width", "100"])
    assert result.exit_code == 2 and "--width does not apply with --layout bags" in result.stderr
    result = runner.invoke(cli, ["synth", str(tmp_path / "d"), "--patients", "10"])
    assert result.exit_code == 2 and "--patients does not apply with --layout tutorial" in result.stderr
    result = runner.invoke(cli, ["synth", "--layout", "bags", str(tmp_path / "d"), "--cells", "9-3"])
    assert result.exit_code == 2 and "--cells" in result.stderr and "Traceback" not in result.stderr


def test_abnormal_cells_are_larger_and_darker_to_the_edge(tmp_path):
    record = generate_bags(tmp_path, patients=4, cells=(30, 30), abnormal=(0.5, 0.5), reactive_abnormal=(0, 0),
                           cell_size=48, seed=1, workers=1)
    bag_set = load_bags(tmp_path)
    normal, abnormal = [], []
    for bag in bag_set.bags:
        flagged = set(record["truth"][bag.id]["abnormal"])
        for instance, pixels in zip(bag.instances, instance_images(bag_set, bag)):
            dark = float((pixels.mean(axis=2) < 130).mean())  # the nucleus' share of the image
            (abnormal if instance.path.split("/")[1] in flagged else normal).append(dark)
    assert len(abnormal) == 30 and len(normal) == 90
    assert np.mean(abnormal) > 1.3 * np.mean(normal)


def test_bad_parameters(tmp_path):
    with pytest.raises(ConfigError, match="--abnormal"):
        generate_bags(tmp_path / "x", abnormal=(0.5, 1.5))
    with pytest.raises(ConfigError, match="--cell-size"):
        generate_bags(tmp_path / "x", cell_size=8)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        generate_bags(tmp_path / "y", patients=2, cells=(1, 1), cell_size=24)
