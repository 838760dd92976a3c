"""Step 1: rotated patches on the tutorial's grid, their names, and the manifest.

For an image of H × W pixels the tutorial (Matlab) loops ``rr = 1:32:H-36`` and
``cc = 1:32:W-36`` and cuts rows ``rr+1 .. rr+36``, columns ``cc+1 .. cc+36`` (1-based), i.e.
0-based windows starting at row ``rr`` and column ``cc``: origins 1, 33, 65, … up to H − 36.
Each window is written twice, as is and rotated 90° counter-clockwise (``imrotate(x, 90)``),
numbered from 1 in row-major window order: odd numbers are 0°, even numbers 90°.
Names are ``<image stem>_sub_<i>.tif``, all in one output folder (the tutorial's ``subs/``).
"""
from __future__ import annotations

import contextlib
import time
import logging
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import cv2
import numpy as np

from lymph_cv.errors import ConfigError, FormatError, InputError, LymphCVError
from lymph_cv.core import faults
from lymph_cv.core.fsutil import (atomic_write_json, check_writable, remove_stale_temporaries,
                                  temp_sibling, write_all, write_error)
from lymph_cv import DEFAULT_CLASSES
from lymph_cv.stages.synth import TIFF_UNCOMPRESSED
from lymph_cv.core.badinputs import BadInputs  # noqa: F401 (this module's API too)
from lymph_cv.core.grid import FIRST_ORIGIN, WINDOW_SIZE, WINDOW_STEP, window_origins
from lymph_cv.core.images import ColourTransform, ReadImage, read_image
from lymph_cv.stages.sources import DEFAULT_SOURCE, SourceImage, data_source, input_fingerprint
from lymph_cv.stages.stain import StainRecord, StainTransform, write_record
from lymph_cv.stages.stain import hook as stain_hook
from lymph_cv.core.workers import imap
from lymph_cv.workdir.layout import MANIFEST_NAME, MAT_NAME, PATCH_DIR, STAIN_RECORD
from lymph_cv.workdir.layout import PATCH_PARAMS as PARAMS_NAME
from lymph_cv.workdir.records import MANIFEST, read_cache, read_record
from lymph_cv.stages.stage import RunOptions, Stage, check_stain, stain_key, stain_target_record

log = logging.getLogger(__name__)

#: Windows are written at these rotations (degrees counter-clockwise), in this order.
ROTATIONS = (0, 90)
PATCH_SUFFIX = ".tif"
PATCH_NAME = "{stem}_sub_{index}" + PATCH_SUFFIX
#: Case (patient) id = image stem minus its trailing ``_NNN`` image number.
DEFAULT_CASE_REGEX = r"^(?P<case>.+)_\d+$"

def patch_count(height: int, width: int, patch_size: int = WINDOW_SIZE, step: int = WINDOW_STEP) -> int:
    """Number of patches of an image (windows × rotations)."""
    return len(window_origins(height, width, patch_size, step)) * len(ROTATIONS)


def patch_names(stem: str, count: int) -> list[str]:
    """``<stem>_sub_1.tif`` … ``<stem>_sub_<count>.tif``."""
    return [PATCH_NAME.format(stem=stem, index=i) for i in range(1, count + 1)]


def extract(
    image: np.ndarray,
    patch_size: int = WINDOW_SIZE,
    step: int = WINDOW_STEP,
    *,
    channels_first: bool = False,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """All patches of an (H, W, C) image in name order, 0° then 90° per window.

    Shape (N, size, size, C), or (N, C, size, size) with ``channels_first`` (a Datum's
    order); written into ``out`` (any array of N·C·size² elements) when given.
    """
    origins = window_origins(image.shape[0], image.shape[1], patch_size, step)
    windows = np.lib.stride_tricks.sliding_window_view(image, (patch_size, patch_size), axis=(0, 1))
    # sliding_window_view puts the window axes last: (rows, cols, C, size, size).
    picked = windows[origins[:, 0], origins[:, 1]]
    spatial = (2, 3)
    if not channels_first:
        picked, spatial = picked.transpose(0, 2, 3, 1), (1, 2)
    shape = (len(origins), len(ROTATIONS)) + picked.shape[1:]
    target = np.empty(shape, image.dtype) if out is None else out.reshape(shape)
    target[:, 0] = picked
    target[:, 1] = np.rot90(picked, 1, axes=spatial)
    return target.reshape((-1,) + picked.shape[1:])


def case_of(stem: str, case_regex: str = DEFAULT_CASE_REGEX) -> str:
    """The case (patient) id of an image stem; the whole stem when the regex (or its group) does not match."""
    match = re.match(case_regex, stem)
    if not match:
        return stem
    case = match.group("case") if "case" in match.re.groupindex else match.group(1)
    return stem if case is None else case


def compile_case_regex(case_regex: str) -> str:
    """Validate a case regex (a ``case`` group or one group) and return it."""
    try:
        compiled = re.compile(case_regex)
    except re.error as exc:
        raise ConfigError(f"--case-regex: {case_regex!r} is not a regular expression ({exc})") from exc
    if "case" not in compiled.groupindex and compiled.groups < 1:
        raise ConfigError(f"--case-regex: {case_regex!r} needs a group, named 'case' or the first one")
    return case_regex


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class ImageEntry:
    """One source image: its class, case and patch count (patch names follow from its stem)."""

    cls: str
    label: int
    name: str
    case: str
    height: int
    width: int
    patches: int

    @property
    def stem(self) -> str:
        """The file name without its extension (patch names start with it)."""
        return Path(self.name).stem

    @property
    def parent_name(self) -> str:
        """``CLASS/file.tif``, as in the published parent lists."""
        return f"{self.cls}/{self.name}"

    def patch_names(self) -> list[str]:
        """This image's patch file names, in number order."""
        return patch_names(self.stem, self.patches)


@dataclass
class Manifest:
    """What step 1 produced: classes → cases → images (→ patch names), and its parameters."""

    classes: list[str]
    images: list[ImageEntry]
    patch_size: int = WINDOW_SIZE
    step: int = WINDOW_STEP
    data_dir: Optional[str] = None
    skipped: list[dict] = field(default_factory=list)
    path: Optional[Path] = None  # where it was read from / written to
    #: the stain normalisation the patches were cut with (method, params, target, unchanged), or None.
    stain: Optional[dict] = None

    @property
    def total_patches(self) -> int:
        """Patches of all images."""
        return sum(image.patches for image in self.images)

    def by_class(self) -> dict[str, list[ImageEntry]]:
        """Images per class, in label order (images in name order)."""
        grouped: dict[str, list[ImageEntry]] = {name: [] for name in self.classes}
        for image in self.images:
            grouped[image.cls].append(image)
        return grouped

    def to_json(self) -> dict:
        """The manifest.json object: classes → cases → images with their patch counts, and the parameters."""
        tree: dict = {}
        for name, images in self.by_class().items():
            cases: dict = defaultdict(dict)
            for image in images:
                cases[image.case][image.name] = {"height": image.height, "width": image.width, "patches": image.patches}
            tree[name] = {"label": self.classes.index(name), "cases": dict(cases)}
        return {
            "classes": self.classes,
            "tree": tree,
            "patch_size": self.patch_size,
            "step": self.step,
            "rotations": list(ROTATIONS),
            "patch_name": PATCH_NAME,
            "case_regex": DEFAULT_CASE_REGEX,
            "data_dir": self.data_dir,
            "images": len(self.images),
            "total_patches": self.total_patches,
            "skipped": self.skipped,
            **({} if self.stain is None else {"stain": self.stain}),
        }

    @classmethod
    def from_json(cls, obj: dict, path: Optional[Path] = None) -> "Manifest":
        """Inverse of :meth:`to_json`; FormatError naming ``path`` when ``obj`` is not a manifest."""
        try:
            classes = list(obj["classes"])
            images = []
            for label, name in enumerate(classes):
                for case, entries in obj["tree"][name]["cases"].items():
                    for image_name, info in entries.items():
                        images.append(ImageEntry(name, label, image_name, case, int(info["height"]),
                                                 int(info["width"]), int(info["patches"])))
            images.sort(key=lambda e: (e.label, e.name))
            return cls(classes, images, int(obj["patch_size"]), int(obj["step"]), obj.get("data_dir"),
                       list(obj.get("skipped", [])), path, obj.get("stain"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"not a lymph-cv patch manifest ({type(exc).__name__}: {exc})", path) from exc


def load_manifest(path: Union[str, Path]) -> Manifest:
    """Read ``manifest.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    obj = read_record(path, MANIFEST, required=True, hint="the manifest.json written by `lymph-cv patches`")
    return Manifest.from_json(obj, path)


# --------------------------------------------------------------------------- the data set


def scan_images(data_dir: Union[str, Path], classes: Sequence[str] = DEFAULT_CLASSES,
                source: str = DEFAULT_SOURCE) -> list[SourceImage]:
    """The data set's images as the data source ``source`` finds them (default: one folder per class)."""
    return data_source(source).scan(Path(data_dir), classes)


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class _Job:
    source: SourceImage
    out_dir: Path
    patch_size: int
    step: int
    write: bool
    reuse: bool = False  # patch files present from a run with the same parameters and source may stay
    stain: Optional[StainTransform] = None  # normalisation applied to the whole image as it is read


@dataclass(frozen=True)
class _Done:
    entry: Optional[ImageEntry]
    written: int = 0
    conversion: Optional[str] = None
    problem: Optional[str] = None  # a bad-input message (skippable)
    fatal: Optional[str] = None  # e.g. the disk is full (never skipped)
    unchanged: bool = False  # stain normalisation left it as it was (too little tissue)


def read_for_patches(source: SourceImage, patch_size: int, step: int,
                     transform: Optional[ColourTransform] = None) -> ReadImage:
    """Read a source image (colour, 8-bit BGR, then ``transform``); InputError when it holds no patch window."""
    read = read_image(source.path, transform)
    height, width = read.bgr.shape[:2]
    if len(window_origins(height, width, patch_size, step)) == 0:
        needed = FIRST_ORIGIN + patch_size
        raise InputError(f"image is {width}x{height}, smaller than one patch window "
                         f"(needs at least {needed}x{needed})", source.path)
    return read


def load_windows(source: SourceImage, patch_size: int, step: int, transform: Optional[ColourTransform] = None,
                 ) -> tuple[np.ndarray, tuple[int, int], Optional[str]]:
    """The image's patches (N, size, size, 3) BGR in name order, its (H, W), and any colour conversion."""
    read = read_for_patches(source, patch_size, step, transform)
    return extract(read.bgr, patch_size, step), read.bgr.shape[:2], read.conversion


def image_entry(source: SourceImage, shape: tuple[int, int], count: int) -> ImageEntry:
    """The manifest entry of a source image of (H, W) ``shape`` with ``count`` patches."""
    return ImageEntry(source.cls, source.label, source.path.name, case_of(source.path.stem), int(shape[0]), int(shape[1]), count)


def _extract_one(job: _Job) -> _Done:
    source = job.source
    transform = stain_hook(job.stain)
    try:
        patches, shape, conversion = load_windows(source, job.patch_size, job.step, transform)
    except LymphCVError as exc:
        return _Done(None, problem=str(exc))
    entry = image_entry(source, shape, len(patches))
    names = entry.patch_names()
    unchanged = transform is not None and transform.unchanged
    if not job.write or (job.reuse and all((job.out_dir / n).is_file() for n in names)):
        return _Done(entry, 0, conversion, unchanged=unchanged)
    final = job.out_dir
    try:
        for name, patch in zip(names, patches):
            ok, encoded = cv2.imencode(PATCH_SUFFIX, patch, TIFF_UNCOMPRESSED)  # decodes ~3x faster than LZW
            final = job.out_dir / name
            temp = temp_sibling(final)
            try:
                faults.before_write(final)
                # not ndarray.tofile: it does not raise on a short write, leaving a truncated patch
                with open(temp, "wb") as handle:
                    write_all(handle, encoded)
                os.replace(temp, final)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
    except OSError as exc:
        return _Done(None, fatal=str(write_error(exc, final, "patch")))
    return _Done(entry, len(names), conversion, unchanged=unchanged)


def extract_patches(
    data_dir: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    patch_size: int = WINDOW_SIZE,
    step: int = WINDOW_STEP,
    workers: Optional[int] = None,
    write_mat: bool = False,
    skip_bad: bool = False,
    write_patches: bool = True,
    stain: Optional[StainRecord] = None,
) -> Manifest:
    """Step 1: write every image's rotated patches to ``out_dir`` and ``out_dir/manifest.json``.

    Args:
        data_dir: folder with one sub-folder per class (``CLL/``, ``FL/``, ``MCL/``).
        out_dir: the single patch folder (the tutorial's ``subs/``).
        classes: class folder names in label order.
        patch_size, step: window size and grid step (the tutorial's 36 and 32).
        workers: processes, one image at a time each (``None`` = all cores).
        write_mat: also write Matlab's ``class_struct.mat`` next to the manifest.
        skip_bad: warn about and skip unreadable or too-small images instead of stopping.
        write_patches: False writes only the manifest (for building the databases straight
            from the images, see :func:`lymph_cv.stages.dbs.build_dbs`).
        stain: a fitted stain normalisation applied to every whole image as it is read; its
            record goes to ``out_dir/stain.json`` (with the images it left unchanged) and into
            the manifest, so ``dbs --images`` and ``evaluate`` apply the same one.

    Images whose patches are all present already are not rewritten (resumable).
    """
    if patch_size < 1 or step < 1:
        raise ConfigError(f"patch size and step must be positive, got {patch_size} and {step}")
    out_dir = Path(out_dir)
    sources = scan_images(data_dir, classes)
    check_writable(out_dir)
    for path in remove_stale_temporaries(out_dir):  # patches of a killed run never renamed into place
        log.debug("removed %s, left by an interrupted run", path)
    transform = None if stain is None else stain.transform
    record = _WrittenRecord(out_dir, sources, patch_size, step, transform)
    bad = BadInputs(skip_bad)
    entries: list[ImageEntry] = []
    unchanged: list[str] = []
    written = 0
    jobs = [_Job(s, out_dir, patch_size, step, write_patches, s.path.name in record.reusable, transform) for s in sources]
    try:
        for done in imap(_extract_one, jobs, workers=workers, desc="patches", unit="img"):
            if done.fatal:
                raise LymphCVError(done.fatal)
            if done.problem:
                bad.problem(done.problem)
                continue
            assert done.entry is not None
            bad.converted(done.conversion, Path(data_dir) / done.entry.parent_name)
            if done.unchanged:
                log.warning("warning: %s: stain normalisation left it unchanged (too little tissue)",
                            Path(data_dir) / done.entry.parent_name)
                unchanged.append(done.entry.parent_name)
            entries.append(done.entry)
            written += done.written
            if write_patches:
                record.add(done.entry.name)
            faults.event("patches:image")
    finally:
        record.save_at_exit()
    bad.finish("extracting patches")
    if not entries:
        raise InputError("no usable images", data_dir)
    manifest = Manifest(list(classes), entries, patch_size, step, os.fspath(Path(data_dir).resolve()),
                        [{"problem": p} for p in bad.problems], out_dir / MANIFEST_NAME,
                        None if transform is None else {**transform.to_json(), "unchanged": unchanged})
    if stain is not None:
        write_record(out_dir / STAIN_RECORD, stain, unchanged=unchanged)
    else:  # patches cut without normalisation: an older record must not vouch for them
        (out_dir / STAIN_RECORD).unlink(missing_ok=True)
    atomic_write_json(manifest.path, manifest.to_json())
    if write_mat:
        write_class_struct(manifest, out_dir / MAT_NAME)
    log.info("patches: %d images, %d patches (%d written) in %s", len(entries), manifest.total_patches, written, out_dir)
    return manifest




def _source_signature(path: Path) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


class _WrittenRecord:
    """``.patches.json``: the parameters, and the source files whose patches are all written.

    Patch files already present are kept only when they were written with the same patch
    size and step from the same source file (size and date), so a rerun resumes an
    interrupted one but never keeps patches of another window size or of a replaced image.
    """

    def __init__(self, out_dir: Path, sources: Sequence[SourceImage], patch_size: int, step: int,
                 stain: Optional[StainTransform] = None):
        self.path = out_dir / PARAMS_NAME
        self.params = {"patch_size": patch_size, "step": step, "rotations": list(ROTATIONS)}
        if stain is not None:  # patches of another normalisation (or none) are not reused
            self.params["stain"] = stain.to_json()
        self.signature = {s.path.name: _source_signature(s.path) for s in sources}
        previous = read_cache(self.path)
        old = previous.get("sources") if previous is not None and previous.get("params") == self.params else None
        old = old if isinstance(old, dict) else {}
        self.written = {name: sig for name, sig in self.signature.items() if old.get(name) == sig}
        self.reusable = set(self.written)
        self.saved_at = 0.0
        self.dirty = False
        if previous is not None and previous != self._content():
            self.save()  # before any file is rewritten: the old record must not vouch for it

    def _content(self) -> dict:
        return {"params": self.params, "sources": self.written}

    def add(self, name: str) -> None:
        self.written[name] = self.signature[name]
        self.dirty = True
        if time.monotonic() - self.saved_at > 1.0:  # an interrupted run loses at most a second of work
            self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self._content())
        self.saved_at = time.monotonic()
        self.dirty = False

    def save_at_exit(self) -> None:
        """Save what was written; a failure here (a full disk) only means those images are redone."""
        if self.dirty:
            with contextlib.suppress(LymphCVError, OSError):
                self.save()


def write_class_struct(manifest: Manifest, path: Union[str, Path]) -> None:
    """Matlab's ``class_struct.mat`` as step 1 saves it, for users of the original step 2.

    ``class_struct{c}`` is a struct array with one "patient" per image (the tutorial's
    split of file names at '.'): ``base`` (the stem) and ``sub_file`` with ``base`` (the
    file name) and ``fnames_subs`` (a cell row of patch names).
    """
    from scipy.io import savemat

    from lymph_cv.core.fsutil import atomic_path

    cells = np.empty((1, len(manifest.classes)), dtype=object)
    for index, images in enumerate(manifest.by_class().values()):
        patients = np.empty((1, len(images)), dtype=[("base", object), ("sub_file", object)])
        for i, image in enumerate(images):
            sub = np.empty((1, 1), dtype=[("base", object), ("fnames_subs", object)])
            names = np.empty((1, image.patches), dtype=object)
            names[0, :] = image.patch_names()
            sub[0, 0] = (image.name, names)
            patients[0, i] = (image.stem, sub)
        cells[0, index] = patients
    try:
        with atomic_path(path) as temp:
            with open(temp, "wb") as handle:
                savemat(handle, {"class_struct": cells}, do_compression=True)
    except OSError as exc:
        raise write_error(exc, path) from None


#: The bag kind of ``run --mil`` over patient folders (no patches: the cells are the instances).
PATIENT_BAGS = "patient"


class PatchesStage(Stage):
    """Step 1: the patches (or, with ``--direct``, only the manifest) of the data set's images."""

    name = "patches"
    reads = ("DATA/CLASS/*",)
    writes = (f"{PATCH_DIR}/{MANIFEST_NAME}", f"{PATCH_DIR}/*_sub_N.tif")

    def enabled(self, o: RunOptions) -> bool:
        # whole slides are tiled instead (stages.tiling); patient bags are read from their folders
        return not o.slides and (o.mil is None or o.bag != PATIENT_BAGS)

    def check(self, o: RunOptions) -> None:
        check_stain(o, "images", "images")

    def params(self, o: RunOptions) -> dict:
        stain = {} if o.direct else stain_key(o)  # with --direct the images are normalised by `dbs`
        return {"data": o.where(o.data_dir), "classes": list(o.classes), "direct": o.direct, **stain}

    def fingerprint(self, o: RunOptions) -> str:
        return input_fingerprint(o.data_dir, o.classes)

    def complete(self, o: RunOptions) -> bool:
        return (Path(o.workdir) / PATCH_DIR / MANIFEST_NAME).is_file()

    def run(self, o: RunOptions, fresh: bool) -> None:
        out = Path(o.workdir) / PATCH_DIR
        if fresh and out.exists():
            shutil.rmtree(out)
        extract_patches(o.data_dir, out, classes=o.classes, workers=o.workers, write_patches=not o.direct,
                        stain=None if o.direct else stain_target_record(o))


STAGE = PatchesStage()
