"""Step 1: window grid, rotations, names, manifest, resumability and bad images."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from lymph_cv.stages import patches
from lymph_cv.errors import InputError


def _dataset(root, sizes=((200, 300), (200, 300)), classes=("CLL", "FL", "MCL"), seed=0):
    """Random-pixel images named like the real ones: ``root/<class>/sj-0N-<k>_00<i>.tif``."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes, start=1):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            cv2.imwrite(str(root / name / f"sj-0{label + 3}-{100 + label}_{i:03d}.tif"), image)
    return root


def test_window_origins_follow_matlab_loops():
    # Matlab: for rr = 1:32:H-36, cc = 1:32:W-36 → 0-based window start (rr, cc).
    for height, width in [(200, 300), (1040, 1388), (37, 37), (36, 100), (68, 69), (69, 69)]:
        expected = [(rr, cc) for rr in range(1, height - 36 + 1, 32) for cc in range(1, width - 36 + 1, 32)]
        assert [tuple(o) for o in patches.window_origins(height, width)] == expected
    assert len(patches.window_origins(1040, 1388)) == 32 * 43
    assert patches.patch_count(200, 300) == 2 * 6 * 9
    assert len(patches.window_origins(36, 100)) == 0


def test_extract_order_and_rotation():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (100, 140, 3), dtype=np.uint8)
    out = patches.extract(image)
    origins = patches.window_origins(100, 140)
    assert out.shape == (2 * len(origins), 36, 36, 3)
    for w, (r, c) in enumerate(origins):
        window = image[r : r + 36, c : c + 36]
        assert np.array_equal(out[2 * w], window)  # patch 2w+1: 0°
        assert np.array_equal(out[2 * w + 1], np.rot90(window))  # patch 2w+2: 90° counter-clockwise
    # Counter-clockwise: the top-right pixel moves to the top-left.
    assert np.array_equal(out[1][0, 0], image[1, 36])


def test_extract_patches_files_and_manifest(tmp_path):
    data = _dataset(tmp_path / "data")
    manifest = patches.extract_patches(data, tmp_path / "subs", workers=2, write_mat=True)
    per_image = patches.patch_count(200, 300)
    assert manifest.total_patches == 6 * per_image
    files = {p.name for p in (tmp_path / "subs").glob("*.tif")}
    assert len(files) == 6 * per_image
    first = manifest.images[0]
    assert first.name == "sj-03-100_001.tif" and first.case == "sj-03-100" and first.label == 0
    assert first.patch_names()[:2] == ["sj-03-100_001_sub_1.tif", "sj-03-100_001_sub_2.tif"]
    source = cv2.imread(str(data / "CLL" / first.name))
    one = cv2.imread(str(tmp_path / "subs" / "sj-03-100_001_sub_1.tif"))
    two = cv2.imread(str(tmp_path / "subs" / "sj-03-100_001_sub_2.tif"))
    assert np.array_equal(one, source[1:37, 1:37]) and np.array_equal(two, np.rot90(one))
    last = cv2.imread(str(tmp_path / "subs" / f"sj-03-100_001_sub_{per_image - 1}.tif"))
    assert np.array_equal(last, source[161:197, 257:293])
    obj = json.loads((tmp_path / "subs" / "manifest.json").read_text())
    assert obj["tree"]["FL"]["cases"]["sj-04-101"]["sj-04-101_002.tif"]["patches"] == per_image
    again = patches.load_manifest(tmp_path / "subs")
    assert again.images == manifest.images and again.classes == ["CLL", "FL", "MCL"]
    from scipy.io import loadmat

    mat = loadmat(tmp_path / "subs" / "class_struct.mat")["class_struct"]
    fl = mat[0, 1]
    assert fl["base"][0, 0][0] == "sj-04-101_001"
    assert fl["sub_file"][0, 0]["fnames_subs"][0, 0][0, 1][0] == "sj-04-101_001_sub_2.tif"


def test_rerun_skips_complete_images_and_redoes_incomplete(tmp_path):
    data = _dataset(tmp_path / "data", sizes=((80, 80),))
    patches.extract_patches(data, tmp_path / "subs", workers=1)
    kept = tmp_path / "subs" / "sj-03-100_001_sub_1.tif"
    stamp = kept.stat().st_mtime_ns
    missing = tmp_path / "subs" / "sj-04-101_001_sub_3.tif"
    missing.unlink()
    patches.extract_patches(data, tmp_path / "subs", workers=1)
    assert kept.stat().st_mtime_ns == stamp and missing.is_file()
    assert not [p for p in (tmp_path / "subs").iterdir() if p.name.startswith(".") and p.name != patches.PARAMS_NAME]
    # Another window size rewrites the files under the same names (they were kept before).
    patches.extract_patches(data, tmp_path / "subs", workers=1, patch_size=34)
    assert cv2.imread(str(kept)).shape == (34, 34, 3)
    # A source image replaced under the same name is cut again; the others are kept.
    other = tmp_path / "subs" / "sj-04-101_001_sub_1.tif"
    stamp, other_stamp = kept.stat().st_mtime_ns, other.stat().st_mtime_ns
    source = data / "CLL" / "sj-03-100_001.tif"
    cv2.imwrite(str(source), 255 - cv2.imread(str(source)))
    patches.extract_patches(data, tmp_path / "subs", workers=1, patch_size=34)
    assert kept.stat().st_mtime_ns != stamp and other.stat().st_mtime_ns == other_stamp


def test_case_regex():
    assert patches.case_of("sj-05-5269-R10_012") == "sj-05-5269-R10"
    assert patches.case_of("sj-03-2810_001") == "sj-03-2810"
    assert patches.case_of("nonumber") == "nonumber"
    assert patches.case_of("A12-x", r"^([A-Z]\d+)") == "A12"


@pytest.mark.parametrize(
    "kind, expected",
    [("gray", "grayscale"), ("rgba", "RGBA"), ("16bit", "16-bit")],
)
def test_odd_images_converted_like_opencv(tmp_path, kind, expected, caplog):
    data = _dataset(tmp_path / "data", sizes=((80, 80),))
    rng = np.random.default_rng(2)
    odd = data / "FL" / "sj-09-1_002.png"
    image = {
        "gray": rng.integers(0, 256, (80, 80), dtype=np.uint8),
        "rgba": rng.integers(0, 256, (80, 80, 4), dtype=np.uint8),
        "16bit": rng.integers(0, 65536, (80, 80, 3), dtype=np.uint16),
    }[kind]
    cv2.imwrite(str(odd), image)
    manifest = patches.extract_patches(data, tmp_path / "subs", workers=1)
    assert len(manifest.images) == 4
    ours = cv2.imread(str(tmp_path / "subs" / "sj-09-1_002_sub_1.tif"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(ours, cv2.imread(str(odd), cv2.IMREAD_COLOR)[1:37, 1:37])
    warnings = [r.getMessage() for r in caplog.records if "image(s) converted" in r.getMessage()]
    assert len(warnings) == 1 and expected in warnings[0]


def _bad_file(data, kind):
    target = data / "MCL" / "sj-05-102_009.tif"
    if kind == "truncated":
        good = (data / "MCL" / "sj-05-102_001.tif").read_bytes()
        target.write_bytes(good[: len(good) // 3])
    elif kind == "not-an-image":
        target.write_text("this is not an image\n")
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "too-small":
        cv2.imwrite(str(target), np.zeros((36, 200, 3), np.uint8))
    return target


@pytest.mark.parametrize("kind, words", [
    ("truncated", "not an image"), ("not-an-image", "not an image"), ("empty", "empty file"), ("too-small", "smaller than one patch"),
])
def test_bad_images(tmp_path, runner, cli, kind, words, caplog):
    data = _dataset(tmp_path / "data", sizes=((80, 80),))
    target = _bad_file(data, kind)
    result = runner.invoke(cli, ["patches", str(data), str(tmp_path / "subs"), "--workers", "1"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and words in lines[0]
    assert not (tmp_path / "subs" / "manifest.json").exists()
    skipped = runner.invoke(cli, ["patches", str(data), str(tmp_path / "subs"), "--workers", "1", "--skip-bad"])
    assert skipped.exit_code == 0, skipped.stderr
    assert any("1 bad input(s) skipped" in r.getMessage() for r in caplog.records)
    assert len(patches.load_manifest(tmp_path / "subs").images) == 3


def test_empty_or_missing_class_folder(tmp_path, runner, cli):
    data = _dataset(tmp_path / "data", sizes=((80, 80),), classes=("CLL", "FL"))
    (data / "MCL").mkdir()
    result = runner.invoke(cli, ["patches", str(data), str(tmp_path / "subs")])
    assert result.exit_code == 2 and "empty class folder" in result.stderr and "MCL" in result.stderr
    result = runner.invoke(cli, ["patches", str(data), str(tmp_path / "subs"), "--classes", "CLL,XX"])
    assert result.exit_code == 2 and "class folder missing" in result.stderr and "XX" in result.stderr
    with pytest.raises(InputError, match="empty class folder"):
        patches.scan_images(data)
    (data / "MCL" / "sj-05\n1_001.tif").write_bytes((data / "CLL" / "sj-03-100_001.tif").read_bytes())
    result = runner.invoke(cli, ["patches", str(data), str(tmp_path / "subs")])
    assert result.exit_code == 2 and result.stderr == f"error: {data / 'MCL'}: image name 'sj-05\\n1_001.tif' holds a line break; rename it\n"
    os.rename(data / "MCL" / "sj-05\n1_001.tif", os.fsdecode(os.fsencode(data / "MCL") + b"/sj-05\xff_001.tif"))
    result = runner.invoke(cli, ["patches", str(data), str(tmp_path / "subs")])
    assert result.exit_code == 2 and "is not valid UTF-8; rename it" in result.stderr


def test_cli_patches(tmp_path, runner, cli):
    data = _dataset(tmp_path / "data", sizes=((80, 80),))
    result = runner.invoke(cli, ["patches", str(data), str(tmp_path / "subs"), "--workers", "1"])
    assert result.exit_code == 0, result.stderr
    assert "3 images" in result.output and "24 patches" in result.output


def test_no_space_left_for_patches(tmp_path, runner, cli, monkeypatch):
    import errno
    import os

    data = _dataset(tmp_path / "data", sizes=((80, 80),))

    def full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(patches.os, "replace", full)
    result = runner.invoke(cli, ["patches", str(data), str(tmp_path / "subs"), "--workers", "1"])
    assert result.exit_code == 2
    # the file that failed is named (was: the folder)
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'subs' / 'sj-03-100_001_sub_1.tif'}: no space left on device"]
    assert not (tmp_path / "subs").exists()  # no temporaries, no patches, no manifest (nor the folder)
