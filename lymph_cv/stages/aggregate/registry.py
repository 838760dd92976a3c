"""The aggregation registry: name → how window probabilities become per-class image scores.

To add an aggregation, write one module in this package with its scores function decorated
``@register("name")`` (with ``syntax=`` and ``parse=`` when it takes an argument, as :mod:`.topk`)
and import it in ``__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from lymph_cv.core.registry import Registry
from lymph_cv.errors import ConfigError

#: (windows, classes) probabilities, the aggregation's argument → (classes,) float64 image scores.
Scores = Callable[[np.ndarray, int], np.ndarray]
#: The text after ``name:`` (None: no colon) → the integer argument; ValueError when not valid.
Parse = Callable[[Optional[str]], int]


def no_argument(argument: Optional[str]) -> int:
    """``parse`` of an aggregation that takes no argument."""
    if argument is not None:
        raise ValueError(argument)
    return 0


@dataclass(frozen=True)
class Aggregation:
    """A registered aggregation: how it is written (``topk:K``), its argument parser, its scores."""

    name: str
    syntax: str
    parse: Parse
    scores: Scores


AGGREGATIONS: Registry[Aggregation] = Registry("aggregation")


def register(name: str, syntax: Optional[str] = None, parse: Parse = no_argument) -> Callable[[Scores], Scores]:
    """Decorator registering a scores function as the aggregation ``name``."""

    def decorate(scores: Scores) -> Scores:
        AGGREGATIONS.register(name)(Aggregation(name, syntax or name, parse, scores))
        return scores

    return decorate


def aggregation_choices() -> List[str]:
    """How each registered aggregation is written (``vote``, ``mean``, ``topk:K``, ...)."""
    return [entry.syntax for entry in AGGREGATIONS.entries.values()]


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
    try:
        if name not in AGGREGATIONS:
            raise ValueError(name)
        return Aggregate(name, AGGREGATIONS.lookup(name).parse(argument if colon else None))
    except ValueError:
        raise ConfigError(f"unknown aggregation {text!r}", valid=aggregation_choices()) from None


def aggregate_scores(window_probs: np.ndarray, aggregate: Aggregate) -> np.ndarray:
    """Per-class image scores of one image's window probabilities under ``aggregate``."""
    return AGGREGATIONS.lookup(aggregate.kind).scores(window_probs, aggregate.k)
