"""Snapshot series, found one way: ``<prefix>_iter_<N>.<suffix>`` files of a folder by prefix and N.

A fold's folder may hold several series (the plain net and its ``_dropout`` variant); callers pick
theirs by prefix (training: the solver's own ``snapshot_prefix``; evaluation: the same, else the only one).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Union

from lymph_cv.workdir.layout import SNAPSHOT_PATTERN

PathLike = Union[str, os.PathLike]


def snapshot_series(folder: PathLike, suffix: str) -> Dict[str, Dict[int, Path]]:
    """``{prefix: {N: path}}`` of the ``<prefix>_iter_<N>.<suffix>`` files in ``folder`` (none when absent)."""
    folder = Path(folder)
    series: Dict[str, Dict[int, Path]] = {}
    for name in os.listdir(folder) if folder.is_dir() else ():
        match = SNAPSHOT_PATTERN.match(name)
        if match and match.group("suffix") == suffix:
            series.setdefault(match.group("prefix"), {})[int(match.group("iteration"))] = folder / name
    return series
