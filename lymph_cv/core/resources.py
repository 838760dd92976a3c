"""Locations of the files we ship: the Caffe schema and the Jinja2 templates.

Installed, they are package data (``lymph_cv.prototxt_templates``, ``lymph_cv.job_templates``);
in a source checkout they are the repository's ``prototxt_templates/`` and ``jobs/`` folders.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _package_dir(package: str, repo_folder: str) -> Path:
    # A source checkout uses its own folders first: with several checkouts (worktrees) on one
    # editable install, the package-data mapping points at the installed checkout, not this one.
    if (_REPO_ROOT / "setup.cfg").is_file() and (_REPO_ROOT / repo_folder).is_dir():
        return _REPO_ROOT / repo_folder
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if Path(location).is_dir():
                return Path(location)
    return _REPO_ROOT / repo_folder


def prototxt_template_dir() -> Path:
    """Folder holding the solver/net/deploy Jinja2 templates."""
    return _package_dir("lymph_cv.prototxt_templates", "prototxt_templates")


def job_template_dir() -> Path:
    """Folder holding the PBS/Slurm job script templates."""
    return _package_dir("lymph_cv.job_templates", "jobs")


def caffe_proto_path() -> Path:
    """Our ``caffe.proto`` schema."""
    return Path(__file__).resolve().parents[1] / "formats" / "caffe" / "caffe.proto"


def pycaffe_compat_dir() -> Path:
    """The folder whose ``caffe`` package re-exports ``lymph_cv.pycaffe`` (for PYTHONPATH).

    Found without importing ``lymph_cv.pycaffe`` (that would load torch just to print a path)."""
    spec = importlib.util.find_spec("lymph_cv.pycaffe")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    base = Path(locations[0]) if locations else Path(__file__).resolve().parents[1] / "pycaffe"
    return base / "compat"
