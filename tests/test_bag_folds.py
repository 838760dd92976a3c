"""Patient-level splits of bag sets: stratified k-fold, repeated random 50/50, and the leak check."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from lymph_cv.errors import ConfigError, InputError
from lymph_cv.stages import bag_folds, folds
from lymph_cv.stages.bags import Bag, BagSet, Instance, write_bags


def _bag_set(patients=13, images_per_patient=2) -> BagSet:
    """Image bags of ``patients`` patients (labels 0, 0, 1 in turn), each with a few images."""
    bags = []
    for p in range(patients):
        for i in range(images_per_patient):
            bags.append(Bag(f"P{p:02d}/img{i}", [0, 0, 1][p % 3], f"P{p:02d}", [Instance(f"P{p:02d}/img{i}.png")]))
    return BagSet(["reactive", "tumoral"], bags, "image", "/data")


def test_kfold_by_patient_is_stratified_leak_free_and_covers_every_bag(tmp_path):
    bag_set = _bag_set()
    write_bags(tmp_path, bag_set)
    splits = bag_folds.split_bags(bag_set, tmp_path, method="kfold", k=3, seed=5)
    tested = Counter()
    for split in splits.splits:
        train_patients = {i.split("/")[0] for i in split.train}
        test_patients = {i.split("/")[0] for i in split.test}
        assert not train_patients & test_patients
        assert len(split.train) + len(split.test) == len(bag_set.bags)
        counts = Counter(bag_set.by_id()[i].label for i in split.test)
        assert counts[1] // 2 in (1, 2) and counts[0] // 2 == 3  # 4 and 9 patients over 3 folds
        tested.update(split.test)
    assert set(tested.values()) == {1} and len(tested) == len(bag_set.bags)
    record = json.loads((tmp_path / "bag_folds.json").read_text())
    assert record["method"] == "kfold" and record["seed"] == 5 and record["k"] == 3 and record["bags"] == "bags.json"
    assert record["patients"]["P03/img1"] == "P03"
    assert (tmp_path / "bags_test_1.txt").read_text().splitlines()[0].split("\t")[1] in ("0", "1")
    back = bag_folds.read_bag_splits(tmp_path)
    assert [(s.train, s.test) for s in back.splits] == [(s.train, s.test) for s in splits.splits]
    again = bag_folds.split_bags(bag_set, tmp_path / "again", method="kfold", k=3, seed=5)
    assert [s.test for s in again.splits] == [s.test for s in splits.splits]
    report = folds.check_bag_folds(tmp_path)
    assert not report.leaks and not report.untested and report.unit == "bag"
    assert sum(f.test_images["tumoral"] for f in report.folds) == 8


def test_random_halves_over_ten_seeds(tmp_path):
    bag_set = _bag_set(patients=12, images_per_patient=1)
    splits = bag_folds.split_bags(bag_set, tmp_path, method="random", seed=2)
    assert len(splits.splits) == 10 and [s.seed for s in splits.splits] == list(range(2, 12))
    tests = set()
    for split in splits.splits:
        counts = Counter(bag_set.by_id()[i].label for i in split.test)
        assert counts == {0: 4, 1: 2} and len(split.train) == 6  # half of each class
        tests.add(tuple(split.test))
    assert len(tests) > 5  # the seeds differ
    # a rerun with fewer repeats removes the extra lists
    bag_folds.split_bags(bag_set, tmp_path, method="random", repeats=3, seed=2)
    assert sorted(p.name for p in tmp_path.glob("bags_test_*.txt")) == [f"bags_test_{i}.txt" for i in (1, 2, 3)]
    assert not folds.check_bag_folds(tmp_path).leaks


def test_leak_check_finds_a_patient_on_both_sides(tmp_path, runner, cli):
    bag_set = _bag_set(patients=6)
    write_bags(tmp_path, bag_set)
    bag_folds.split_bags(bag_set, tmp_path, k=2, group_by="bag", seed=1)
    report = folds.check_bag_folds(tmp_path)
    assert report.leaks and report.folds[0].leaked_cases and not report.folds[0].leaked_images
    result = runner.invoke(cli, ["folds", "check", str(tmp_path), "--strict"])
    assert result.exit_code == 1 and "patient(s) on both sides" in result.output and "leaks: yes" in result.output
    bag_folds.split_bags(bag_set, tmp_path, k=2, seed=1)
    result = runner.invoke(cli, ["folds", "check", str(tmp_path), "--strict"])
    assert result.exit_code == 0 and "leaks: none" in result.output
    with pytest.raises(ConfigError, match="--k: 7 folds need at least 7 patients"):
        bag_folds.split_bags(bag_set, tmp_path, k=7)


def test_cli_make_and_split_on_patient_folders(tmp_path, runner, cli):
    from lymph_cv.stages.synth_bags import generate_bags

    generate_bags(tmp_path / "data", patients=8, cells=(2, 3), cell_size=24, seed=0, workers=1)
    result = runner.invoke(cli, ["bags", "make", str(tmp_path / "data"), str(tmp_path / "work")])
    assert result.exit_code == 0, result.stderr
    assert "8 patient bags" in result.output
    result = runner.invoke(cli, ["bags", "split", str(tmp_path / "work"), "--method", "random", "--repeats", "2"])
    assert result.exit_code == 0 and "split 2: train 4 bags, test 4 bags (seed 1)" in result.output
    result = runner.invoke(cli, ["bags", "split", str(tmp_path / "work"), "--k", "3", "--method", "random"])
    assert result.exit_code == 2 and "--k does not apply with --method random" in result.stderr
    (tmp_path / "data" / "clinical.csv").write_text("ID,LABEL,GENDER,DOB,LYMPH_COUNT\nP001,0,M,abc,3\n")
    result = runner.invoke(cli, ["bags", "make", str(tmp_path / "data"), str(tmp_path / "work2")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "clinical.csv: row 2, column DOB: 'abc' is not a date of birth" in result.stderr


def test_image_and_case_bags_follow_the_patch_folds(tmp_path, runner, cli):
    from lymph_cv.stages.bags import bags_from_patches
    from lymph_cv.stages.patches import ImageEntry, Manifest

    images = [ImageEntry(cls, label, f"{case}_{n:03d}.tif", case, 80, 80, 0)
              for cls, label, cases in (("CLL", 0, ("a", "b")), ("FL", 1, ("c", "d")))
              for case in cases for n in (1, 2)]
    manifest = Manifest(["CLL", "FL"], images, data_dir=str(tmp_path))
    fold_set = folds.make_folds(manifest, tmp_path, k=2, seed=0, group_by="case")
    by_image = bags_from_patches(manifest, "image")
    splits = bag_folds.splits_from_folds(by_image, tmp_path, tmp_path)
    assert [s.test for s in splits.splits] == [[e.parent_name for e in f.test] for f in fold_set.folds]
    by_case = bags_from_patches(manifest, "case")
    write_bags(tmp_path, by_case)
    result = runner.invoke(cli, ["bags", "split", str(tmp_path), "--method", "folds"])
    assert result.exit_code == 0, result.stderr
    cases = bag_folds.read_bag_splits(tmp_path)
    assert [sorted(s.test) for s in cases.splits] == [sorted({e.case for e in f.test}) for f in fold_set.folds]
    assert not folds.check_bag_folds(tmp_path).leaks
    folds.make_folds(manifest, tmp_path, k=2, seed=0, group_by="image")
    with pytest.raises(InputError, match="has images on both sides"):
        bag_folds.splits_from_folds(by_case, tmp_path, tmp_path)
