"""PatchCamelyon: the synthetic set in the published HDF5 format, and its import round trip."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from lymph_cv.errors import FormatError, InputError
from lymph_cv.formats import h5
from lymph_cv.formats.caffe.blob import read_mean
from lymph_cv.formats.caffe.datum import parse_datum
from lymph_cv.formats.store import open_reader
from lymph_cv.stages.pcam import import_pcam, score_heldout, synth_pcam
from lymph_cv.stages.train import train
from lymph_cv.stages.render import render_fold

COUNTS = {"train": 24, "valid": 10, "test": 6}


@pytest.fixture(scope="module")
def pcam_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pcam")
    synth_pcam(out, counts=COUNTS, seed=5)
    return out


def test_synthetic_set_has_the_published_layout(pcam_dir):
    for split, n in COUNTS.items():
        x_path, y_path = h5.split_paths(pcam_dir, split)
        assert x_path.name == f"camelyonpatch_level_2_split_{split}_x.h5"
        with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
            assert list(fx) == ["x"] and list(fy) == ["y"]
            assert fx["x"].shape == (n, 96, 96, 3) and fx["x"].dtype == np.uint8
            assert fy["y"].shape == (n, 1, 1, 1)
            labels = fy["y"][:].ravel()
            assert sorted(set(labels.tolist())) == [0, 1] and abs(int(labels.sum()) - n / 2) <= 1
    assert json.loads((pcam_dir / "synth.json").read_text())["seed"] == 5


def test_import_round_trip_keeps_split_labels_and_pixels(pcam_dir, tmp_path):
    work = tmp_path / "w"
    splits = import_pcam(pcam_dir, work, backend="lmdb", chunk=7)  # slices that do not divide the splits
    assert {s: v.count for s, v in splits.items()} == COUNTS
    for split, db in (("train", "DB_train_1"), ("valid", "DB_test_1"), ("test", "DB_heldout_1")):
        with h5py.File(h5.split_paths(pcam_dir, split)[0], "r") as fx, \
                h5py.File(h5.split_paths(pcam_dir, split)[1], "r") as fy:
            rgb, labels = fx["x"][:], fy["y"][:].ravel()
        with open_reader(work / db) as reader:
            records = list(reader)
        assert len(records) == len(labels)
        for i, (key, value) in enumerate(records):
            pixels, label = parse_datum(value)
            assert key == f"{i:08d}_pcam_{split}_{i:06d}".encode()
            assert label == labels[i]
            np.testing.assert_array_equal(pixels, rgb[i][..., ::-1].transpose(2, 0, 1))  # BGR, C×H×W
    lines = (work / "test_w32_1.txt").read_text().splitlines()
    assert len(lines) == COUNTS["valid"] and lines[0].startswith("pcam_valid_000000\t")
    with h5py.File(h5.split_paths(pcam_dir, "train")[0], "r") as fx:
        expected = fx["x"][:].astype(np.float64)[..., ::-1].transpose(0, 3, 1, 2).mean(axis=0)
    np.testing.assert_allclose(read_mean(work / "DB_train_w32_1.binaryproto"), expected, rtol=1e-5)
    record = json.loads((work / "pcam.json").read_text())
    assert record["splits"]["test"]["count"] == COUNTS["test"]
    fold = render_fold(work, 1, arch="resnet18", overrides={"batch_size": "4"})  # 96 px: ImageNet stem, 88 crop
    rendered = json.loads((work / "1" / "render.json").read_text())
    assert (rendered["stem"], rendered["crop_size"], rendered["backend"], rendered["test_iter"]) == \
        ("imagenet", 88, "lmdb", 2)
    assert fold.net.is_file()
    short = render_fold(work, 1, overrides={"batch_size": "4", "max_iter": "2", "snapshot": "2", "test_iter": "1"})
    train(short.solver, log_file=False, progress=False)
    metrics = score_heldout(work)  # the newest snapshot, every held-out record once
    assert metrics["records"] == COUNTS["test"] and np.sum(metrics["confusion"]) == COUNTS["test"]
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["auc"] <= 1
    assert json.loads((work / "eval" / "heldout_1" / "metrics.json").read_text())["records"] == COUNTS["test"]
    assert metrics["roc"]["kind"] == "binary" and metrics["roc"]["positive"] == "tumour"
    assert (work / "eval" / "heldout_1" / "roc.png").is_file() and metrics["threshold"] is not None
    turned = score_heldout(work, tta=True)  # the mean softmax of the 8 symmetries of each patch
    assert (turned["tta"], turned["views"]) == (True, 8) and turned["records"] == COUNTS["test"]


def test_bad_inputs_are_one_line_errors(pcam_dir, tmp_path, runner, cli):
    with pytest.raises(InputError, match="PCam file missing"):
        import_pcam(tmp_path, tmp_path / "w")
    broken = tmp_path / "broken"
    broken.mkdir()
    for split in COUNTS:
        for path in h5.split_paths(pcam_dir, split):
            (broken / path.name).write_bytes(path.read_bytes())
    (broken / "camelyonpatch_level_2_split_valid_y.h5").write_bytes(b"not hdf5")
    with pytest.raises(FormatError, match="not an HDF5 file"):
        import_pcam(broken, tmp_path / "w")
    assert not (tmp_path / "w" / "DB_train_1").exists()  # checked before anything is written
    result = runner.invoke(cli, ["import", "pcam", str(tmp_path / "none"), str(tmp_path / "w")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "PCam file missing" in result.stderr
