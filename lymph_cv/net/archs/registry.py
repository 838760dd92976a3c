"""The architecture registry: name → :class:`Arch` (the template macro that renders its layers,
the blob holding the class scores, its input rules and training defaults).

Add an architecture by writing a module in this package whose function returns an :class:`Arch`,
decorated with ``@register_arch``, and importing it in ``lymph_cv/net/archs/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from lymph_cv.errors import ConfigError

#: Stems of the residual nets: a 3x3 stride-1 convolution (CIFAR-style) or 7x7/2 + 3x3/2 max-pool.
STEMS = ("cifar", "imagenet")
#: Inputs from this size up get the ImageNet stem; smaller ones (the 32-64 px patches) the CIFAR stem.
IMAGENET_STEM_FROM = 96
#: Random-crop margin of patches below/above this size (36 → 32 as the tutorial; 96 → 88).
SMALL_PATCH = 64
SMALL_MARGIN, LARGE_MARGIN = 4, 8


@dataclass(frozen=True)
class Arch:
    """One architecture.

    ``macro``: the macro of ``prototxt_templates/_layers.j2`` rendering data → ``head``;
    ``plan(num_classes, stem)``: the template variables the macro reads (e.g. its layer plan);
    ``stems``: the stems it offers (empty: none to choose); ``min_input``: the smallest crop it
    takes; ``defaults``: render variables it changes from the tutorial's (batch size, solver).
    """

    name: str
    macro: str
    head: str
    plan: Callable[[int, Optional[str]], Dict[str, Any]]
    stems: Tuple[str, ...] = ()
    min_input: int = 1
    dropout: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def stem_for(self, input_size: int, forced: Optional[str] = None) -> Optional[str]:
        """The stem for patches of ``input_size`` pixels; ``forced`` (``--stem``) wins."""
        if forced is not None:
            if not self.stems:
                raise ConfigError(f"--stem {forced}: architecture {self.name!r} has no stem to choose")
            if forced not in self.stems:
                raise ConfigError(f"--stem {forced!r}", valid=self.stems)
            return forced
        if not self.stems:
            return None
        return "imagenet" if input_size >= IMAGENET_STEM_FROM else "cifar"

    def crop_for(self, patch_size: int) -> int:
        """The training crop of ``patch_size`` patches (the tutorial's 36 → 32)."""
        crop = patch_size - (SMALL_MARGIN if patch_size < SMALL_PATCH else LARGE_MARGIN)
        if crop < self.min_input:
            raise ConfigError(f"architecture {self.name!r} needs crops of at least {self.min_input} pixels; "
                              f"patches of {patch_size} give {crop} (set crop_size)")
        return crop


#: Architecture name → entry.
ARCHS: Dict[str, Arch] = {}
DEFAULT_ARCH = "alexnet32w"


def register_arch(factory: Callable[[], Arch]) -> Callable[[], Arch]:
    """Decorator: add the :class:`Arch` that ``factory`` returns to :data:`ARCHS`."""
    entry = factory()
    if entry.name in ARCHS:
        raise ConfigError(f"architecture {entry.name!r} registered twice")
    ARCHS[entry.name] = entry
    return factory


def arch_names() -> List[str]:
    """Registered architecture names, sorted."""
    return sorted(ARCHS)


def arch_help() -> List[Tuple[str, str]]:
    """(name, description) of every registered architecture, sorted by name (the ``--arch`` help)."""
    return [(name, ARCHS[name].description) for name in arch_names()]


def get_arch(name: str) -> Arch:
    """The entry called ``name``; ConfigError listing the valid names."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}", valid=arch_names()) from None
