"""The work directory's text lists, read one way: ``<file><whitespace><label>`` patch lists (split at
the last run of whitespace, so names may hold spaces), ``CLASS/file.tif`` parent lists, and which
folds exist (one rule: a fold is there when both its train and its test list are)."""
from __future__ import annotations

import itertools
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Pattern, Union

from lymph_cv.core.memory import collector_paused
from lymph_cv.errors import InputError
from lymph_cv.workdir.layout import BAG_LIST_PATTERN, LIST_PATTERN, PARENT_PATTERN

PathLike = Union[str, os.PathLike]

#: A label as Caffe's atoi-era lists hold it: ASCII digits, optionally signed (no '1_0', no '٣').
_LABEL = re.compile(r"[+-]?[0-9]+")
#: Caffe's labels are int32.
_INT32 = (-2**31, 2**31)
#: Digits of the longest label the bulk check converts (longer ones, e.g. zero-padded: line by line).
_INT32_DIGITS = 12


class ListEntry(NamedTuple):
    """One list line: the file name (relative to the root), its label, its line number.

    A named tuple: a full-scale fold list has 820,096 lines, and building a frozen dataclass per
    line took 3 µs of the 5 µs a line cost to read.
    """

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
    lines = read_list_text(path).splitlines()
    with collector_paused():
        return _read_in_bulk(path, lines)


def _read_in_bulk(path: PathLike, lines: list[str]) -> list[ListEntry]:
    """:func:`read_labelled_list` with whole-list checks; any doubt goes to the line-by-line reader."""
    parts = [line.rsplit(None, 1) for line in lines]
    numbers = [number for number, pair in enumerate(parts, 1) if pair]
    if len(numbers) != len(parts):
        parts = [parts[number - 1] for number in numbers]
    labels = [pair[-1] for pair in parts]
    # The common case checked in bulk: two fields everywhere, unsigned ASCII labels within int32.
    digits = "".join(labels)
    if not (parts and min(map(len, parts)) == 2 and digits.isascii() and digits.isdigit()
            and max(map(len, labels)) <= _INT32_DIGITS):
        return _read_line_by_line(path, lines)
    values = list(map(int, labels))
    if max(values) >= _INT32[1]:
        return _read_line_by_line(path, lines)
    names = [pair[0].strip() for pair in parts]
    return list(map(tuple.__new__, itertools.repeat(ListEntry), zip(names, values, numbers)))


def _read_line_by_line(path: PathLike, lines: list[str]) -> list[ListEntry]:
    """:func:`read_labelled_list` one line at a time: signed labels, and the error naming the line."""
    entries = []
    for number, line in enumerate(lines, 1):
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
