"""The aggregation registry: name → how window probabilities become per-class image scores.

To add an aggregation, write one module in this package with a class decorated ``@register("name")``
(``syntax``, ``parse`` and ``scores``, as :mod:`.topk`) and import it in ``__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Type

import numpy as np

from lymph_cv.errors import ConfigError


class Aggregation(Protocol):
    """What a registered aggregation class provides."""

    #: How the option is written, e.g. ``topk:K`` (listed in errors and help).
    syntax: str

    @staticmethod
    def parse(argument: Optional[str]) -> int:
        """The aggregation's integer argument from the text after ``name:`` (None: no colon); ValueError
        when it takes none or the text is not one."""

    @staticmethod
    def scores(window_probs: np.ndarray, argument: int) -> np.ndarray:
        """(classes,) float64 image scores of (windows, classes) probabilities; the argmax decides."""


#: Registered name → aggregation class, in registration order.
AGGREGATIONS: Dict[str, Type[Aggregation]] = {}


def register(name: str) -> Callable[[Type[Aggregation]], Type[Aggregation]]:
    """Class decorator adding an aggregation to :data:`AGGREGATIONS` under ``name``."""

    def decorate(cls: Type[Aggregation]) -> Type[Aggregation]:
        AGGREGATIONS[name] = cls
        return cls

    return decorate


def aggregation_choices() -> List[str]:
    """How each registered aggregation is written (``vote``, ``mean``, ``topk:K``, ...)."""
    return [cls.syntax for cls in AGGREGATIONS.values()]


@dataclass(frozen=True)
class Aggregate:
    """A chosen aggregation: its registered name and integer argument (K of ``topk:K``; 0 for none)."""

    kind: str
    k: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}" if self.k else self.kind


def parse_aggregate(text: str) -> Aggregate:
    """``name`` or ``name:ARG`` as an :class:`Aggregate`; ConfigError listing the valid ones."""
    name, colon, argument = text.partition(":")
    cls = AGGREGATIONS.get(name)
    try:
        if cls is None:
            raise ValueError
        return Aggregate(name, cls.parse(argument if colon else None))
    except ValueError:
        raise ConfigError(f"unknown aggregation {text!r}", valid=aggregation_choices()) from None


def aggregate_scores(window_probs: np.ndarray, aggregate: Aggregate) -> np.ndarray:
    """Per-class image scores of one image's window probabilities under ``aggregate``."""
    return AGGREGATIONS[aggregate.kind].scores(window_probs, aggregate.k)


def no_argument(argument: Optional[str]) -> int:
    """``parse`` of an aggregation without an argument."""
    if argument is not None:
        raise ValueError(argument)
    return 0
