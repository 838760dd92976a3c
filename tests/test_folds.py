"""Step 2: fold lists, per-class spread, case grouping, the published split and the leak check."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from lymph_cv.stages import folds
from lymph_cv.errors import ConfigError, InputError
from lymph_cv.stages.patches import MANIFEST_NAME, ImageEntry, Manifest, case_of

CLASSES = ["CLL", "FL", "MCL"]
PATCHES = 4  # per image: enough to see the order, small enough to count by hand


def _manifest(images_per_case=(3, 2, 4, 1, 3, 2, 2), path=None) -> Manifest:
    entries = []
    for label, name in enumerate(CLASSES):
        for c, count in enumerate(images_per_case):
            case = f"sj-0{label + 3}-{100 * (label + 1) + c}" + ("-R2" if c % 2 else "")
            for i in range(1, count + 1):
                entries.append(ImageEntry(name, label, f"{case}_{i:03d}.tif", case, 80, 80, PATCHES))
    return Manifest(CLASSES, entries, path=path)


def _lines(path):
    return path.read_text().splitlines()


def test_fold_files_format_order_and_spread(tmp_path):
    manifest = _manifest(path=tmp_path / "subs" / MANIFEST_NAME)
    result = folds.make_folds(manifest, tmp_path, k=5, seed=3)
    assert [f.index for f in result.folds] == [1, 2, 3, 4, 5]
    n_images = len(manifest.images)
    tested = Counter()
    for fold in result.folds:
        train, test = _lines(tmp_path / f"train_w32_{fold.index}.txt"), _lines(tmp_path / f"test_w32_{fold.index}.txt")
        parents = _lines(tmp_path / f"test_w32_parent_{fold.index}.txt")
        train_parents = _lines(tmp_path / f"train_w32_parent_{fold.index}.txt")
        assert len(parents) + len(train_parents) == n_images and not set(parents) & set(train_parents)
        assert len(train) + len(test) == n_images * PATCHES
        tested.update(parents)
        # <patch file>TAB<label>, relative to the work folder, in class/image/patch order.
        first = parents[0]
        cls, name = first.split("/")
        stem = name[:-4]
        assert test[:PATCHES] == [f"subs/{stem}_sub_{i}.tif\t{CLASSES.index(cls)}" for i in range(1, PATCHES + 1)]
        labels = [int(line.split("\t")[1]) for line in test]
        assert labels == sorted(labels)
        # Every class is in every test fold, with 17 images per class over 5 folds: 3 or 4 each.
        per_class = Counter(p.split("/")[0] for p in parents)
        assert all(per_class[c] in (3, 4) for c in CLASSES)
    assert set(tested.values()) == {1} and len(tested) == n_images
    record = json.loads((tmp_path / "folds.json").read_text())
    assert record["k"] == 5 and record["seed"] == 3 and record["group_by"] == "image"
    again = folds.make_folds(manifest, tmp_path / "again", k=5, seed=3)
    assert [[e.name for e in f.test] for f in again.folds] == [[e.name for e in f.test] for f in result.folds]
    other = folds.make_folds(manifest, tmp_path / "other", k=5, seed=4)
    assert [[e.name for e in f.test] for f in other.folds] != [[e.name for e in f.test] for f in result.folds]


def test_assign_folds_is_balanced():
    import numpy as np

    numbers = folds.assign_folds(23, 5, np.random.default_rng(0))
    assert sorted(Counter(numbers.tolist()).values()) == [4, 4, 5, 5, 5]


def test_group_by_case_never_leaks(tmp_path):
    manifest = _manifest()
    for seed in range(4):
        result = folds.make_folds(manifest, tmp_path / str(seed), k=3, seed=seed, group_by="case")
        for fold in result.folds:
            assert not {e.case for e in fold.train} & {e.case for e in fold.test}
            assert {e.cls for e in fold.test} == set(CLASSES)
        report = folds.check_folds(tmp_path / str(seed))
        assert not report.leaks and all(not f.leaked_cases for f in report.folds)
    by_image = folds.make_folds(manifest, tmp_path / "img", k=3, seed=0, group_by="image")
    assert any({e.case for e in f.train} & {e.case for e in f.test} for f in by_image.folds)


def test_custom_case_regex(tmp_path):
    manifest = _manifest()
    # Group by the "-R2" suffix only: two "cases" per class, each kept on one side.
    result = folds.make_folds(manifest, tmp_path, k=2, seed=0, group_by="case", case_regex=r"^sj-\d+-\d+(-R2|)_")
    for fold in result.folds:
        assert fold.train and fold.test
        for cls in CLASSES:
            def suffixes(side):
                return {e.stem.split("_")[0].endswith("-R2") for e in side if e.cls == cls}
            assert len(suffixes(fold.train)) == len(suffixes(fold.test)) == 1
            assert suffixes(fold.train) != suffixes(fold.test)


@pytest.mark.parametrize("k, regex, words", [
    (8, None, "--k: 8 folds need at least 8 cases in some class, the largest class has 7 (use --k 7 or less)"),
    (2, r"^(sj-\d+)-", "--k: every class has a single case"),
])
def test_more_folds_than_groups_is_refused_before_writing(tmp_path, k, regex, words, caplog):
    from lymph_cv.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        folds.make_folds(_manifest(), tmp_path / "w", k=k, group_by="case", case_regex=regex or folds.DEFAULT_CASE_REGEX)
    assert str(raised.value).startswith(words)
    assert not (tmp_path / "w").exists() and not caplog.records  # the error is the only line
    # A group the regex leaves unset falls back to the stem instead of a None case id.
    assert case_of("sj-03-100_001", r"^(x)?") == "sj-03-100_001"


def _reference_manifest(reference) -> Manifest:
    names = sorted(set(folds.read_list_lines(reference / "train_w32_parent_1.txt"))
                   | set(folds.read_list_lines(reference / "test_w32_parent_1.txt")))
    entries = []
    for line in names:
        cls, name = line.split("/")
        entries.append(ImageEntry(cls, CLASSES.index(cls), name, case_of(name[:-4]), 1040, 1388, 2))
    return Manifest(CLASSES, entries)


def test_published_split_reproduced_and_its_leaks_reported(tmp_path, reference, runner, cli):
    manifest = _reference_manifest(reference)
    assert len(manifest.images) == 374
    result = folds.folds_from_parent_lists(manifest, reference, tmp_path)
    assert result.k == 5
    for k in range(1, 6):
        for side in ("train", "test"):
            name = f"{side}_w32_parent_{k}.txt"
            assert (tmp_path / name).read_bytes() == (reference / name).read_bytes()
        patch_lines = _lines(tmp_path / f"test_w32_{k}.txt")
        assert len(patch_lines) == 2 * len(_lines(reference / f"test_w32_parent_{k}.txt"))
    report = folds.check_folds(tmp_path)
    assert report.leaks
    assert all(fold.leaked_cases and not fold.leaked_images for fold in report.folds)
    assert "sj-03-2810" in report.folds[0].leaked_cases  # _003 and _009 tested, the rest trained
    assert not report.untested and not report.tested_twice
    shown = runner.invoke(cli, ["folds", "check", str(tmp_path)])
    assert shown.exit_code == 0 and "case(s) on both sides" in shown.output
    strict = runner.invoke(cli, ["folds", "check", str(tmp_path), "--strict"])
    assert strict.exit_code == 1


def test_cli_folds_direct_and_from_parent_lists(tmp_path, runner, cli):
    import json as _json

    manifest = _manifest()
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / MANIFEST_NAME).write_text(_json.dumps(manifest.to_json()))
    result = runner.invoke(cli, ["folds", str(subs), str(tmp_path), "--k", "3", "--seed", "1", "--group-by", "case"])
    assert result.exit_code == 0, result.stderr
    assert "fold 3:" in result.output and (tmp_path / "test_w32_3.txt").is_file()
    assert _lines(tmp_path / "test_w32_1.txt")[0].startswith("subs/")
    copy = tmp_path / "copy"
    again = runner.invoke(cli, ["folds", str(subs / MANIFEST_NAME), str(copy), "--from-parent-lists", str(tmp_path)])
    assert again.exit_code == 0, again.stderr
    for k in (1, 2, 3):
        assert (copy / f"test_w32_parent_{k}.txt").read_text() == (tmp_path / f"test_w32_parent_{k}.txt").read_text()
    bad = runner.invoke(cli, ["folds", str(subs), str(tmp_path), "--group-by", "patient"])
    assert bad.exit_code == 2 and "image" in bad.stderr and "case" in bad.stderr
    ignored = runner.invoke(cli, ["folds", str(subs), str(tmp_path / "x"), "--from-parent-lists", str(tmp_path), "--k", "5"])
    assert ignored.exit_code == 2 and "--k does not apply with --from-parent-lists" in ignored.stderr
    assert not (tmp_path / "x").exists()


def test_parent_list_problems(tmp_path, runner, cli):
    manifest = _manifest()
    folds.make_folds(manifest, tmp_path, k=2, seed=0)
    listed = tmp_path / "test_w32_parent_2.txt"
    listed.write_text(listed.read_text() + "CLL/sj-99-1_001.tif\n")
    with pytest.raises(InputError, match=r"test_w32_parent_2.txt: line \d+: 'CLL/sj-99-1_001.tif' is not an image"):
        folds.folds_from_parent_lists(manifest, tmp_path, tmp_path / "x")
    listed.write_text("no-class-folder.tif\n")
    with pytest.raises(InputError, match="line 1: 'no-class-folder.tif' is not CLASS/file.tif"):
        folds.folds_from_parent_lists(manifest, tmp_path, tmp_path / "x")
    (tmp_path / "train_w32_parent_2.txt").unlink()
    with pytest.raises(InputError, match="fold 2 has only one"):
        folds.check_folds(tmp_path)
    missing = runner.invoke(cli, ["folds", str(tmp_path / "nope.json"), str(tmp_path)])
    assert missing.exit_code == 2 and "nope.json" in missing.stderr


def test_rerun_keeps_unchanged_lists(tmp_path):
    manifest = _manifest()
    folds.make_folds(manifest, tmp_path, k=3, seed=2)
    listed = tmp_path / "train_w32_1.txt"
    stamp = listed.stat().st_mtime_ns
    folds.make_folds(manifest, tmp_path, k=3, seed=2)
    assert listed.stat().st_mtime_ns == stamp
    folds.make_folds(manifest, tmp_path, k=3, seed=3)  # a different split is written
    folds.make_folds(manifest, tmp_path / "fresh", k=3, seed=3)
    for k in (1, 2, 3):
        for name in (f"train_w32_{k}.txt", f"test_w32_parent_{k}.txt"):
            assert (tmp_path / name).read_text() == (tmp_path / "fresh" / name).read_text()
    # Fewer folds: the lists of folds 4 and 5 of an earlier 5-fold split must not survive
    # (dbs and render take every fold with lists).
    folds.make_folds(manifest, tmp_path / "k", k=5, seed=3)
    (tmp_path / "k" / "notes_w32_4.txt").write_text("mine")
    folds.make_folds(manifest, tmp_path / "k", k=3, seed=3)
    assert folds.list_folds(tmp_path / "k") == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "k").glob("*_4.txt")) == ["notes_w32_4.txt"]
    assert not list((tmp_path / "k").glob("*_5.txt"))


def test_patch_folder_outside_the_work_folder(tmp_path):
    manifest = _manifest(path=tmp_path / "elsewhere" / MANIFEST_NAME)
    folds.make_folds(manifest, tmp_path / "work", k=2, seed=0)
    first = _lines(tmp_path / "work" / "test_w32_1.txt")[0]
    assert "/" not in first.split("\t")[0]  # no '../elsewhere/' climbing out of the root
    record = json.loads((tmp_path / "work" / "folds.json").read_text())
    assert record["list_root"] == str((tmp_path / "elsewhere").resolve())
    folds.make_folds(_manifest(path=tmp_path / "work" / "subs" / MANIFEST_NAME), tmp_path / "work", k=2, seed=0)
    assert json.loads((tmp_path / "work" / "folds.json").read_text())["list_root"] == "."


@pytest.mark.parametrize("record, words", [
    ("[1, 2]", "not a folds.json written by `lymph-cv folds`"),
    ('{"case_regex": 5}', "not a folds.json written by `lymph-cv folds`"),
    ('{"case_regex": "("}', "case_regex: '(' is not a regular expression"),
])
def test_check_with_a_foreign_folds_json(tmp_path, record, words):
    from lymph_cv.errors import FormatError

    folds.make_folds(_manifest(), tmp_path, k=2, seed=0)
    (tmp_path / "folds.json").write_text(record)
    with pytest.raises(FormatError) as raised:
        folds.check_folds(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / 'folds.json'}: {words}")
    if "(" in record:  # an explicit --case-regex replaces the record's
        assert folds.check_folds(tmp_path, r"^(sj-\d+)").folds


def test_negative_seeds_are_one_line_errors(tmp_path, runner, cli):
    from lymph_cv.commands import convert_imageset

    for args in (["synth", str(tmp_path / "s")], ["folds", str(tmp_path), str(tmp_path / "w")],
                 ["dbs", str(tmp_path)]):
        result = runner.invoke(cli, [*args, "--seed", "-1"])  # numpy raised ValueError: a traceback
        assert result.exit_code == 2 and result.stderr == "error: --seed: must be a non-negative integer, got -1\n"
    assert convert_imageset.main(["-shuffle", "-seed", "-1", f"{tmp_path}/", "l.txt", str(tmp_path / "db")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_by_site_holds_out_whole_sites(tmp_path):
    manifest = _manifest(path=tmp_path / "subs" / MANIFEST_NAME)
    cases = sorted({e.case for e in manifest.images})
    sites = {case: f"site{i % 3 + 1}" for i, case in enumerate(cases)}
    result = folds.make_site_folds(manifest, tmp_path, sites=sites)
    assert result.k == 3 and result.held_out == ["site1", "site2", "site3"]
    for fold in result.folds:
        site = result.held_out[fold.index - 1]
        assert {sites[e.case] for e in fold.test} == {site}
        assert site not in {sites[e.case] for e in fold.train}
        assert len(fold.train) + len(fold.test) == len(manifest.images)
    record = json.loads((tmp_path / "folds.json").read_text())
    assert record["group_by"] == "site" and [f["test_site"] for f in record["folds"]] == ["site1", "site2", "site3"]
    with pytest.raises(ConfigError, match="use --k 3"):
        folds.make_site_folds(manifest, tmp_path, sites=sites, k=5)
    with pytest.raises(InputError, match="no sites recorded"):
        folds.make_site_folds(manifest, tmp_path)  # no synth.json beside the (absent) data folder
