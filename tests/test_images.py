"""core.images: the one image reader (BGR uint8, [0, 1] floats, grayscale) and its colour-transform hook."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lymph_cv.core.images import read_gray, read_image, read_unit
from lymph_cv.errors import InputError


@pytest.mark.parametrize("kind, conversion", [("bgr", None), ("gray", "grayscale"), ("rgba", "RGBA"), ("deep", "16-bit 3-channel")])
def test_read_image_is_opencv_colour_imread(tmp_path, kind, conversion):
    rng = np.random.default_rng(0)
    pixels = {"bgr": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
              "gray": rng.integers(0, 256, (5, 7), dtype=np.uint8),
              "rgba": rng.integers(0, 256, (5, 7, 4), dtype=np.uint8),
              "deep": rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)}[kind]
    path = tmp_path / f"{kind}.png"
    cv2.imwrite(str(path), pixels)
    read = read_image(path)
    assert read.conversion == conversion
    assert read.bgr.dtype == np.uint8 and np.array_equal(read.bgr, cv2.imread(str(path), cv2.IMREAD_COLOR))
    assert np.array_equal(read_gray(path), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    unit = read_unit(path)
    assert unit.dtype == np.float32 and unit.shape == (5, 7, 3)
    if kind == "deep":  # 16 bits kept: u / 65535, not OpenCV's 8-bit version
        assert np.array_equal(unit, (pixels / 65535.0).astype(np.float32))
    else:
        assert np.array_equal(unit, (read.bgr / 255.0).astype(np.float32))


def test_colour_transform_applies_to_every_reader(tmp_path):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.full((4, 4, 3), 10, np.uint8))

    def brighten(bgr):
        return bgr + np.uint8(40)

    assert np.all(read_image(path, brighten).bgr == 50)
    assert np.allclose(read_unit(path, brighten), 50 / 255.0)
    assert np.all(read_gray(path, brighten) == 50)
    with pytest.raises(InputError, match="colour transform returned"):
        read_image(path, lambda bgr: bgr.astype(np.float32))


def test_bad_files_are_one_input_error(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "text.tif").write_text("not an image")
    for name, words in (("missing.tif", "image not found"), ("empty.tif", "empty file"), ("text.tif", "not an image")):
        with pytest.raises(InputError, match=words) as caught:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value)
