"""The image lists of step 3: ``<file> <label>`` lines (checked against the classes and the root), the
patch names they hold, and the seeded record order."""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Optional, Union

from lymph_cv.errors import InputError
from lymph_cv.workdir.lists import ListEntry, read_labelled_list

if TYPE_CHECKING:
    import numpy as np

try:  # convert_imageset's order without numpy (optional C extension, setup.py NATIVE)
    from lymph_cv.formats import convread
except ImportError:
    convread = None

#: Environment switch: "0" turns the native modules off.
NATIVE_ENV = "LYMPH_CV_NATIVE"
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
    return not ("\n/" in joined or "\n\\" in joined or ".." in joined or _DRIVE.search(joined))


def shuffled_order(count: int, seed: Optional[int]) -> np.ndarray:
    """Record order: identity without a seed, else ``default_rng(seed).permutation(count)``."""
    import numpy as np

    if seed is None:
        return np.arange(count)
    return np.random.default_rng(seed).permutation(count)


def native_reading() -> bool:
    """Whether :mod:`lymph_cv.formats.convread` is built and not switched off (``LYMPH_CV_NATIVE=0``)."""
    return convread is not None and os.environ.get(NATIVE_ENV, "1") != "0"


def order_list(count: int, seed: Optional[int]) -> list[int]:
    """:func:`shuffled_order` as a list; computed natively without numpy (numpy.random alone takes
    longer to import than the whole shuffle) when :func:`native_reading`."""
    if seed is None:
        return list(range(count))
    if native_reading() and 0 <= seed < _NATIVE_SEED_LIMIT:
        return convread.permutation(count, seed)
    return shuffled_order(count, seed).tolist()
