"""The work directory's JSON records, read and written one way.

A *record* (manifest, folds, dbs, render, train, run, jobs, metrics) is what a stage writes for the
next: :func:`read_record` gives None when it is absent (or an error when ``required``), and a
:class:`RecordError` naming the file when it cannot be read or is not what the stage writes.
A *cache* (the patch parameters, the synth record, a local job's state) only saves work:
:func:`read_cache` gives None for anything it cannot use.  Both are written by :func:`write_record`
(temporary sibling + rename, so a reader never sees half a record).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from lymph_cv.core.fsutil import atomic_write_json
from lymph_cv.errors import ConfigError, FormatError, InputError
from lymph_cv.workdir import layout

PathLike = Union[str, os.PathLike]


class RecordError(FormatError, InputError, ConfigError):
    """A record that cannot be read or is not what its stage writes: a file in the wrong format, an
    unusable input and a configuration to start over, so callers that catch any of these see it."""


@dataclass(frozen=True)
class RecordSpec:
    """What one record is: its file name, how messages name it, and the top-level fields it must type."""

    name: str
    noun: str  # "folds.json", "the run record": in "cannot read <noun> (...)"
    refusal: str  # the message for JSON of another shape
    advice: str = ""  # after "; " in both messages
    fields: Mapping[str, type] = field(default_factory=dict)  # top-level keys that, when present, have this type
    nested: Mapping[str, type] = field(default_factory=dict)  # top-level dicts whose values have this type

    def problem(self, reason: str) -> str:
        return reason + (f"; {self.advice}" if self.advice else "")

    def check(self, record: Any) -> Optional[str]:
        """Why ``record`` is not this kind of record, or None."""
        good = isinstance(record, dict) and all(
            record.get(key) is None or isinstance(record[key], kind) for key, kind in self.fields.items()
        ) and all(all(isinstance(v, kind) for v in (record.get(key) or {}).values()) for key, kind in self.nested.items())
        return None if good else self.problem(self.refusal)


MANIFEST = RecordSpec(layout.MANIFEST_NAME, "the manifest", "not a manifest.json written by `lymph-cv patches`",
                      fields={"classes": list, "tree": dict, "patch_size": int, "step": int, "data_dir": str})
FOLDS = RecordSpec(layout.FOLDS_JSON, "folds.json", "not a folds.json written by `lymph-cv folds`",
                   fields={"classes": list, "list_root": str, "manifest": str, "case_regex": str})
DBS = RecordSpec(layout.DBS_JSON, "dbs.json", "expected a JSON object with a 'backend' key, as `lymph-cv dbs` writes it",
                 fields={"backend": str, "dbs": dict})
RUN = RecordSpec(layout.RUN_JSON, "the run record", 'not a lymph-cv run record (expected {"stages": {name: {...}}})',
                 advice="delete it to start over", fields={"stages": dict}, nested={"stages": dict})
JOBS = RecordSpec(layout.JOBS_JSON, "the jobs file", "not a lymph-cv jobs file", fields={"jobs": list})
BAGS = RecordSpec(layout.BAGS_JSON, "bags.json", "not a bags.json written by lymph-cv (a bag set)",
                  fields={"classes": list, "bags": list, "kind": str, "root": str})
BAG_FOLDS = RecordSpec(layout.BAG_FOLDS_JSON, "bag_folds.json", "not a bag_folds.json written by lymph-cv (bag splits)",
                       fields={"classes": list, "folds": list, "method": str})
#: Any stage's record, read for display (the HTML report's seeds and stages).
ANY = RecordSpec("", "the record", "expected a JSON object as the earlier stage writes it")
METRICS = RecordSpec(layout.METRICS_JSON, "the fold's metrics",
                     "expected a fold's metrics as `lymph-cv evaluate` writes them (fold, classes, a square "
                     "confusion matrix, accuracy, balanced_accuracy)")


def read_record(path: PathLike, spec: RecordSpec, required: bool = False, hint: str = "") -> Optional[dict]:
    """The record at ``path`` (a file, or the folder holding ``spec.name``); None when there is none
    (a RecordError when ``required``; ``hint`` says what writes it)."""
    path = Path(path)
    # a folder, or a missing one (not a missing file of the record's kind): the error names the record in it
    if path.is_dir() or (spec.name and not path.exists() and path.suffix != Path(spec.name).suffix):
        path = path / spec.name
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise RecordError(f"no such file; expected {hint or spec.noun}", path) from None
        return None
    except (OSError, ValueError) as exc:
        raise RecordError(spec.problem(f"cannot read {spec.noun} ({exc})"), path) from exc
    problem = spec.check(record)
    if problem:
        raise RecordError(problem, path)
    return record


def read_cache(path: PathLike) -> Optional[dict]:
    """A JSON object that only saves work: None when missing, unreadable or not an object."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(path: PathLike, record: Any) -> None:
    """Write ``record`` as JSON under ``path`` atomically."""
    atomic_write_json(path, record)
