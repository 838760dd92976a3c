"""``slides``: whole-slide images, one folder per class (``DATA/<class>/<slide>.svs``) or a CSV of
``slide,label[,case]`` rows (``DATA`` is then the CSV file; slide paths relative to its folder).

The slide id is the file stem (tile names start with it); the case id comes from it as for images
(``<case>_NNN``, by the tiler) unless the CSV's third column names it.
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from lymph_cv.errors import InputError
from lymph_cv.stages.sources.folders import class_files
from lymph_cv.stages.sources.registry import SourceImage, register

#: File suffixes a class folder's slides may have (what OpenSlide reads; companions such as MRXS
#: data folders are not files and so not listed).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
#: The CSV's header words (an optional first row).
CSV_HEADER = ("slide", "label", "case")


@dataclass(frozen=True)
class SlideSource:
    """One slide of a data set: its file, class, label and case id."""

    path: Path
    cls: str
    label: int
    case: Optional[str]  # the CSV's case column; None: from the slide name, as for images

    @property
    def slide(self) -> str:
        return self.path.stem

    def image(self) -> SourceImage:
        return SourceImage(self.path, self.cls, self.label)


def is_slide_file(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_SUFFIXES


def _label_of(text: str, classes: Sequence[str], number: int, csv_path: Path) -> int:
    text = text.strip()
    if text in classes:
        return list(classes).index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    raise InputError(f"line {number}: label {text!r} is not one of the classes {', '.join(classes)} "
                     f"(or 0-{len(classes) - 1})", csv_path)


def read_slide_csv(csv_path: Path, classes: Sequence[str]) -> List[SlideSource]:
    """The slides of a ``slide,label[,case]`` CSV (a header row allowed), in label then file order."""
    try:
        text = csv_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the slide table ({exc})", csv_path) from None
    found = []
    for number, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if number == 1 and tuple(v.strip().lower() for v in row) == CSV_HEADER[:len(row)]:
            continue
        if len(row) not in (2, 3) or not row[0].strip():
            raise InputError(f"line {number}: expected slide,label[,case], got {','.join(row)!r}", csv_path)
        label = _label_of(row[1], classes, number, csv_path)
        path = (csv_path.parent / row[0].strip())
        if not path.is_file():
            raise InputError(f"line {number}: no such slide file {row[0].strip()!r}", csv_path)
        case = row[2].strip() if len(row) == 3 and row[2].strip() else None
        found.append(SlideSource(path, classes[label], label, case))
    if not found:
        raise InputError("no slide rows; expected slide,label[,case] lines", csv_path)
    return sorted(found, key=lambda s: (s.label, s.path.name))


def scan_slides(data: Union[str, Path], classes: Sequence[str]) -> List[SlideSource]:
    """Every slide of ``data`` (class folders, or a CSV file), class by class; InputError naming a
    missing folder, a class without slides, a bad row, or a slide name that occurs twice."""
    data = Path(data)
    if data.is_file():
        found = read_slide_csv(data, classes)
    elif not data.is_dir():
        raise InputError("no such slide folder or CSV; expected DATA/<class>/<slide> or slide,label[,case] rows", data)
    else:
        found = []
        for label, name in enumerate(classes):
            folder = data / name
            if not folder.is_dir():
                raise InputError(f"class folder missing (classes: {', '.join(classes)})", folder)
            files = [p for p in class_files(folder) if is_slide_file(p)]
            if not files:
                raise InputError(f"no slide files ({', '.join(SLIDE_SUFFIXES)}) in the class folder", folder)
            found.extend(SlideSource(p, name, label, None) for p in files)
    stems = Counter(s.slide for s in found)
    clashes = [s for s in found if stems[s.slide] > 1]
    if clashes:
        raise InputError(f"slide name {clashes[0].slide!r} occurs more than once; tile names would collide",
                         clashes[0].path)
    return found


@register("slides")
class Slides:
    """Whole slides, by class folder or CSV."""

    @staticmethod
    def scan(data_dir: Path, classes: Sequence[str]) -> List[SourceImage]:
        return [s.image() for s in scan_slides(data_dir, classes)]

    @staticmethod
    def inputs(data_dir: Path, classes: Sequence[str]) -> List[Path]:
        data_dir = Path(data_dir)
        if data_dir.is_file():
            try:
                return [data_dir] + [s.path for s in read_slide_csv(data_dir, classes)]
            except InputError:
                return [data_dir]
        folders = [data_dir / name for name in classes]
        return [p for folder in folders if folder.is_dir() for p in class_files(folder) if is_slide_file(p)]

