"""The image lists of step 3: ``<file> <label>`` lines (checked against the classes and the root), the
patch names they hold, and the seeded record order."""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Optional, Union

from lymph_cv.core.native import NATIVE_ENV, native_enabled  # noqa: F401 (NATIVE_ENV: the switch, named here for callers)
from lymph_cv.errors import InputError
from lymph_cv.workdir.lists import ListEntry, read_labelled_list

if TYPE_CHECKING:
    import numpy as np

try:  # convert_imageset's order without numpy (optional C extension, setup.py NATIVE)
    from lymph_cv.formats import convread
except ImportError:
    convread = None

#: The largest seed the native permutation takes (64 bits); numpy's for larger ones.
_NATIVE_SEED_LIMIT = 1 << 64

#: A patch file name: ``<image stem>_sub_<i>.<ext>``.
PATCH_NAME = re.compile(r"^(?P<stem>.+)_sub_(?P<index>\d+)\.[A-Za-z0-9]+$")


def check_relative(name: str) -> bool:
    """True when ``name`` is a relative path that stays under its root (no ``..``, not absolute)."""
    # Plain string tests: this runs once per list line (millions).
    if not name or name[0] in "/\\" or (len(name) > 1 and name[1] == ":"):
        return False
    return ".." not in name or ".." not in re.split(r"[/\\]", name)


def read_image_list(path: Union[str, os.PathLike], num_labels: Optional[int] = None) -> list[ListEntry]:
    """Parse a ``<file> <label>`` list; the split is at the last run of whitespace (TAB or spaces).

    Blank lines are ignored.  A line without a label, a non-integer label, a label outside
    ``0 .. num_labels-1`` (when given) or a name escaping the root is an InputError naming the
    file and line.
    """
    entries = read_labelled_list(path)
    if not entries:
        raise InputError("list is empty, expected '<file> <label>' lines", path)
    if _plainly_valid(entries, num_labels):
        return entries
    for entry in entries:
        if num_labels is not None and not 0 <= entry.label < num_labels:
            raise InputError(f"line {entry.line}: label {entry.label} is outside the {num_labels} classes "
                             f"(0..{num_labels - 1})", path)
        if "\0" in entry.name:  # no file has one: os.open would raise a ValueError
            raise InputError(f"line {entry.line}: {entry.name!r} holds a NUL byte; expected a file name", path)
        if not check_relative(entry.name):
            raise InputError(f"line {entry.line}: {entry.name!r} must be a relative path inside the root folder", path)
    return entries


#: A name whose second character is a drive colon (``C:...``), in names joined after line breaks.
_DRIVE = re.compile(r"\n.:")


def _plainly_valid(entries: list[ListEntry], num_labels: Optional[int]) -> bool:
    """:func:`read_image_list`'s checks over the whole list at once (a full-scale list has 820,096
    lines); False when any entry may fail, which the line-by-line check then names."""
    if num_labels is not None:
        labels = [entry.label for entry in entries]
        if min(labels) < 0 or max(labels) >= num_labels:
            return False
    # The names hold no line break (they come from separate lines), so one joined string tells.
    joined = "\n" + "\n".join([entry.name for entry in entries])
    return not ("\n/" in joined or "\n\\" in joined or ".." in joined or "\0" in joined or _DRIVE.search(joined))


def shuffled_order(count: int, seed: Optional[int]) -> np.ndarray:
    """Record order: identity without a seed, else ``default_rng(seed).permutation(count)``."""
    import numpy as np

    if seed is None:
        return np.arange(count)
    return np.random.default_rng(seed).permutation(count)


def native_reading() -> bool:
    """Whether :mod:`lymph_cv.formats.convread` is built and not switched off (``LYMPH_CV_NATIVE=0``)."""
    return convread is not None and native_enabled()


def record_order(count: int, seed: Optional[int]) -> memoryview:
    """:func:`shuffled_order` as a flat int64 buffer (indexable, sliceable, and what the native reader
    takes); computed natively without numpy (numpy.random alone takes longer to import than the
    whole shuffle) when :func:`native_reading`."""
    if seed is not None and native_reading() and 0 <= seed < _NATIVE_SEED_LIMIT:
        return memoryview(convread.permutation(count, seed)).cast("q")
    if seed is None:
        from array import array

        return memoryview(array("q", range(count)))
    return memoryview(shuffled_order(count, seed).astype("<i8"))


class ScannedList:
    """A list file as :func:`convread.scan_list` read it: the entries of :func:`read_image_list`, made
    when indexed (no Python object per line until then); :attr:`text` and :attr:`rows` are what the
    native reader takes."""

    def __init__(self, text: bytes, rows: bytes):
        self.text, self.rows = text, rows
        self._rows = memoryview(rows).cast("q")

    def __len__(self) -> int:
        return len(self._rows) // _ROW

    def __getitem__(self, index: int) -> ListEntry:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("list entry out of range")
        start, length, label, line = self._rows[_ROW * index : _ROW * index + _ROW]
        return ListEntry(self.text[start : start + length].decode("ascii"), label, line)

    def __iter__(self):
        return (self[index] for index in range(len(self)))


#: Values per entry of scan_list's rows: name start, name length, label, line.
_ROW = 4


def scan_image_list(path: Union[str, os.PathLike]) -> Union[ScannedList, list[ListEntry]]:
    """:func:`read_image_list` of ``path`` (no label limit), scanned natively when the module is built
    and every line is plain ASCII in the bulk reader's form; else (or on any problem, which it then
    names) :func:`read_image_list` itself."""
    if native_reading():
        try:
            with open(path, "rb") as handle:
                text = handle.read()
        except OSError:
            text = None
        rows = None if text is None else convread.scan_list(text)
        if rows is not None:
            return ScannedList(text, rows)
    return read_image_list(path)
