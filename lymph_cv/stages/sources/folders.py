"""``folders``: the tutorial's data layout, one sub-folder of image files per class (``DATA/CLL/*.tif``)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import List, Sequence, Union

from lymph_cv.errors import InputError
from lymph_cv.stages.sources.registry import SourceImage, register


def class_files(folder: Path) -> List[Path]:
    """The files a class folder holds for a scan: every non-hidden file, sorted as Matlab's ``dir``."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def scan_class_folders(data_dir: Union[str, Path], classes: Sequence[str]) -> List[SourceImage]:
    """Every (non-hidden) file of every class folder, class by class, names sorted as Matlab's ``dir``.

    Raises InputError for a missing or empty class folder and for image stems that occur in
    two folders (their patch names would collide in the single output folder).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError("no such data folder; expected one sub-folder per class", data_dir)
    found: List[SourceImage] = []
    for label, name in enumerate(classes):
        folder = data_dir / name
        if not folder.is_dir():
            raise InputError(f"class folder missing (classes: {', '.join(classes)})", folder)
        files = class_files(folder)
        if not files:
            raise InputError("empty class folder, expected image files", folder)
        for p in files:
            if "\n" in p.name or "\r" in p.name:  # one list line per patch: a line break would split it
                raise InputError(f"image name {p.name!r} holds a line break; rename it", folder)
            try:
                p.name.encode("utf-8")  # the lists and manifest are UTF-8 text
            except UnicodeEncodeError:
                raise InputError(f"image name {p.name!r} is not valid UTF-8; rename it", folder) from None
        found.extend(SourceImage(p, name, label) for p in files)
    stems = Counter(image.path.stem for image in found)
    clashes = [image for image in found if stems[image.path.stem] > 1]
    if clashes:
        raise InputError(f"image name {clashes[0].path.stem!r} occurs more than once; patch names would collide", clashes[0].path)
    return found


@register("folders")
class ImageFolders:
    """One folder per class under the data folder, named as the class."""

    scan = staticmethod(scan_class_folders)

    @staticmethod
    def inputs(data_dir: Path, classes: Sequence[str]) -> List[Path]:
        folders = [Path(data_dir) / name for name in classes]
        return [path for folder in folders if folder.is_dir() for path in class_files(folder)]
