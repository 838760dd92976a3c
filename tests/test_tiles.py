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
