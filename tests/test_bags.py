"""Bags for MIL (issue 15): the lymphocytosis layout and its clinical CSV, bags from the patch manifest."""
from __future__ import annotations

import datetime as dt

import cv2
import numpy as np
import pytest

from lymph_cv.errors import ConfigError, InputError
from lymph_cv.stages import bags as bags_module
from lymph_cv.stages.bags import ClinicalScaler, bags_from_patches, load_bags, read_bags, write_bags
from lymph_cv.stages.patches import ImageEntry, Manifest, extract
from lymph_cv.stages.sources import data_source, input_fingerprint
from lymph_cv.stages.sources.patients import ClinicalColumns, parse_age

HEADER = "ID,LABEL,GENDER,DOB,LYMPH_COUNT\n"


def _patients(root, rows, images=2, csv_name="clinical.csv"):
    """``root`` with a folder of ``images`` small PNGs per row's patient and the CSV of ``rows``."""
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        ident = row.split(",")[0]
        (root / ident).mkdir(exist_ok=True)
        for i in range(images):
            cv2.imwrite(str(root / ident / f"{i:06d}.png"), np.full((8, 8, 3), 10 * i, np.uint8))
    (root / csv_name).write_text(HEADER + "".join(r + "\n" for r in rows))
    return root


ROWS = ["P1,0,M,3/21/1950,4.5", "P2,1,F,1960-01-01,30.2", "P3,1,f,61,12", "P4,0,m,01.07.1980,5"]


def test_load_bags_parses_the_clinical_csv(tmp_path):
    data = _patients(tmp_path / "data", ROWS)
    bag_set = load_bags(data, reference_date=dt.date(2021, 1, 1))
    assert [b.id for b in bag_set.bags] == ["P1", "P2", "P3", "P4"]
    assert [b.label for b in bag_set.bags] == [0, 1, 1, 0]
    assert [b.patient for b in bag_set.bags] == ["P1", "P2", "P3", "P4"]
    assert bag_set.kind == "patient" and bag_set.classes == ["reactive", "tumoral"]
    assert bag_set.clinical_columns == ["age", "lymph_count", "gender"]
    p1, p2, p3, p4 = bag_set.bags
    assert p1.clinical["age"] == pytest.approx((dt.date(2021, 1, 1) - dt.date(1950, 3, 21)).days / 365.25)
    assert p2.clinical["age"] == pytest.approx(61.0, abs=0.01)
    assert p3.clinical["age"] == 61.0  # an age, not a date
    assert p4.clinical["age"] == pytest.approx(40.5, abs=0.01)
    assert [b.clinical["gender"] for b in bag_set.bags] == [1.0, 0.0, 0.0, 1.0]
    assert p2.clinical["lymph_count"] == 30.2
    assert [i.path for i in p1.instances] == ["P1/000000.png", "P1/000001.png"]
    assert bag_set.record["reference_date"] == "2021-01-01" and bag_set.record["impute"] == "none"
    # the record round-trips, and the pixels are there
    back = read_bags(write_bags(tmp_path, bag_set))
    assert back.to_json() == bag_set.to_json()
    pixels = bags_module.instance_images(back, back.bags[0])
    assert [int(p[0, 0, 0]) for p in pixels] == [0, 10]
    # class names in LABEL, configurable column names, a dropped column
    data2 = tmp_path / "named"
    _patients(data2, ["A,tumoral,M,50,3"], csv_name="x.csv")
    (data2 / "x.csv").write_text("PID,Y,SEX,AGE,COUNT\nA,tumoral,M,50,3\n")
    named = load_bags(data2, columns=ClinicalColumns.parse({"id": "PID", "label": "Y", "gender": "", "dob": "AGE",
                                                           "count": "COUNT"}))
    assert named.bags[0].label == 1 and named.clinical_columns == ["age", "lymph_count"]
    assert named.bags[0].clinical == {"age": 50.0, "lymph_count": 3.0}


@pytest.mark.parametrize("row, words", [
    ("P9,0,M,1950-01-01,x", ["row 6, column LYMPH_COUNT", "'x' is not a non-negative number"]),
    ("P9,0,M,,4", ["row 6, column DOB", "missing"]),
    ("P9,0,Q,1950-01-01,4", ["row 6, column GENDER", "'Q' is not M or F"]),
    ("P9,0,M,31/31/1950,4", ["row 6, column DOB", "is not a date of birth"]),
    ("P9,0,M,1950-01-01,-3", ["row 6, column LYMPH_COUNT"]),
    ("P9,2,M,1950-01-01,4", ["row 6, column LABEL", "'2' is not a class"]),
    ("P1,0,M,1950-01-01,4", ["row 6, column ID", "already on row 2"]),
    (",0,M,1950-01-01,4", ["row 6, column ID", "empty patient id"]),
])
def test_each_bad_cell_is_one_line_naming_row_and_column(tmp_path, row, words, runner, cli):
    data = _patients(tmp_path / "data", ROWS)
    with open(data / "clinical.csv", "a") as handle:
        handle.write(row + "\n")
    if row.split(",")[0] not in ("", "P1"):
        _patients(tmp_path / "data", [row], images=1, csv_name="ignored.txt")
    with pytest.raises(InputError) as err:
        load_bags(data)
    message = str(err.value)
    assert "\n" not in message and "clinical.csv" in message
    for word in words:
        assert word in message


def test_layout_problems(tmp_path):
    data = _patients(tmp_path / "data", ROWS)
    (data / "P5").mkdir()
    cv2.imwrite(str(data / "P5" / "a.jpg"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="'P5' has no row in the clinical CSV"):
        load_bags(data)
    with open(data / "clinical.csv", "a") as handle:
        handle.write("P5,0,M,40,1\nP6,0,M,40,1\n")
    with pytest.raises(InputError, match="row 7, column ID: no patient folder 'P6'"):
        load_bags(data)
    (data / "P6").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_bags(data)
    (data / "other.csv").write_text(HEADER)
    with pytest.raises(InputError, match="2 clinical CSV file"):
        load_bags(data)
    (data / "bad.csv").write_text("ID,LABEL,GENDER\nP1,0,M\n")
    with pytest.raises(InputError, match=r"no column 'DOB' \(header: ID,LABEL,GENDER"):
        load_bags(data, clinical=data / "bad.csv")
    with pytest.raises(ConfigError, match="unknown column key 'sex'"):
        ClinicalColumns.parse({"sex": "S"})


def test_impute_median_uses_the_training_bags_only(tmp_path):
    rows = ["P1,0,M,40,1", "P2,1,F,50,", "P3,1,F,60,100", "P4,0,M,70,3", "P5,0,M,NA,5"]
    data = _patients(tmp_path / "data", rows)
    with pytest.raises(InputError, match="row 3, column LYMPH_COUNT: missing"):
        load_bags(data)
    bag_set = load_bags(data, impute="median")
    assert bag_set.record["impute"] == "median"
    assert [(c["row"], c["column"]) for c in bag_set.record["imputed"]] == [(3, "LYMPH_COUNT"), (6, "DOB")]
    p1, p2, p3, p4, p5 = bag_set.bags
    assert p2.clinical["lymph_count"] is None
    train = [p1, p2, p4, p5]  # P3's 100 must not move the fill
    features, scaler = bags_module.clinical_features(train, bag_set.bags, bag_set.clinical_columns)
    assert scaler.median == [50.0, 3.0, 1.0]
    filled = np.array([1, 3, 3, 5], float)
    assert features[1, 1] == pytest.approx((3 - filled.mean()) / filled.std())
    assert np.allclose(scaler.transform(train).mean(axis=0), 0, atol=1e-6)
    assert ClinicalScaler.from_json(scaler.to_json()) == scaler


def test_parse_age_forms():
    ref = dt.date(2020, 6, 1)
    assert parse_age("70", ref) == 70.0 and parse_age("45.5", ref) == 45.5
    assert parse_age("2000-06-01", ref) == pytest.approx(20.0, abs=0.01)
    assert parse_age("6/1/2000", ref) == pytest.approx(20.0, abs=0.01)
    assert parse_age("1/6/2000", ref) == pytest.approx(20.4, abs=0.01)  # slashes: month first
    assert parse_age("2030-01-01", ref) is None and parse_age("300", ref) is None and parse_age("soon", ref) is None


def test_bags_data_source(tmp_path):
    data = _patients(tmp_path / "data", ROWS)
    source = data_source("bags")
    found = source.scan(data, ("reactive", "tumoral"))
    assert [(s.path.parent.name, s.cls, s.label) for s in found][:3] == [("P1", "reactive", 0)] * 2 + [("P2", "tumoral", 1)]
    assert len(source.inputs(data, ())) == 1 + 2 * len(ROWS)
    before = input_fingerprint(data, (), "bags")
    (data / "clinical.csv").write_text(HEADER + "".join(r + "\n" for r in ROWS[:3]) + "P4,1,m,01.07.1980,5\n")
    assert input_fingerprint(data, (), "bags") != before


def _tutorial_manifest(data_dir, path=None) -> Manifest:
    images = [ImageEntry("CLL", 0, "sj-03-2810_001.tif", "sj-03-2810", 100, 140, 0),
              ImageEntry("CLL", 0, "sj-03-2810_002.tif", "sj-03-2810", 100, 140, 0),
              ImageEntry("FL", 1, "sj-05-5269-R10_001.tif", "sj-05-5269-R10", 100, 140, 0)]
    return Manifest(["CLL", "FL", "MCL"], images, data_dir=str(data_dir), path=path)


def test_bags_from_the_tutorial_manifest_by_image_and_case(tmp_path):
    manifest = _tutorial_manifest(tmp_path)
    by_image = bags_from_patches(manifest, "image")
    assert [b.id for b in by_image.bags] == ["CLL/sj-03-2810_001.tif", "CLL/sj-03-2810_002.tif", "FL/sj-05-5269-R10_001.tif"]
    assert [b.patient for b in by_image.bags] == ["sj-03-2810", "sj-03-2810", "sj-05-5269-R10"]
    assert by_image.kind == "image" and [b.label for b in by_image.bags] == [0, 0, 1]
    first = by_image.bags[0].instances
    assert len(first) == 2 * 4  # origins 1, 33 down, 1, 33, 65, 97 across; 0 degrees only
    assert (first[0].window.x, first[0].window.y, first[0].window.size, first[0].window.angle) == (1, 1, 36, 0)
    assert (first[1].window.x, first[1].window.y) == (33, 1)  # row-major as the patch numbers
    assert [i.patch for i in first[:2]] == ["sj-03-2810_001_sub_1.tif", "sj-03-2810_001_sub_3.tif"]
    by_case = bags_from_patches(manifest, "case", rotations=(0, 90))
    assert [(b.id, len(b.instances)) for b in by_case.bags] == [("sj-03-2810", 32), ("sj-05-5269-R10", 16)]
    assert by_case.bags[0].instances[1].patch == "sj-03-2810_001_sub_2.tif"
    back = read_bags(write_bags(tmp_path / "bags.json", by_case))
    assert back.to_json() == by_case.to_json() and back.bags[0].instances == by_case.bags[0].instances
    with pytest.raises(ConfigError, match="slide bags need the tile manifest"):
        bags_from_patches(manifest, "slide")
    mixed = _tutorial_manifest(tmp_path)
    mixed.images.append(ImageEntry("MCL", 2, "sj-03-2810_003.tif", "sj-03-2810", 100, 140, 0))
    with pytest.raises(InputError, match="'sj-03-2810' has images of several classes"):
        bags_from_patches(mixed, "case")


def test_instance_windows_are_the_patch_steps_patches(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (100, 140, 3), np.uint8)
    (tmp_path / "CLL").mkdir()
    cv2.imwrite(str(tmp_path / "CLL" / "sj-03-2810_001.tif"), image)
    manifest = Manifest(["CLL", "FL"], [ImageEntry("CLL", 0, "sj-03-2810_001.tif", "sj-03-2810", 100, 140, 16)],
                        data_dir=str(tmp_path))
    bag_set = bags_from_patches(manifest, "image", rotations=(0, 90))
    pixels = bags_module.instance_images(bag_set, bag_set.bags[0])
    assert np.array_equal(np.stack(pixels), extract(image))


def test_slide_bags_from_a_tile_manifest(tmp_path):
    from lymph_cv.stages import tiles

    slides_, all_tiles = [], []
    for cls, label, stem in (("CLL", 0, "sj-03-2810_001"), ("CLL", 0, "sj-03-2810_002"), ("FL", 1, "sj-05-1_001")):
        case = stem.rsplit("_", 1)[0]
        slides_.append(tiles.SlideRecord(stem, f"/slides/{stem}.svs", f"{stem}.svs", cls, label, case, 1000, 800,
                                         0.5, 0, 64, 2, 12, 0.3))
        for index in (1, 2):
            name = f"{stem}_sub_{index}.tif"
            cv2.imwrite(str(tmp_path / name), np.full((32, 32, 3), index, np.uint8))
            all_tiles.append(tiles.Tile(stem, f"/slides/{stem}.svs", cls, label, case, index, 0, 64 * index, 128, 64,
                                        64, 32, 1.0, 0.9, name))
    tile_set = tiles.TileSet(tiles.TileParams(size=32, mpp=1.0), ["CLL", "FL"], slides_, all_tiles)
    tiles.write_tile_set(tmp_path, tile_set)
    by_slide = bags_from_patches(tmp_path / "manifest.json", "slide")
    assert by_slide.kind == "slide" and [b.id for b in by_slide.bags] == ["sj-03-2810_001", "sj-03-2810_002", "sj-05-1_001"]
    assert [b.patient for b in by_slide.bags] == ["sj-03-2810", "sj-03-2810", "sj-05-1"]
    tile = by_slide.bags[0].instances[1]
    assert (tile.path, tile.parent, tile.window) == ("sj-03-2810_001_sub_2.tif", "/slides/sj-03-2810_001.svs",
                                                     bags_module.Window(128, 128, 64, 0))
    assert [int(p[0, 0, 0]) for p in bags_module.instance_images(by_slide, by_slide.bags[0])] == [1, 2]
    back = read_bags(write_bags(tmp_path / "bags.json", by_slide))
    assert back.bags[0].instances == by_slide.bags[0].instances
    by_case = bags_from_patches(tmp_path, "case")
    assert [(b.id, len(b.instances)) for b in by_case.bags] == [("sj-03-2810", 4), ("sj-05-1", 2)]
