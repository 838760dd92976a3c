"""Whole-slide reading (OpenSlide) and tissue detection, on the real Aperio SVS of tests/testdata.py
and on small synthetic views."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from lymph_cv.errors import FormatError, InputError
from lymph_cv.formats import slides
from lymph_cv.stages import tissue
from testdata import wheel_file

#: Share of each side taken as a corner: the SVS's corners are glass (one fleck touches the top left).
CORNER = 0.1
#: The hand-set bounds: the tissue strip covers about a third of the region.
TISSUE_RANGE = (0.2, 0.5)


@pytest.fixture(scope="module")
def svs():
    return wheel_file("cmu_small_region.svs")


def test_info_of_the_real_svs(runner, cli, svs):
    result = runner.invoke(cli, ["slides", "info", str(svs), "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["vendor"] == "aperio"
    assert info["levels"] == 1 and info["dimensions"] == [[2220, 2967]] and info["downsamples"] == [1.0]
    assert info["mpp_x"] == pytest.approx(0.499) and info["mpp_y"] == pytest.approx(0.499)
    assert info["objective_power"] == 20
    text = runner.invoke(cli, ["slides", "info", str(svs)])
    assert text.exit_code == 0 and "level 0: 2220 x 2967" in text.stdout and "0.499 x 0.499" in text.stdout


def test_tissue_of_the_real_svs(runner, cli, svs, tmp_path):
    found = tissue.detect_tissue(svs, max_side=1024)
    height, width = found.mask.shape
    assert max(height, width) == 1024 and found.downsample == pytest.approx((2220 / width, 2967 / height))
    assert TISSUE_RANGE[0] < found.fraction < TISSUE_RANGE[1]
    ch, cw = int(height * CORNER), int(width * CORNER)
    corners = [found.mask[:ch, :cw], found.mask[:ch, -cw:], found.mask[-ch:, :cw], found.mask[-ch:, -cw:]]
    assert max(c.mean() for c in corners) < 0.05 and sum(c.mean() == 0 for c in corners) >= 3
    fractions = found.tile_fractions(512)
    assert fractions.shape == (2967 // 512, 2220 // 512)
    assert fractions.min() == 0.0 and fractions.max() > 0.9
    png = tmp_path / "mask.png"
    result = runner.invoke(cli, ["slides", "tissue", str(svs), "--side", "1024", "--mask", str(png), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tissue_fraction"] == pytest.approx(found.fraction, abs=1e-6)
    assert np.array_equal(cv2.imread(str(png), cv2.IMREAD_UNCHANGED) > 0, found.mask)


def test_a_non_slide_is_one_error_line(runner, cli, tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide\n")
    for args in (["slides", "info", str(bad)], ["slides", "tissue", str(bad)],
                 ["slides", "info", str(tmp_path / "missing.svs")]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path) in lines[0], result.stderr
    with pytest.raises(FormatError):
        slides.open_slide(bad)
    with pytest.raises(InputError):
        slides.open_slide(tmp_path)


def _view(size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A white view with a pink disc holding a 6x6 hole, a 6x6 pink speck, and the truth mask."""
    rgb = np.full((size, size, 3), 245, np.uint8)
    truth = np.zeros((size, size), bool)
    cv2.circle(rgb, (100, 100), 50, (200, 80, 160), -1)
    cv2.circle(truth.view(np.uint8), (100, 100), 50, 1, -1)
    rgb[97:103, 97:103] = 245  # a hole, filled
    rgb[10:16, 10:16] = (200, 80, 160)  # a speck, dropped
    return rgb, truth


def test_specks_dropped_and_holes_filled():
    rgb, truth = _view()
    mask, threshold = tissue.tissue_mask(rgb, min_object=1e-3, min_hole=1e-3)
    assert threshold >= tissue.MIN_SATURATION
    assert not mask[10:16, 10:16].any() and mask[97:103, 97:103].all()
    assert (mask != truth).mean() < 0.01
    kept, _ = tissue.tissue_mask(rgb, min_object=0.0, min_hole=0.0)
    assert kept[11:15, 11:15].all() and not kept[98:102, 98:102].any()
    blank, _ = tissue.tissue_mask(np.full((50, 50, 3), 240, np.uint8) + np.random.default_rng(0).integers(
        0, 8, (50, 50, 3), dtype=np.uint8))
    assert not blank.any()  # sensor noise on glass is no tissue (the saturation floor)


def test_tile_fractions_are_mask_means():
    mask = np.zeros((40, 60), bool)
    mask[:20, :30] = True
    found = tissue.TissueMask(mask=mask, downsample=(4.0, 4.0), threshold=0.0)
    fractions = found.tile_fractions(80)  # 20 mask pixels per tile
    assert fractions.shape == (2, 3)
    assert fractions.tolist() == [[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]
    assert found.tile_fractions(40, stride=120).shape == (2, 2)


def test_a_pyramidal_tiff_is_read_from_its_smallest_sufficient_level(tmp_path):
    import tifffile

    rgb = np.full((2048, 2048, 3), 245, np.uint8)
    rgb[512:1536, 512:1536] = (200, 80, 160)  # a pink square: tissue, a quarter of the slide
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as writer:
        for down in (1, 2, 4):
            writer.write(rgb[::down, ::down], tile=(256, 256), compression="deflate", photometric="rgb",
                         subfiletype=0 if down == 1 else 1, resolutionunit="CENTIMETER",
                         resolution=(1e4 / (0.5 * down), 1e4 / (0.5 * down)))
    info = slides.slide_info(path)
    assert info.vendor == "generic-tiff" and info.levels == 3 and info.downsamples == (1.0, 2.0, 4.0)
    assert info.dimensions[2] == (512, 512) and info.mpp_x == pytest.approx(0.5)
    with slides.open_slide(path) as slide:
        assert [slides.level_for_side(slide, side) for side in (4096, 1024, 600, 100)] == [0, 1, 1, 2]
    found = tissue.detect_tissue(path, max_side=500)
    assert found.mask.shape == (500, 500) and found.fraction == pytest.approx(0.25, abs=0.01)
    fractions = found.tile_fractions(512)
    assert np.allclose(fractions, np.pad(np.ones((2, 2)), 1), atol=0.02)


def test_transparent_pixels_become_white_glass():
    from PIL import Image

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[..., 3] = [[255, 0], [128, 255]]
    assert slides.rgb_of(Image.fromarray(rgba, "RGBA"))[..., 0].tolist() == [[100, 255], [177, 100]]
