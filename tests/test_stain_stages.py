"""``--stain`` through the stages: the same pixels in patches, databases and evaluation; per-fold
targets fitted on training images only; ``run --stain`` end to end on a multi-site synthetic set."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lymph_cv.core.grid import window_grid
from lymph_cv.formats.caffe.datum import parse_datum
from lymph_cv.formats.store import open_reader
from lymph_cv.stages import stain
from lymph_cv.stages.evaluate import extract_windows, load_image

SITES = dict(per_class=2, cases_per_class=2, width=168, height=136, sites=2)
PATCH = "{stem}_sub_{index}.tif"


@pytest.fixture(scope="module")
def sites_data(tmp_path_factory) -> Path:
    """Two sites (standard, pale pink), two cases per class, one image each."""
    from lymph_cv.stages.synth import generate

    data = tmp_path_factory.mktemp("sites")
    generate(data, seed=1, workers=1, **SITES)
    return data


def _ok(result):
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return result


def _records(db: Path) -> dict:
    with open_reader(db) as reader:
        return {key.decode().split("_", 1)[1].rsplit("/", 1)[-1]: parse_datum(value)[0] for key, value in reader}


def test_patches_dbs_and_evaluate_see_byte_identical_windows(tmp_path, runner, cli, sites_data):
    image = sorted((sites_data / "FL").iterdir())[0]
    target = tmp_path / "target.json"
    _ok(runner.invoke(cli, ["stain", "fit", str(sorted((sites_data / "CLL").iterdir())[-1]), "--method", "macenko",
                            "-o", str(target)]))
    stained = ["--stain", "macenko", "--stain-target", str(target), "--workers", "1"]
    # Path 1: patch files cut by `patches --stain`, then databases from the files.
    files = tmp_path / "files"
    _ok(runner.invoke(cli, ["patches", str(sites_data), str(files / "subs"), *stained]))
    _ok(runner.invoke(cli, ["folds", str(files / "subs"), str(files), "--k", "2"]))
    _ok(runner.invoke(cli, ["dbs", str(files), "--workers", "1"]))
    # Path 2: manifest only, databases cut straight from the images by `dbs --images --stain`.
    direct = tmp_path / "direct"
    _ok(runner.invoke(cli, ["patches", str(sites_data), str(direct / "subs"), "--manifest-only", "--workers", "1"]))
    _ok(runner.invoke(cli, ["folds", str(direct / "subs"), str(direct), "--k", "2"]))
    _ok(runner.invoke(cli, ["dbs", str(direct), "--images", str(sites_data), *stained]))
    assert (files / "subs" / "stain.json").is_file() and (direct / "stain_1.json").is_file()
    from_files = {**_records(files / "DB_train_1"), **_records(files / "DB_test_1")}
    from_images = {**_records(direct / "DB_train_1"), **_records(direct / "DB_test_1")}
    assert from_files.keys() == from_images.keys()
    for name in from_files:
        assert np.array_equal(from_files[name], from_images[name]), name
    # Path 3: evaluate's window, read through the record the work directory holds for the fold.
    recorded = stain.recorded_stain_path(direct, 1)
    assert recorded == direct / "stain_1.json"
    pixels = load_image(image, stain.hook(stain.read_record(recorded).transform))
    windows = extract_windows(pixels, window_grid(pixels.shape[1], pixels.shape[2]))
    for window_index in (0, len(windows) - 1):
        patch_file = files / "subs" / PATCH.format(stem=image.stem, index=2 * window_index + 1)  # odd: 0°
        patch = cv2.imread(str(patch_file), cv2.IMREAD_UNCHANGED).transpose(2, 0, 1)
        assert np.array_equal(np.rint(windows[window_index]).astype(np.uint8), patch)
        assert np.array_equal(from_images[patch_file.name], patch)
    # And normalisation did change the pixels (the plain image differs).
    plain = load_image(image)
    assert np.abs(plain - pixels).mean() > 2


def test_dbs_fits_each_fold_on_its_training_images_only(tmp_path, runner, cli, sites_data):
    work = tmp_path / "w"
    _ok(runner.invoke(cli, ["patches", str(sites_data), str(work / "subs"), "--manifest-only", "--workers", "1"]))
    _ok(runner.invoke(cli, ["folds", str(work / "subs"), str(work), "--by-site"]))
    _ok(runner.invoke(cli, ["dbs", str(work), "--images", str(sites_data), "--stain", "reinhard", "--workers", "1"]))
    records = [json.loads((work / f"stain_{k}.json").read_text()) for k in (1, 2)]
    for fold, record in enumerate(records, start=1):
        train = (work / f"train_w32_parent_{fold}.txt").read_text().split()
        test = (work / f"test_w32_parent_{fold}.txt").read_text().split()
        assert sorted(Path(p).relative_to(sites_data).as_posix() for p in record["fitted_on"]) == sorted(train)
        assert not set(test) & {Path(p).relative_to(sites_data).as_posix() for p in record["fitted_on"]}
    assert records[0]["target"] != records[1]["target"]  # trained on different sites
    dbs_record = json.loads((work / "dbs.json").read_text())
    assert dbs_record["dbs"]["DB_train_1"]["stain"]["target"] == records[0]["target"]
    built = (work / "DB_train_1").stat().st_mtime_ns
    _ok(runner.invoke(cli, ["dbs", str(work), "--images", str(sites_data), "--stain", "reinhard", "--workers", "1"]))
    assert (work / "DB_train_1").stat().st_mtime_ns == built  # same lists, same fitted targets: kept
    refused = runner.invoke(cli, ["dbs", str(work), "--images", str(sites_data), "--stain", "macenko"])
    assert refused.exit_code == 2 and "built with another stain normalisation" in refused.stderr
    bad = runner.invoke(cli, ["dbs", str(work), "--stain", "reinhard"])
    assert bad.exit_code == 2 and "--stain applies with --images" in bad.stderr
    bad = runner.invoke(cli, ["patches", str(sites_data), str(tmp_path / "p"), "--stain", "macenko"])
    assert bad.exit_code == 2 and "needs --stain-target" in bad.stderr
    bad = runner.invoke(cli, ["patches", str(sites_data), str(tmp_path / "p"), "--stain", "vahadane",
                              "--stain-target", str(work / "stain_1.json")])
    assert bad.exit_code == 2 and "valid: macenko, none, reinhard" in bad.stderr


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_run_with_stain_end_to_end_on_two_sites(tmp_path, runner, cli, sites_data, method):
    work = tmp_path / "w"
    args = ["run", str(work), "--data", str(sites_data), "--group-by", "site", "--k", "2", "--stain", method,
            "--max-iter", "4", "--set", "batch_size=32", "--set", "test_iter=1", "--workers", "1"]
    result = _ok(runner.invoke(cli, args))
    assert "accuracy" in result.output.lower()
    for fold in (1, 2):
        record = json.loads((work / f"stain_{fold}.json").read_text())
        assert record["method"] == method and record["fold"] == fold
        metrics = json.loads((work / "eval" / f"fold_{fold}" / "metrics.json").read_text())
        assert json.dumps(metrics).count(method) >= 1  # evaluation applied (and recorded) the fold's target
    again = _ok(runner.invoke(cli, args))
    assert "running" not in again.stderr  # every stage skipped
