"""The aggregation and data-source registries: lookups, errors listing the valid names, registration."""
from __future__ import annotations

import numpy as np
import pytest

from lymph_cv.errors import ConfigError
from lymph_cv.stages import aggregate, sources
from lymph_cv.pipeline import input_fingerprint


def test_aggregation_registry_lists_and_takes_new_entries():
    assert aggregate.aggregation_choices()[:3] == ["vote", "mean", "topk:K"]

    @aggregate.register("max")
    def top_window(window_probs, argument):
        return window_probs.max(axis=0).astype(np.float64)

    try:
        chosen = aggregate.parse_aggregate("max")
        assert str(chosen) == "max"
        probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
        assert aggregate.aggregate_scores(probs, chosen).tolist() == [0.9, 0.8]
        with pytest.raises(ConfigError, match=r"unknown aggregation 'max:2' \(valid: vote, mean, topk:K, max\)"):
            aggregate.parse_aggregate("max:2")
    finally:
        del aggregate.AGGREGATIONS.entries["max"]


def test_data_source_lookup_names_the_valid_ones():
    assert sources.data_source("folders").__name__ == "ImageFolders"
    assert sources.data_source("slides").__name__ == "Slides"
    with pytest.raises(ConfigError, match=r"unknown data source 'scans' \(valid: folders, bags, slides"):
        sources.data_source("scans")


def test_fingerprint_covers_every_file_the_scan_takes(tmp_path):
    """It hashed only known image suffixes, while the scan takes every non-hidden file."""
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}_001.tif").write_bytes(b"1")
    odd = tmp_path / "B" / "y_001.webp"
    odd.write_bytes(b"2")
    (tmp_path / "B" / ".hidden").write_bytes(b"3")
    scanned = [image.path for image in sources.data_source().scan(tmp_path, ["A", "B"])]
    assert scanned == sources.data_source().inputs(tmp_path, ["A", "B"]) and odd in scanned
    before = input_fingerprint(tmp_path, ["A", "B"])
    odd.write_bytes(b"22")
    assert input_fingerprint(tmp_path, ["A", "B"]) != before
    changed = input_fingerprint(tmp_path, ["A", "B"])
    (tmp_path / "B" / ".hidden").write_bytes(b"33")  # not read by the scan: the run stays valid
    assert input_fingerprint(tmp_path, ["A", "B"]) == changed
