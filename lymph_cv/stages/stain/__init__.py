"""Stain normalisation: the registry of methods, fitted targets and their JSON records.

To add a method: write one module here with a :class:`Normaliser` subclass decorated with
``@register("name")`` and import it below. A fitted method is a :class:`StainTransform`
(method, parameters, target) that the image reader applies to whole images; its record
(``stain.json``-style) is written next to every output made with it and read back, never refitted,
by the stages that follow.
"""
from __future__ import annotations

from lymph_cv.stages.stain import macenko, none, reinhard  # noqa: F401  (registration)
from lymph_cv.stages.stain.records import (
    RECORD_FORMAT,
    StainRecord,
    fit_images,
    fit_record,
    read_record,
    recorded_stain_path,
    resolve_target,
    write_record,
)
from lymph_cv.stages.stain.registry import (
    NORMALISERS,
    UNCHANGED_NOTE,
    Normaliser,
    StainTransform,
    TrackedTransform,
    get_normaliser,
    hook,
    method_names,
    register,
    tissue_mask,
)

__all__ = [
    "NORMALISERS", "Normaliser", "RECORD_FORMAT", "StainRecord", "StainTransform", "TrackedTransform", "UNCHANGED_NOTE",
    "fit_images", "fit_record", "get_normaliser", "hook", "method_names", "read_record", "recorded_stain_path", "register",
    "resolve_target", "tissue_mask", "write_record",
]
