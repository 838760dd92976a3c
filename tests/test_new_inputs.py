"""Bad input on the slide, bag and MIL commands: one ``error:`` line naming the file or option and what
was expected, exit 2, no traceback, nothing written under a final name (nor a folder made for it)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lymph_cv.errors import ConfigError
from lymph_cv.stages import patches, tiling
from lymph_cv.stages.stage import RunOptions


def assert_one_error(result, *expected: str) -> str:
    """The result is exit 2 with exactly one ``error:`` line on stderr holding every ``expected`` text."""
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def not_slides(tmp_path) -> Path:
    """Class folders whose 'slides' are text files with slide suffixes."""
    data = tmp_path / "data"
    for name, suffix in (("CLL", ".svs"), ("FL", ".tif"), ("MCL", ".ndpi")):
        (data / name).mkdir(parents=True)
        (data / name / f"{name.lower()}{suffix}").write_text("not a slide\n")
    return data


def test_slides_tile_not_a_slide(tmp_path, runner, cli, not_slides):
    out = tmp_path / "out"
    result = runner.invoke(cli, ["slides", "tile", str(not_slides), str(out), "--size", "64", "--workers", "1"])
    assert_one_error(result, "cll.svs", "not a slide")
    assert not (out / tiling.TILE_SET).exists() and not (out / patches.MANIFEST_NAME).exists()


@pytest.mark.parametrize("rows, expected", [
    ("slide,label\nnope.svs,CLL\n", ["line 2", "no such slide file 'nope.svs'"]),
    ("a;b\n1\n", ["line 1", "expected slide,label[,case]"]),
])
def test_slides_tile_bad_csv(tmp_path, runner, cli, rows, expected):
    table = tmp_path / "slides.csv"
    table.write_text(rows)
    result = runner.invoke(cli, ["slides", "tile", str(table), str(tmp_path / "out"), "--size", "64"])
    assert_one_error(result, "slides.csv", *expected)


def test_slides_tile_empty_folder(tmp_path, runner, cli):
    (tmp_path / "data").mkdir()
    result = runner.invoke(cli, ["slides", "tile", str(tmp_path / "data"), str(tmp_path / "out"), "--size", "64"])
    assert_one_error(result, "CLL", "class folder missing")


def test_slides_evaluate_missing_workdir_is_not_made(tmp_path, runner, cli):
    result = runner.invoke(cli, ["slides", "evaluate", str(tmp_path / "nowhere"), "-k", "1"])
    assert_one_error(result, "nowhere", "does not exist")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "work").mkdir()  # a work directory without a tiling: the record it lacks is named
    result = runner.invoke(cli, ["slides", "evaluate", str(tmp_path / "work"), "-k", "1"])
    assert_one_error(result, str(Path("work") / "subs" / "tiles.json"), "no such file", "`lymph-cv slides tile`")


def test_bags_split_missing_bags_json(tmp_path, runner, cli):
    result = runner.invoke(cli, ["bags", "split", str(tmp_path / "nowhere")])
    assert_one_error(result, str(Path("nowhere") / "bags.json"), "`lymph-cv bags make`")
    (tmp_path / "bags.txt").write_text("x\n")
    result = runner.invoke(cli, ["bags", "split", str(tmp_path), "--bags", str(tmp_path / "bags.txt")])
    assert_one_error(result, "bags.txt", "cannot read bags.json")
    assert not list(tmp_path.glob("bags_train_*.txt"))


def test_bags_split_too_many_folds_is_the_one_line(tmp_path, runner, cli):
    data, work = tmp_path / "data", tmp_path / "work"
    made = runner.invoke(cli, ["synth", str(data), "--layout", "bags", "--patients", "4", "--cells", "2-2",
                               "--cell-size", "24", "--workers", "1"])
    assert made.exit_code == 0, made.stderr
    assert runner.invoke(cli, ["bags", "make", str(data), str(work)]).exit_code == 0
    # a real process: the class warnings go through logging, which the in-process runner does not capture
    done = subprocess.run([sys.executable, "-m", "lymph_cv", "bags", "split", str(work), "--k", "5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: --k: 5 folds need at least 5 patients in some class, the largest class has 2"], done.stderr
    assert not (work / "bag_folds.json").exists()


def test_mil_train_on_splits_of_an_earlier_bag_set(tmp_path, runner, cli):
    """`bags make` again after `bags split`: the splits name bags of the old set; training stops."""
    work = tmp_path / "work"
    for name, patients in (("a", "4"), ("b", "6")):
        made = runner.invoke(cli, ["synth", str(tmp_path / name), "--layout", "bags", "--patients", patients,
                                   "--cells", "1-1", "--cell-size", "24", "--workers", "1"])
        assert made.exit_code == 0, made.stderr
    assert runner.invoke(cli, ["bags", "make", str(tmp_path / "a"), str(work)]).exit_code == 0
    assert runner.invoke(cli, ["bags", "split", str(work), "--k", "2"]).exit_code == 0
    assert runner.invoke(cli, ["bags", "make", str(tmp_path / "b"), str(work)]).exit_code == 0
    result = runner.invoke(cli, ["mil", "train", str(work), "--crop", "24", "--epochs", "1"])
    assert_one_error(result, "bag_folds.json", "earlier bags.json", "split the bags again")
    assert not (work / "mil").exists()


def test_bags_make_bad_clinical_csv(tmp_path, runner, cli):
    (tmp_path / "data" / "P1").mkdir(parents=True)
    (tmp_path / "clinical.csv").write_text("a;b\n1\n")
    result = runner.invoke(cli, ["bags", "make", str(tmp_path / "data"), str(tmp_path / "work"),
                                 "--clinical", str(tmp_path / "clinical.csv")])
    assert_one_error(result, "clinical.csv", "no column 'ID'", "--columns")
    assert not (tmp_path / "work" / "bags.json").exists()


def test_mil_train_without_bags(tmp_path, runner, cli):
    result = runner.invoke(cli, ["mil", "train", str(tmp_path)])
    assert_one_error(result, "bags.json", "no such file")
    assert not (tmp_path / "mil").exists()


@pytest.mark.parametrize("args, expected", [
    (["--mil", "attention", "--mil-set", "foo"], "error: --mil-set: 'foo': expected key=value"),
    (["--mil", "attention", "--mil-set", "epochs=x"], "error: --mil-set epochs=x: expected an integer"),
    (["--mil", "attention", "--mil-set", "lr=x"], "error: --mil-set lr=x: expected a number"),
    (["--set", "foo"], "error: --set: 'foo': expected key=value"),
])
def test_run_bad_key_values_name_the_option_once(tmp_path, runner, cli, args, expected):
    (tmp_path / "data").mkdir()
    result = runner.invoke(cli, ["run", str(tmp_path / "work"), "--data", str(tmp_path / "data"), *args])
    assert assert_one_error(result) == expected
    assert not (tmp_path / "work").exists()


def test_run_over_non_slides(tmp_path, runner, cli, not_slides):
    work = tmp_path / "work"
    result = runner.invoke(cli, ["run", str(work), "--data", str(not_slides), "--tile-size", "64", "--workers", "1"])
    assert_one_error(result, "cll.svs", "not a slide")
    assert not (work / "subs" / tiling.TILE_SET).exists()


def test_submit_tiles_without_data(tmp_path, runner, cli):
    result = runner.invoke(cli, ["submit", str(tmp_path / "tiles"), "--stage", "tiles", "--scheduler", "local"])
    assert_one_error(result, "--stage tiles", "after --")
    assert not (tmp_path / "tiles" / "jobs.json").exists()


def test_submit_tiles_of_a_non_slide_submits_nothing(tmp_path, runner, cli, not_slides):
    out = tmp_path / "tiles"
    result = runner.invoke(cli, ["submit", str(out), "--stage", "tiles", "--scheduler", "local", "--",
                                 str(not_slides), "--size", "64"])
    assert_one_error(result, "cll.svs", "not a slide")
    assert not (out / "jobs.json").exists() and not list(out.glob("tiles_*.sh"))


@pytest.mark.parametrize("args, expected", [
    (["--layout", "bags", "--abnormal", "2-3"], "--abnormal: expected LOW-HIGH"),
    (["--layout", "bags", "--cells", "60-20"], "--cells: LOW must not exceed HIGH"),
    (["--layout", "slides", "--mpp", "0"], "--mpp: must be a positive number"),
])
def test_synth_new_layouts_bad_options(tmp_path, runner, cli, args, expected):
    result = runner.invoke(cli, ["synth", str(tmp_path / "out"), *args])
    assert_one_error(result, expected)
    assert not (tmp_path / "out" / "synth.json").exists()


def test_synth_keeps_another_layouts_record(tmp_path, runner, cli):
    """synth.json is a synthetic set's truth: a synth of another layout into its folder stops."""
    made = runner.invoke(cli, ["synth", str(tmp_path), "--layout", "bags", "--patients", "2", "--cells", "1-1",
                               "--cell-size", "24", "--workers", "1"])
    assert made.exit_code == 0, made.stderr
    record = (tmp_path / "synth.json").read_text()
    for args in (["--layout", "slides", "--per-class", "1", "--width", "512", "--height", "512"],
                 ["--per-class", "1", "--width", "64", "--height", "64"]):
        result = runner.invoke(cli, ["synth", str(tmp_path), *args, "--workers", "1"])
        assert_one_error(result, "holds a synthetic bags set")
    assert (tmp_path / "synth.json").read_text() == record and not (tmp_path / "CLL").exists()


@pytest.mark.parametrize("stage, words", [(patches.STAGE, "training images"), (tiling.STAGE, "training tiles")])
def test_stain_check_shared_by_patches_and_tiles(tmp_path, stage, words):
    """One check for both stages (stages.stage.check_stain), each naming what it normalises."""
    options = RunOptions(workdir=tmp_path, tile_size=64, stain="reinhard")
    with pytest.raises(ConfigError, match=f"{words}, which needs --direct"):
        stage.check(options)
    with pytest.raises(ConfigError, match="no such file"):
        stage.check(RunOptions(workdir=tmp_path, tile_size=64, stain="reinhard", stain_target=tmp_path / "x.png"))
    with pytest.raises(ConfigError, match="bogus"):
        stage.check(RunOptions(workdir=tmp_path, tile_size=64, stain="reinhard", stain_params={"bogus": 1}))
