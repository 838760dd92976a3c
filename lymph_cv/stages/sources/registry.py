"""The data-source registry: name → how a data set's images are found.

A data source turns a data folder and the class names into :class:`SourceImage` s (``scan``) and names
every file a scan reads (``inputs``, which the run's input fingerprint hashes, so any change to them
invalidates the run).  To add one, write a module in this package with a class decorated
``@register("name")`` (as :mod:`.folders`) and import it in ``__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Protocol, Sequence, Type

from lymph_cv.errors import ConfigError


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
SOURCES: Dict[str, Type[DataSource]] = {}
#: The tutorial's layout: one folder of images per class.
DEFAULT_SOURCE = "folders"


def register(name: str) -> Callable[[Type[DataSource]], Type[DataSource]]:
    """Class decorator adding a data source to :data:`SOURCES` under ``name``."""

    def decorate(cls: Type[DataSource]) -> Type[DataSource]:
        SOURCES[name] = cls
        return cls

    return decorate


def data_source(name: str = DEFAULT_SOURCE) -> Type[DataSource]:
    """The registered data source ``name``; ConfigError listing the valid ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"unknown data source {name!r}", valid=sorted(SOURCES)) from None
