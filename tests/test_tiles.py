"""The tile manifest contract (stages/tiles.py): planning tiles on the real Aperio SVS and a small
pyramidal TIFF, reading them back, the JSON/CSV round trip and the patch manifest `folds` reads."""
from __future__ import annotations

import numpy as np
import pytest

from lymph_cv.errors import ConfigError, FormatError, InputError
from lymph_cv.formats import slides
from lymph_cv.stages import folds, tiles
from lymph_cv.stages.patches import load_manifest
from testdata import wheel_file


def pyramid(path, mpp=0.5, side=2048, levels=(1, 2, 4), pink=(512, 1536)):
    """A generic tiled TIFF: glass with a pink square (a quarter of the slide), ``levels`` downsamples."""
    import tifffile

    rgb = np.full((side, side, 3), 245, np.uint8)
    rgb[pink[0]:pink[1], pink[0]:pink[1]] = (200, 80, 160)
    with tifffile.TiffWriter(path) as writer:
        for down in levels:
            kwargs = {} if mpp is None else {"resolutionunit": "CENTIMETER",
                                             "resolution": (1e4 / (mpp * down), 1e4 / (mpp * down))}
            writer.write(rgb[::down, ::down], tile=(256, 256), compression="deflate", photometric="rgb",
                         subfiletype=0 if down == 1 else 1, **kwargs)
    return path


def test_tiles_of_the_real_svs_are_on_tissue():
    svs = wheel_file("cmu_small_region.svs")  # 2220 x 2967 at 0.499 µm, one level
    record, planned, mask, geo = tiles.plan_slide(svs, tiles.TileParams(size=128, mpp=1.0, mask_side=1024),
                                                  cls="FL", label=1)
    assert geo.level == 0 and geo.extent == 257 and geo.read_size == 257 and geo.size == 128
    assert record.candidates == (2220 // 257) * (2967 // 257) and 0 < record.tiles < record.candidates
    assert all(t.tissue >= 0.5 for t in planned) and planned[0].name == "cmu_small_region_sub_1.tif"
    assert [t.index for t in planned] == list(range(1, len(planned) + 1))
    corner = 0.1 * 2220
    assert not any(t.x + t.extent < corner and t.y + t.extent < corner for t in planned)  # glass corner
    with slides.open_slide(svs) as slide:
        bgr = tiles.read_tile(slide, planned[0])
    assert bgr.shape == (128, 128, 3) and bgr.dtype == np.uint8
    assert bgr.mean() < 230  # stained, not glass
    loose = tiles.plan_tiles(svs, 128, mpp=1.0, min_tissue=0.0, mask=mask)
    assert len(loose) == record.candidates


def test_optical_density_finds_the_same_tissue_on_the_real_svs():
    from lymph_cv.stages import tissue

    svs = wheel_file("cmu_small_region.svs")
    by_saturation = tissue.detect_tissue(svs, max_side=1024)
    by_od = tissue.detect_tissue(svs, max_side=1024, method="od")
    assert 0.2 < by_od.fraction < 0.5  # the hand-set bounds of the saturation test (tests/test_slides.py)
    h, w = by_od.mask.shape
    corner = int(0.1 * min(h, w))
    assert not by_od.mask[-corner:, -corner:].any() and not by_od.mask[-corner:, :corner].any()
    assert (by_od.mask == by_saturation.mask).mean() > 0.9
    planned = tiles.plan_tiles(svs, 128, mpp=1.0, mask_side=1024, tissue_method="od")
    assert planned and all(t.tissue >= 0.5 for t in planned)
    with pytest.raises(ConfigError, match="--tissue-method"):
        tiles.TileParams(size=64, tissue_method="hue")


def test_best_level_and_the_manifest_round_trip(tmp_path):
    path = pyramid(tmp_path / "FL_case1_001.tif")
    record, planned, _, geo = tiles.plan_slide(path, tiles.TileParams(size=128, mpp=1.0, mask_side=512),
                                               cls="FL", label=1)
    assert (geo.level, geo.extent, geo.read_size) == (1, 256, 128)  # level 1 is 1 µm: read as is
    assert record.tiles == 16 and record.case == "FL_case1"  # the pink 1024² is 4 x 4 tiles of 256
    _, resized, _, geo = tiles.plan_slide(path, tiles.TileParams(size=256, mpp=0.5, resize=64, mask_side=512))
    assert (geo.level, geo.read_size, geo.size, geo.mpp) == (2, 64, 64, 2.0)
    _, strided, _, _ = tiles.plan_slide(path, tiles.TileParams(size=128, mpp=1.0, stride=64, mask_side=512))
    assert 7 * 7 <= len(strided) <= 9 * 9  # origins every 128 level-0 pixels: 7² inside the pink, edges
    with slides.open_slide(path) as slide:
        assert np.array_equal(tiles.read_tile(slide, planned[0])[0, 0], [160, 80, 200])  # BGR of the pink

    other = pyramid(tmp_path / "CLL_case2_001.tif", pink=(0, 1024))
    rec2, planned2, _, _ = tiles.plan_slide(other, tiles.TileParams(size=128, mpp=1.0, mask_side=512),
                                            cls="CLL", label=0)
    params = tiles.TileParams(size=128, mpp=1.0, mask_side=512)
    more = [tiles.plan_slide(pyramid(tmp_path / name, pink=(1024, 2048)), params, cls=cls, label=label)
            for name, cls, label in (("CLL_case3_001.tif", "CLL", 0), ("FL_case4_001.tif", "FL", 1))]
    tile_set = tiles.TileSet(params, ["CLL", "FL"], [rec2, more[0][0], record, more[1][0]],
                             planned2 + more[0][1] + planned + more[1][1], data=str(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    tiles.write_tile_set(out, tile_set)
    back = tiles.read_tile_set(out)
    assert back.tiles == tile_set.tiles and back.slides == tile_set.slides and back.params == tile_set.params
    manifest = load_manifest(out)
    assert manifest.total_patches == len(tile_set.tiles) and manifest.patch_size == 128
    assert manifest.images[0].patch_names()[0] == planned2[0].name
    fold_set = folds.make_folds(manifest, tmp_path / "work", k=2, group_by="image")
    listed = (tmp_path / "work" / "train_w32_1.txt").read_text() + (tmp_path / "work" / "test_w32_1.txt").read_text()
    assert len(listed.splitlines()) == manifest.total_patches and fold_set.k == 2


def test_bad_parameters_and_slides_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="--mpp"):
        tiles.TileParams(size=64, mpp=-1.0)
    with pytest.raises(ConfigError, match="alternatives"):
        tiles.TileParams(size=64, mpp=1.0, level=0)
    with pytest.raises(ConfigError, match="--min-tissue"):
        tiles.TileParams(size=64, min_tissue=1.5)
    bare = pyramid(tmp_path / "bare.tif", mpp=None, side=512, levels=(1,), pink=(0, 256))
    with pytest.raises(InputError, match="--level instead of --mpp"):
        tiles.plan_tiles(bare, 64, mpp=1.0)
    with pytest.raises(InputError, match="levels 0 to 0"):
        tiles.plan_tiles(bare, 64, level=3)
    assert len(tiles.plan_tiles(bare, 64, level=0, mask_side=256)) == 16
    table = tmp_path / "tiles.csv"
    table.write_text("slide,x\n")
    with pytest.raises(FormatError, match="header"):
        tiles.read_tiles_csv(table)


def slide_set(root, classes=("CLL", "FL")):
    """Two small pyramidal slides per class in DATA/<class>/."""
    for label, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for case in (1, 2):
            pyramid(root / cls / f"{cls}_case{case}_001.tif", side=1024, levels=(1, 2),
                    pink=(0, 512) if label == 0 else (256, 1024))
    return root


def test_tile_a_slide_set_to_files_then_resume_then_a_database(tmp_path, runner, cli, caplog):
    import logging

    from lymph_cv.formats import store
    from lymph_cv.stages import tiling

    data = slide_set(tmp_path / "data")
    out = tmp_path / "tiles"
    params = tiles.TileParams(size=64, mpp=1.0, mask_side=256)
    tile_set = tiling.tile_slides(data, out, params, classes=["CLL", "FL"], workers=2)
    assert [s.tiles for s in tile_set.slides] == [16, 16, 36, 36]  # 512² and 768² of pink, tiles of 128
    assert all((out / t.name).is_file() for t in tile_set.tiles)
    assert (out / "qc" / "CLL_case1_001_mask.png").is_file() and (out / "qc" / "FL_case2_001_grid.png").is_file()
    manifest = load_manifest(out)
    assert manifest.total_patches == 104 and [e.case for e in manifest.images][:2] == ["CLL_case1", "CLL_case2"]
    first = out / tile_set.tiles[0].name
    stamp = first.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = tiling.tile_slides(data, out, params, classes=["CLL", "FL"], workers=1)
    assert again.tiles == tile_set.tiles and first.stat().st_mtime_ns == stamp
    assert "4 slide(s) complete from an earlier run" in caplog.text
    fewer = tiling.tile_slides(data, out, tiles.TileParams(size=128, mpp=1.0, mask_side=256), classes=["CLL", "FL"],
                               workers=1, qc=False)
    assert fewer.slides[2].tiles == 9  # tiles of 256 level-0 pixels now: 3 x 3 in the pink
    assert len(list(out.glob("FL_case1_001_sub_*.tif"))) == fewer.slides[2].tiles  # no stale tile files

    partial = tiling.tile_slides(data, tmp_path / "db", params, classes=["CLL", "FL"], workers=1,
                                 db_backend="lmdb", only=[2], qc=False)
    assert partial is None and (tmp_path / "db" / "CLL_case2_001_lmdb").is_dir()
    assert not (tmp_path / "db" / "tiles.json").exists()
    result = runner.invoke(cli, ["slides", "tile", str(data), str(tmp_path / "db"), "--size", "64", "--mpp", "1",
                                 "--mask-side", "256", "--classes", "CLL,FL", "--db", "lmdb", "--no-qc"])
    assert result.exit_code == 0, result.output
    assert "4 slides, 104 tiles" in result.stdout
    with store.open_reader(tmp_path / "db" / "FL_case1_001_lmdb", "lmdb") as reader:
        keys = reader.keys()
    assert len(keys) == 36 and keys[0] == b"00000001_FL_case1_001_sub_1.tif"


def test_csv_layout_the_real_svs_and_bad_input(tmp_path, runner, cli):
    svs = wheel_file("cmu_small_region.svs")
    data = slide_set(tmp_path / "data")
    table = tmp_path / "slides.csv"
    table.write_text(f"slide,label,case\n{svs},FL,patient7\ndata/CLL/CLL_case1_001.tif,0\n")
    out = tmp_path / "out"
    target = wheel_file("target_image.png")
    result = runner.invoke(cli, ["slides", "tile", str(table), str(out), "--size", "128", "--mpp", "1",
                                 "--mask-side", "512", "--classes", "CLL,FL", "--workers", "1",
                                 "--stain", "reinhard", "--stain-target", str(target)])
    assert result.exit_code == 0, result.output
    tile_set = tiles.read_tile_set(out)
    assert tile_set.stain["method"] == "reinhard" and (out / "stain.json").is_file()
    assert load_manifest(out).stain["method"] == "reinhard"
    assert [s.slide for s in tile_set.slides] == ["CLL_case1_001", "cmu_small_region"]
    assert tile_set.slides[1].case == "patient7" and tile_set.slides[1].tiles > 20
    assert (out / "qc" / "cmu_small_region_grid.png").is_file()
    bad = tmp_path / "bad.csv"
    for text, message in ((f"{svs},XX\n", "label 'XX'"), ("missing.svs,FL\n", "no such slide file"),
                          (f"{svs}\n", "expected slide,label")):
        bad.write_text(text)
        result = runner.invoke(cli, ["slides", "tile", str(bad), str(out), "--size", "64", "--classes", "CLL,FL"])
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert str(bad) in result.stderr
    result = runner.invoke(cli, ["slides", "tile", str(data), str(tmp_path / "x"), "--size", "64", "--mpp", "0",
                                 "--classes", "CLL,FL"])
    assert result.exit_code == 2 and "--mpp" in result.stderr
    (data / "CLL" / "CLL_case1_001.tif").write_bytes(b"not a slide")
    result = runner.invoke(cli, ["slides", "tile", str(data), str(tmp_path / "x"), "--size", "64", "--classes", "CLL,FL"])
    assert result.exit_code == 2 and "CLL_case1_001.tif" in result.stderr and "not a" in result.stderr


def test_the_low_resolution_view_is_read_in_bands(tmp_path, monkeypatch):
    path = pyramid(tmp_path / "s.tif", side=1024, levels=(1,))
    with slides.open_slide(path) as slide:
        whole, _ = slides.read_low_resolution(slide, 300)
        monkeypatch.setattr(slides, "BAND_PIXELS", 1024 * 50)
        banded, down = slides.read_low_resolution(slide, 300)
    assert banded.shape == whole.shape == (300, 300, 3) and down == pytest.approx((1024 / 300,) * 2)
    assert np.abs(banded.astype(int) - whole).max() <= 60 and (banded != whole).mean() < 0.02


def test_synthetic_slides_open_in_openslide_and_tile(tmp_path, runner, cli):
    import json

    out = tmp_path / "slides"
    args = ["synth", "--layout", "slides", str(out), "--classes", "CLL,FL", "--per-class", "1", "--cases-per-class",
            "1", "--width", "1024", "--height", "768", "--workers", "1"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    paths = sorted(out.glob("*/*.tiff"))
    assert len(paths) == 2
    info = slides.slide_info(paths[0])
    assert info.vendor == "generic-tiff" and info.levels == 1 and info.dimensions[0] == (1024, 768)
    assert info.mpp_x == pytest.approx(0.5)
    record = json.loads((out / "synth.json").read_text())
    assert record["layout"] == "slides" and len(record["cases"]) == 2 and record["complete"]
    stamp = paths[0].stat().st_mtime_ns
    assert runner.invoke(cli, args).exit_code == 0 and paths[0].stat().st_mtime_ns == stamp  # kept
    big = tmp_path / "big"
    result = runner.invoke(cli, ["synth", "--layout", "slides", str(big), "--classes", "CLL,FL", "--per-class", "1",
                                 "--width", "1400", "--height", "600", "--slide-compression", "deflate", "--mpp",
                                 "0.25", "--workers", "1"])
    assert result.exit_code == 0, result.output
    info = slides.slide_info(sorted(big.glob("FL/*.tiff"))[0])
    assert info.levels == 2 and info.dimensions[1] == (700, 300) and info.mpp_x == pytest.approx(0.25)
    tile_set = tiles.read_tile_set(tmp_path / "t") if runner.invoke(cli, [
        "slides", "tile", str(out), str(tmp_path / "t"), "--size", "128", "--mpp", "1", "--classes", "CLL,FL",
        "--mask-side", "512", "--workers", "1"]).exit_code == 0 else None
    assert tile_set is not None and all(s.tiles > 0 for s in tile_set.slides)
    assert all(0.5 <= t.tissue <= 1.0 for t in tile_set.tiles)


def test_submit_stage_tiles_runs_one_task_per_slide(tmp_path, runner, cli):
    data = slide_set(tmp_path / "data")
    out = tmp_path / "tiles"
    tile_args = ["--", str(data), "--size", "64", "--mpp", "1", "--mask-side", "256", "--classes", "CLL,FL"]
    result = runner.invoke(cli, ["submit", str(out), "--stage", "tiles", "--scheduler", "slurm", "--dry-run",
                                 "--ppn", "1", *tile_args])
    assert result.exit_code == 0, result.output
    script = (out / "tiles_array.slurm").read_text()
    assert "#SBATCH --array=1-4" in script and script.count("--slide") == 4 and "sbatch" in result.stdout
    result = runner.invoke(cli, ["submit", str(out), "--stage", "tiles", "--scheduler", "pbs", "--dry-run", *tile_args])
    assert result.exit_code == 0 and "#PBS -t 1-4" in (out / "tiles_array.pbs").read_text()
    result = runner.invoke(cli, ["submit", str(out), "--stage", "tiles", "--scheduler", "local", "--ppn", "1",
                                 *tile_args])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("slide ") == 4
    result = runner.invoke(cli, ["jobs", str(out), "--all", "--wait", "--timeout", "240"])
    assert result.exit_code == 0, result.output
    tile_set = tiles.read_tile_set(out)
    assert [s.tiles for s in tile_set.slides] == [16, 16, 36, 36]
    bad = runner.invoke(cli, ["submit", str(out), "--stage", "tiles", "--scheduler", "local", "--", str(data),
                              "--size", "64", "--mpp", "-2", "--classes", "CLL,FL"])
    assert bad.exit_code == 2 and "--mpp" in bad.stderr


def test_folds_group_by_the_csv_case_column(tmp_path):
    params = tiles.TileParams(size=128, mpp=1.0, mask_side=512)
    records, planned = [], []
    for name, cls, label, case in (("a.tif", "CLL", 0, "p1"), ("b.tif", "CLL", 0, "p1"), ("c.tif", "CLL", 0, "p2"),
                                   ("d.tif", "FL", 1, "p3"), ("e.tif", "FL", 1, "p4")):
        record, found, _, _ = tiles.plan_slide(pyramid(tmp_path / name, side=512, levels=(1,), pink=(0, 256)),
                                               params, cls=cls, label=label, case=case)
        records.append(record)
        planned += found
    out = tmp_path / "out"
    out.mkdir()
    tiles.write_tile_set(out, tiles.TileSet(params, ["CLL", "FL"], records, planned))
    fold_set = folds.make_folds(out, tmp_path / "work", k=2, group_by="case")
    for fold in fold_set.folds:
        names = {e.name for e in fold.test}
        assert ({"a.tif", "b.tif"} <= names) or not ({"a.tif", "b.tif"} & names)  # case p1 kept together


def test_databases_straight_from_the_slides_equal_those_of_the_tile_files(tmp_path):
    from lymph_cv.formats import store
    from lymph_cv.stages import tiling
    from lymph_cv.stages.dbs import build_dbs

    data = slide_set(tmp_path / "data")
    params = tiles.TileParams(size=64, mpp=1.0, mask_side=256)
    contents = []
    for name, write in (("files", True), ("direct", False)):
        work = tmp_path / name
        tile_set = tiling.tile_slides(data, work / "subs", params, classes=["CLL", "FL"], workers=1, qc=False,
                                      write_tiles=write)
        assert tile_set.files is write and any((work / "subs").glob("*_sub_1.tif")) is write
        folds.make_folds(work / "subs", work, k=2, group_by="case")
        build_dbs(work, folds=[1], backend="lmdb", workers=1, images=None if write else data)
        with store.open_reader(work / "DB_train_1", "lmdb") as reader:
            contents.append(dict(iter(reader)))
    assert len(contents[0]) > 0 and contents[0] == contents[1]


def test_a_tiling_killed_after_a_slide_resumes_with_that_slide_kept(tmp_path):
    import os
    import subprocess
    import sys

    data = slide_set(tmp_path / "data")
    out = tmp_path / "tiles"
    argv = [sys.executable, "-m", "lymph_cv", "slides", "tile", str(data), str(out), "--size", "64", "--mpp", "1",
            "--mask-side", "256", "--classes", "CLL,FL", "--workers", "1", "--no-qc"]
    killed = subprocess.run(argv, env={**os.environ, "LYMPH_CV_FAULT": "kill@tiles:slide#1"}, capture_output=True,
                            text=True)
    assert killed.returncode != 0 and not (out / "tiles.json").exists()
    assert [p.name for p in (out / ".tiles").glob("*.json")] == ["CLL_case1_001.json"]
    resumed = subprocess.run(argv, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 slide(s) complete from an earlier run" in resumed.stderr
    assert tiles.read_tile_set(out).slides[0].tiles == 16


def test_a_tile_outside_its_slide_is_refused(tmp_path):
    import dataclasses

    path = pyramid(tmp_path / "CLL_case1_001.tif", side=1024, levels=(1, 2), pink=(0, 512))
    params = tiles.TileParams(size=64, mpp=1.0, mask_side=256)
    record, planned, _, _ = tiles.plan_slide(path, params, cls="CLL", label=0)
    edge = dataclasses.replace(planned[0], x=1024 - planned[0].extent)  # the last whole tile: still inside
    with slides.open_slide(path) as slide:
        assert tiles.read_tile(slide, edge).shape == (64, 64, 3)
        for tile in (dataclasses.replace(edge, x=edge.x + 1), dataclasses.replace(planned[0], y=-1)):
            with pytest.raises(InputError) as info:
                tiles.read_tile(slide, tile)
            assert str(info.value) == (f"{path}: tile 1 ({tile.name}: x {tile.x}, y {tile.y}, extent 128) lies "
                                       "outside the slide's 1024x1024 level-0 pixels")
        with pytest.raises(InputError, match=r"tile 1 \(.*\) is read at level 2; the slide has levels 0 to 1"):
            tiles.read_tile(slide, dataclasses.replace(planned[0], level=2))

    out = tmp_path / "out"
    out.mkdir()
    tiles.write_tile_set(out, tiles.TileSet(params, ["CLL"], [record], planned))
    table = out / "tiles.csv"
    lines = table.read_text().splitlines(keepends=True)
    row = lines[3].split(",")
    row[tiles.TILE_COLUMNS.index("x")] = "2000"  # a hand edit past the slide's right edge
    lines[3] = ",".join(row)
    table.write_text("".join(lines))
    with pytest.raises(FormatError) as info:
        tiles.read_tile_set(out)
    assert str(info.value) == (f"{table}: line 4: tile 3 ({planned[2].name}: x 2000, y {planned[2].y}, extent 128) "
                               "lies outside slide 'CLL_case1_001', 1024x1024 level-0 pixels in tiles.json")


def test_a_tile_set_read_against_another_slide_is_one_line(tmp_path, runner, cli):
    data = slide_set(tmp_path / "data")
    work = tmp_path / "work"
    result = runner.invoke(cli, ["slides", "tile", str(data), str(work / "subs"), "--size", "64", "--mpp", "1",
                                 "--mask-side", "256", "--classes", "CLL,FL", "--workers", "1", "--no-qc",
                                 "--manifest-only"])
    assert result.exit_code == 0, result.output
    folds.make_folds(work / "subs", work, k=2, group_by="case")
    smaller = data / "FL" / "FL_case1_001.tif"  # replaced by a smaller slide: its tiles reach past it
    pyramid(smaller, side=512, levels=(1, 2), pink=(0, 512))
    result = runner.invoke(cli, ["dbs", str(work), "--images", str(data), "--backend", "lmdb", "--workers", "1"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {smaller}: tile ") and "outside the slide's 512x512 level-0 pixels" in lines[0]
    assert not list(work.glob("DB_*"))
