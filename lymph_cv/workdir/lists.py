"""The work directory's text lists, read one way: ``<file><whitespace><label>`` patch lists (split at
the last run of whitespace, so names may hold spaces), ``CLASS/file.tif`` parent lists, and which
folds exist (one rule: a fold is there when both its train and its test list are)."""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Pattern, Union

from lymph_cv.errors import InputError
from lymph_cv.workdir.layout import BAG_LIST_PATTERN, LIST_PATTERN, PARENT_PATTERN

PathLike = Union[str, os.PathLike]

#: A label as Caffe's atoi-era lists hold it: ASCII digits, optionally signed (no '1_0', no '٣').
_LABEL = re.compile(r"[+-]?[0-9]+")
#: Caffe's labels are int32.
_INT32 = (-2**31, 2**31)


@dataclass(frozen=True)
class ListEntry:
    """One list line: the file name (relative to the root), its label, its line number."""

    name: str
    label: int
    line: int


def read_list_text(path: PathLike) -> str:
    """A list file's text (InputError naming the file when it is missing or unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError("list file not found (run `lymph-cv folds` first)", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read list file ({exc})", path) from exc


def read_list_lines(path: PathLike) -> list[str]:
    """Non-empty, stripped lines of a text list (parent lists)."""
    return [line.strip() for line in read_list_text(path).splitlines() if line.strip()]


def read_labelled_list(path: PathLike) -> list[ListEntry]:
    """Every non-blank ``<file> <label>`` line; the split is at the last run of whitespace (TAB or
    spaces).  A line without a label, or a label that is not a (signed) int32, is an InputError
    naming the file and line."""
    entries = []
    for number, line in enumerate(read_list_text(path).splitlines(), 1):
        parts = line.rsplit(None, 1)
        if not parts:
            continue
        if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
            raise InputError(f"line {number}: expected '<file><TAB or space><integer label>', "
                             f"got {line.strip()!r}", path)
        label = int(parts[1])
        if not _INT32[0] <= label < _INT32[1]:
            raise InputError(f"line {number}: label {label} does not fit Caffe's int32 label", path)
        entries.append(ListEntry(parts[0].strip(), label, number))
    return entries


def _both_sides(folder: Path, pattern: Pattern[str]) -> tuple[list[int], list[int]]:
    """(folds with a train and a test file, folds with only one) among ``folder``'s names."""
    sides: dict[int, set[str]] = defaultdict(set)
    for name in os.listdir(folder) if folder.is_dir() else ():
        match = pattern.match(name)
        if match:
            sides[int(match.group(2))].add(match.group(1))
    return sorted(f for f, s in sides.items() if len(s) == 2), sorted(f for f, s in sides.items() if len(s) < 2)


def list_folds(workdir: PathLike) -> list[int]:
    """Fold numbers whose ``train_w32_K.txt`` and ``test_w32_K.txt`` both exist in ``workdir``."""
    return _both_sides(Path(workdir), LIST_PATTERN)[0]


def require_folds(workdir: PathLike) -> list[int]:
    """:func:`list_folds`, an InputError when the folder or every fold is missing."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise InputError("work directory not found", workdir)
    folds = list_folds(workdir)
    if not folds:
        raise InputError("no train_w32_K.txt / test_w32_K.txt lists found (run `lymph-cv folds` first)", workdir)
    return folds


def parent_list_folds(parent_dir: PathLike) -> list[int]:
    """Fold numbers that have both a train and a test parent list in ``parent_dir``."""
    parent_dir = Path(parent_dir)
    if not parent_dir.is_dir():
        raise InputError("no such folder; expected train_w32_parent_K.txt / test_w32_parent_K.txt lists", parent_dir)
    complete, incomplete = _both_sides(parent_dir, PARENT_PATTERN)
    if incomplete:
        raise InputError(f"fold {incomplete[0]} has only one of its train/test parent lists", parent_dir)
    if not complete:
        raise InputError("no train_w32_parent_K.txt / test_w32_parent_K.txt lists found", parent_dir)
    return complete


def bag_list_folds(workdir: PathLike) -> list[int]:
    """Split numbers whose ``bags_train_K.txt`` and ``bags_test_K.txt`` both exist in ``workdir``."""
    return _both_sides(Path(workdir), BAG_LIST_PATTERN)[0]
