"""The stain normaliser registry (method name → class) and what every method shares.

A normaliser works on whole images as the one image reader gives them (8-bit BGR). It has three
steps: ``statistics(bgr)`` measures one image (None when it holds too little tissue), ``combine``
makes a target from the statistics of one or many images (robust medians), and
``normalise(bgr, target)`` maps an image's own statistics onto the target's. Every parameter is a
constructor keyword with a stated default and is written to the record with the fitted target.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Type

import cv2
import numpy as np

from lymph_cv.errors import ConfigError, FormatError

log = logging.getLogger(__name__)

#: Background (glass) in 8-bit HSV: bright (value at least this) and grey (saturation at most this).
BACKGROUND_MIN_VALUE = 200
BACKGROUND_MAX_SATURATION = 25
#: An image with fewer tissue pixels than this share (or this count) is left as it is.
MIN_TISSUE_FRACTION = 0.01
MIN_TISSUE_PIXELS = 64
#: What a left-unchanged image is reported as (one line per kind, with the first file).
UNCHANGED_NOTE = "stain: too little tissue, left unnormalised"


def tissue_mask(bgr: np.ndarray) -> np.ndarray:
    """True where a pixel is tissue: not bright and grey at the same time (glass, white paper)."""
    hsv = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2HSV)
    # One SIMD pass: 255 where the value is high and the saturation low (any hue).
    background = cv2.inRange(hsv, (0, 0, BACKGROUND_MIN_VALUE), (255, BACKGROUND_MAX_SATURATION, 255))
    return background == 0


def enough_tissue(count: int, total: int) -> bool:
    """Whether ``count`` tissue pixels of ``total`` are enough to measure an image's stain."""
    return count >= max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * total)


class Normaliser(ABC):
    """Base class of the methods; subclasses set ``name`` through :func:`register`."""

    name: ClassVar[str] = ""
    #: parameter name → default (every parameter a method takes, all JSON-serialisable).
    defaults: ClassVar[Dict[str, Any]] = {}
    #: target key → array shape (checked when a record is read).
    target_shapes: ClassVar[Dict[str, tuple]] = {}

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ConfigError(f"--stain {self.name}: unknown parameter {unknown[0]!r}", valid=sorted(self.defaults))
        self.params: Dict[str, Any] = {**self.defaults, **params}
        self.check()

    def check(self) -> None:
        """Validate ``self.params`` (ConfigError naming the parameter)."""

    @abstractmethod
    def statistics(self, bgr: np.ndarray) -> Optional[dict]:
        """This image's stain statistics (JSON-able), or None when it holds too little tissue."""

    def combine(self, stats: Sequence[Mapping[str, Any]]) -> dict:
        """A target from the statistics of one or more images (element-wise medians)."""
        keys = stats[0].keys()
        return {key: np.median(np.asarray([s[key] for s in stats], np.float64), axis=0).tolist() for key in keys}

    @abstractmethod
    def normalise(self, bgr: np.ndarray, target: Mapping[str, Any]) -> tuple[np.ndarray, bool]:
        """(the image mapped onto ``target``, True) or (the image unchanged, False) for too little tissue."""

    def check_target(self, target: Mapping[str, Any], source: str) -> dict:
        """``target`` as floats with the keys and lengths this method needs (FormatError otherwise)."""
        shapes = self.target_shapes
        try:
            checked = {key: np.asarray(target[key], np.float64) for key in shapes}
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"not a {self.name} stain target (needs {', '.join(shapes)}; {exc})", source) from None
        for key, shape in shapes.items():
            if checked[key].shape != shape or not np.all(np.isfinite(checked[key])):
                raise FormatError(f"stain target {key!r} must be {shape} finite numbers", source)
        return {key: value.tolist() for key, value in checked.items()}


#: method name → normaliser class.
NORMALISERS: Dict[str, Type[Normaliser]] = {}


def register(name: str) -> Callable[[Type[Normaliser]], Type[Normaliser]]:
    """Class decorator adding a normaliser to :data:`NORMALISERS` under ``name``."""

    def decorate(cls: Type[Normaliser]) -> Type[Normaliser]:
        NORMALISERS[name] = cls
        cls.name = name
        return cls

    return decorate


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(NORMALISERS)


def get_normaliser(name: str, **params: Any) -> Normaliser:
    """The normaliser registered as ``name`` with these parameters; ConfigError listing the valid names."""
    cls = NORMALISERS.get(name)
    if cls is None:
        raise ConfigError(f"--stain: unknown method {name!r}", valid=method_names())
    return cls(**params)


@dataclass(frozen=True)
class StainTransform:
    """A fitted method as the image reader's colour transform: picklable, applied to whole images.

    ``__call__`` gives the normalised image; :meth:`apply` also says whether it was normalised.
    """

    method: str
    params: Mapping[str, Any]
    target: Mapping[str, Any]

    def normaliser(self) -> Normaliser:
        return get_normaliser(self.method, **dict(self.params))

    def apply(self, bgr: np.ndarray) -> tuple[np.ndarray, bool]:
        """(image, normalised?); an image with too little tissue comes back unchanged with False."""
        return self.normaliser().normalise(bgr, self.target)

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        return self.apply(bgr)[0]

    def to_json(self) -> dict:
        return {"method": self.method, "params": dict(self.params), "target": dict(self.target)}


class TrackedTransform:
    """A :class:`StainTransform` as the image reader's hook that remembers whether the image it last
    saw was left unchanged (too little tissue), so the stage can name and count those images."""

    def __init__(self, transform: StainTransform):
        self.transform = transform
        self.unchanged = False

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        out, normalised = self.transform.apply(bgr)
        self.unchanged = not normalised
        return out


def hook(transform: Optional[StainTransform]) -> Optional[TrackedTransform]:
    """The reader hook of ``transform`` (None for no normalisation)."""
    return None if transform is None else TrackedTransform(transform)
