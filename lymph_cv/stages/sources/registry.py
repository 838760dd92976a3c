"""The data-source registry: name → how a data set's images are found.

A data source turns a data folder and the class names into :class:`SourceImage` s (``scan``) and names
every file a scan reads (``inputs``, which the run's input fingerprint hashes, so any change to them
invalidates the run).  To add one, write a module in this package with a class decorated
``@register("name")`` (as :mod:`.folders`) and import it in ``__init__.py``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Protocol, Sequence, Type

from lymph_cv.core.registry import Registry


@dataclass(frozen=True)
class SourceImage:
    """One image of a data set: its file, class name and label."""

    path: Path
    cls: str
    label: int


class DataSource(Protocol):
    """What a registered data-source class provides."""

    @staticmethod
    def scan(data_dir: Path, classes: Sequence[str]) -> List[SourceImage]:
        """Every image, class by class in label order; InputError naming what is missing or unusable."""

    @staticmethod
    def inputs(data_dir: Path, classes: Sequence[str]) -> List[Path]:
        """Every file :meth:`scan` would read (what is there now; never an error)."""


#: Registered name → data-source class.
SOURCES: Registry[Type[DataSource]] = Registry("data source")
#: Class decorator adding a data source under a name.
register = SOURCES.register
#: The tutorial's layout: one folder of images per class.
DEFAULT_SOURCE = "folders"


def data_source(name: str = DEFAULT_SOURCE) -> Type[DataSource]:
    """The registered data source ``name``; ConfigError listing the valid ones."""
    return SOURCES.lookup(name)


def input_fingerprint(data_dir: Path, classes: Sequence[str], source: str = DEFAULT_SOURCE) -> str:
    """A digest of the names, sizes and modification times of every file the data source's scan reads."""
    rows = []
    for path in data_source(source).inputs(Path(data_dir), classes):
        stat = path.stat()
        rows.append((path.parent.name, path.name, stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
