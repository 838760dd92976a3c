"""Step 5: classify whole test images by voting over sliding windows, as the tutorial's step 5 does.

For every image of a fold's ``test_w32_parent_K.txt`` the tutorial cuts 36×36 windows centred on a
32-pixel grid, predicts each with pycaffe's ``Classifier.predict`` (10 oversampled 32×32 crops,
softmax probabilities averaged), gives each window one vote for its most probable class and labels
the image with the most-voted class.  We take the same decisions (window probabilities agree with
pycaffe's to float rounding) but batch hundreds (CPU) or thousands (GPU) of crops per forward call,
across windows and images, so a full-size image takes a few seconds on two CPU cores.

Preprocessing, as ``caffe.io.load_image`` + the tutorial-era ``Classifier`` (caffe-facts §10):
pixels become float32 ``u/255`` (RGB), are channel-swapped to BGR and multiplied by 255, and a mean
is subtracted.  Two mean conventions (``mean_mode``):

* ``"resize"`` (default, what the tutorial's predictions used): the 36×36 mean is resized to the
  32×32 net input with ``caffe.io.resize_image`` (min/max normalised bilinear, half-pixel centres)
  and that one 32×32 mean is subtracted from every crop, mirrored or not;
* ``"crop"`` (what training and ``caffe test`` used, §4): the 36×36 mean is subtracted from the
  36×36 window before cropping, i.e. each crop gets the mean at its own offset (the centre crop the
  mean's centre 32×32) and mirrored crops are mirrored after the subtraction.
"""
from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from lymph_cv.core.progress import Progress
from lymph_cv.core.locks import folder_lock, target_lock_name
from lymph_cv.core.devices import CONCRETE_DEVICES, cpu_has_bfloat16, resolve_device, resolves_to_cpu
from lymph_cv.core.grid import WINDOW_SIZE, WINDOW_STEP, window_grid
from lymph_cv.core.images import ColourTransform, read_unit
from lymph_cv.stages.stain import StainRecord, StainTransform, recorded_stain_path
from lymph_cv.stages.stain import read_record as read_stain_record
from lymph_cv.stages.stain import hook as stain_hook
from lymph_cv.errors import ConfigError, EvaluationError, InputError, LymphCVError, TrainingError
from lymph_cv.workdir.layout import DEPLOY_NAME, EVAL_DIR, FOLDS_JSON, HEATMAP_DIR, MANIFEST_NAME, METRICS_JSON, PATCH_DIR
from lymph_cv.workdir.layout import EVAL_FOLD_DIR as FOLD_DIR_TEMPLATE
from lymph_cv.workdir.layout import MEAN_FILE as MEAN_TEMPLATE
from lymph_cv.workdir.layout import TEST_PARENT as PARENT_LIST_TEMPLATE
from lymph_cv.stages.aggregate import Aggregate, aggregate_scores, parse_aggregate, vote_counts
from lymph_cv.stages.results import FoldResult, ImageResult
from lymph_cv.workdir.records import FOLDS, read_record
from lymph_cv.workdir.snapshots import snapshot_series
from lymph_cv.workdir.records import MANIFEST as MANIFEST_RECORD
from lymph_cv.stages.stage import PatchPipelineStage, RunOptions

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Extension the tutorial appends to every parent-list entry.
IMAGE_SUFFIX = ".tif"
MEAN_MODES = ("resize", "crop")
#: pycaffe's oversampling: 4 corners and the centre, then the same 5 mirrored left-right.
OVERSAMPLE_CROPS = 10
#: Crops per forward call by device type: on a CPU small batches stay in cache (measured best
#: around 320 in benchmarks/bench_eval.py); a GPU wants many.
DEFAULT_BATCH_SIZES = {"cpu": 320, "cuda": 5120}
#: The native backend's (lymph_cv.net.amxforward: one crop at a time per core, so the batch only sets
#: how often Python and the crop-cutting thread take turns): 640 measured 1.04-1.27 s per full image
#: against 1.10-1.23 s with 320 and 1.18-1.38 s with 160 (benchmarks/bench_eval.py --batch-size).
NATIVE_BATCH_SIZE = 640
#: Caffe's raw scale for images read as [0, 1] floats.
RAW_SCALE = 255.0
#: Channel swap RGB → BGR (the order of Caffe's Datum and mean files).
CHANNEL_SWAP = (2, 1, 0)
#: The forward pass's arithmetic: float32 is Caffe's; bfloat16 runs the convolutions and poolings in
#: bfloat16 (lymph_cv.net.bf16 and the native engine: AMX on recent Intel CPUs, AVX512-BF16 on AMD
#: Zen 4 and later) and rechecks close windows in float32.
PRECISIONS = ("float32", "bfloat16")
#: With bfloat16, a window whose decision margin (top-1 minus top-2 of its crops' mean probabilities,
#: what decides its vote) is below BF16_MARGIN_BOUND is predicted again in float32 and takes those
#: probabilities.  A vote can only differ from float32's when some probability moves by half the
#: margin or more.  On the published fold-1 model (benchmarks/bench_eval.py --deviation-per-class 3:
#: 12 synthetic full-size images, 16,512 windows) the largest move of any window probability was
#: 0.064 (per image 0.034–0.064, mean 0.0016; 26 votes changed without rechecks):
#: BF16_WORST_DEVIATION rounds it up, and the bound is twice it (the margin's worst change) times
#: BF16_SAFETY.  About 7 % of a full image's windows are rechecked.
BF16_WORST_DEVIATION = 0.065
BF16_SAFETY = 4.0
BF16_MARGIN_BOUND = 2.0 * BF16_WORST_DEVIATION * BF16_SAFETY

MANIFEST = Path(PATCH_DIR) / MANIFEST_NAME


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Crop:
    """One oversampling crop of a window: top-left offset, whether it is mirrored left-right, and
    how many quarter turns counter-clockwise follow (test-time augmentation)."""

    top: int
    left: int
    mirrored: bool
    turns: int = 0


#: Quarter turns test-time augmentation adds to every crop (with the mirror: the 8 symmetries).
TTA_TURNS = (1, 2, 3)


def crop_boxes(height: int, width: int, crop: int, oversample: bool = True, tta: bool = False) -> List[Crop]:
    """The crops pycaffe's ``Classifier.predict`` takes from an ``height × width`` input.

    Oversampling (``caffe.io.oversample``): corners row-major over ``{0, H−c} × {0, W−c}``, then the
    centre ``(int(H/2 − c/2), int(W/2 − c/2))``, then those five again mirrored.  Without it, the
    centre crop alone.  ``tta`` (not pycaffe's) adds every crop turned by 90, 180 and 270 degrees,
    and without oversampling the mirrored centre too: 40 views, or the centre's 8 symmetries."""
    if crop > height or crop > width:
        raise EvaluationError(f"net input {crop}×{crop} is larger than the {height}×{width} window")
    centre = Crop(int(height / 2 - crop / 2), int(width / 2 - crop / 2), False)
    if not oversample:
        boxes = [centre, Crop(centre.top, centre.left, True)] if tta else [centre]
    else:
        plain = [Crop(top, left, False) for top in (0, height - crop) for left in (0, width - crop)] + [centre]
        boxes = plain + [Crop(c.top, c.left, True) for c in plain]
    if tta:
        boxes += [Crop(c.top, c.left, c.mirrored, turns) for turns in TTA_TURNS for c in list(boxes)]
    return boxes


def extract_windows(image: np.ndarray, centres: np.ndarray, size: int = WINDOW_SIZE) -> np.ndarray:
    """(N, C, size, size) windows of a (C, H, W) image at the given centres (a strided gather)."""
    half = size // 2
    views = np.lib.stride_tricks.sliding_window_view(image, (size, size), axis=(1, 2))
    # views[c, y, x] is the window whose top-left is (y, x): move channels next to the pixels.
    tops = centres[:, 0] - half
    lefts = centres[:, 1] - half
    return np.ascontiguousarray(views[:, tops, lefts].transpose(1, 0, 2, 3))


def crop_buffer(count: int, channels: int, size: int, channels_last: bool) -> np.ndarray:
    """An empty float32 (count, channels, size, size) array; with ``channels_last`` its memory is
    (count, size, size, channels), the layout the CPU forward runs in (torch takes it without a copy)."""
    if not channels_last:
        return np.empty((count, channels, size, size), dtype=np.float32)
    return np.empty((count, size, size, channels), dtype=np.float32).transpose(0, 3, 1, 2)


def make_crops(windows: np.ndarray, crops: Sequence[Crop], size: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """(N·len(crops), C, size, size): each window's crops, consecutive, in ``crops`` order.

    ``out`` may be any such array, e.g. a channels-last buffer seen as N×C×H×W (:func:`crop_buffer`)."""
    n, channels = windows.shape[:2]
    if out is None:
        out = np.empty((n * len(crops), channels, size, size), dtype=np.float32)
    grouped = out.view()
    grouped.shape = (n, len(crops), channels, size, size)  # splits the first axis: a view of ``out``, never a copy
    for index, box in enumerate(crops):
        piece = windows[:, :, box.top : box.top + size, box.left : box.left + size]
        piece = piece[..., ::-1] if box.mirrored else piece
        grouped[:, index] = np.rot90(piece, box.turns, axes=(2, 3)) if box.turns else piece
    return out


# ----------------------------------------------------------------------------- pixels and means
def _bilinear_axis(extent_in: int, extent_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Half-pixel centres, as skimage.transform.resize(order=1) maps them; edges clamped.
    src = (np.arange(extent_out, dtype=np.float64) + 0.5) * (extent_in / extent_out) - 0.5
    src = np.clip(src, 0.0, extent_in - 1)
    low = np.floor(src).astype(np.int64)
    high = np.minimum(low + 1, extent_in - 1)
    return low, high, src - low


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``caffe.io.resize_image`` for an H×W×C float image: min/max normalise, bilinear resize,
    de-normalise, float32 (a constant image stays constant)."""
    image = np.asarray(image, dtype=np.float64)
    low_value, high_value = image.min(), image.max()
    if high_value == low_value:
        return np.full((height, width) + image.shape[2:], low_value, dtype=np.float32)
    unit = (image - low_value) / (high_value - low_value)
    r0, r1, rw = _bilinear_axis(image.shape[0], height)
    c0, c1, cw = _bilinear_axis(image.shape[1], width)
    rw = rw.reshape((-1,) + (1,) * (image.ndim - 1))
    rows = unit[r0] * (1 - rw) + unit[r1] * rw
    cw = cw.reshape((1, -1) + (1,) * (image.ndim - 2))
    both = rows[:, c0] * (1 - cw) + rows[:, c1] * cw
    return (both * (high_value - low_value) + low_value).astype(np.float32)


def prepare_mean(mean: np.ndarray, channels: int, window: int, crop: int, mode: str, path: Optional[PathLike] = None) -> np.ndarray:
    """The mean as it is subtracted: (C, crop, crop) for ``"resize"``, (C, window, window) for ``"crop"``.

    The mean must be (C, window, window) with C the deploy net's input channels."""
    if mode not in MEAN_MODES:
        raise ConfigError(f"unknown mean mode {mode!r}", valid=MEAN_MODES)
    expected = (channels, window, window)
    if tuple(mean.shape) != expected:
        raise EvaluationError(f"mean has shape {tuple(mean.shape)}, expected {expected} (deploy channels × window size)", path)
    if mode == "crop" or window == crop:
        return np.ascontiguousarray(mean, dtype=np.float32)
    # pycaffe (≤ 2015-02-17) Net.set_mean(mode='elementwise'): resize the whole mean as H×W×C.
    return np.ascontiguousarray(resize_image(mean.transpose(1, 2, 0), crop, crop).transpose(2, 0, 1))


def load_image(path: PathLike, transform: Optional[ColourTransform] = None) -> np.ndarray:
    """An image as the tutorial's pycaffe sees it after ``load_image``, channel swap and raw scale:
    float32 (3, H, W), BGR, ``float32(u / max) · 255``."""
    # read_unit already delivers BGR, the order CHANNEL_SWAP produces from load_image's RGB.
    values = read_unit(path, transform) * np.float32(RAW_SCALE)
    return np.ascontiguousarray(values.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- decision
def decide(scores: np.ndarray) -> int:
    """The winning class: argmax, ties to the lowest index (the tutorial's ``np.argmax``)."""
    return int(np.argmax(scores))


# ----------------------------------------------------------------------------- parent lists
@dataclass(frozen=True)
class ParentEntry:
    """One line of a parent list: the entry as written, its resolved image and its true label."""

    line: int
    entry: str
    path: Path
    label: int


def _class_of(entry: str, classes: Sequence[str], where: str) -> int:
    parts = PurePosixPath(entry).parts
    if len(parts) > 1 and parts[0] in classes:
        return list(classes).index(parts[0])
    initials = [name[:1].upper() for name in classes]
    letter = entry[:1].upper()
    if letter and initials.count(letter) == 1:
        return initials.index(letter)
    raise InputError(f"{where}: cannot tell the class of {entry!r} (expected a class folder or a first letter of {', '.join(classes)})")


class _MissingImage(InputError):
    """A listed image that does not exist (skippable with ``skip_missing``)."""


def _resolve_image(root: Path, entry: str, where: str) -> Path:
    relative = PurePosixPath(entry)
    if relative.is_absolute() or ".." in relative.parts:
        raise InputError(f"{where}: {entry!r} must be a path inside the image folder")
    candidates = [relative] if relative.suffix.lower() == IMAGE_SUFFIX else [PurePosixPath(entry + IMAGE_SUFFIX), relative]
    root_resolved = root.resolve()
    for candidate in candidates:
        path = root / candidate
        if path.is_file():
            if not path.resolve().is_relative_to(root_resolved):
                raise InputError(f"{where}: {entry!r} leads outside the image folder {root}")
            return path
    raise _MissingImage(f"{where}: image not found under {root} (tried {', '.join(str(c) for c in candidates)})")


@dataclass
class ParentList:
    """A parent list's usable entries and, when skipping was asked for, the entries not found."""

    entries: List[ParentEntry]
    missing: List[str]


def read_parent_list(path: PathLike, images: PathLike, classes: Sequence[str], skip_missing: bool = False) -> ParentList:
    """Entries of a parent list (``CLASS/name[.tif]`` or ``name[.tif]`` per line), resolved under
    ``images``; the label comes from the class folder, or else from the name's first letter.

    A listed image that does not exist is an error, or with ``skip_missing`` left out and named
    in ``missing`` (to run a published list on the images one has)."""
    path, root = Path(path), Path(images)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise InputError("parent list not found", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the parent list ({exc})", path) from exc
    if not root.is_dir():
        raise InputError("image folder not found", root)
    entries, missing = [], []
    for number, raw in enumerate(lines, start=1):
        entry = raw.strip()
        if not entry:
            continue
        where = f"{path}:{number}"
        label = _class_of(entry, classes, where)
        try:
            entries.append(ParentEntry(number, entry, _resolve_image(root, entry, where), label))
        except _MissingImage:
            if not skip_missing:
                raise
            missing.append(entry)
    if not entries and not missing:
        raise EvaluationError("the parent list is empty (expected one image per line)", path)
    if not entries:
        raise InputError(f"none of the {len(missing)} listed images is under {root}", path)
    if missing:
        log.warning("%s: %d of %d listed images not under %s, skipped", path, len(missing), len(missing) + len(entries), root)
    return ParentList(entries, missing)


# ----------------------------------------------------------------------------- the net
#: WindowClassifier backends: torch's CaffeNet (lymph_cv.net.build), or the torch-free pair of the
#: native engine (lymph_cv.net.amxforward: bfloat16 on AMX or AVX512-BF16, float32 on AVX-512 or AVX2) and the numpy
#: float32 forward (lymph_cv.net.plain).
BACKENDS = ("torch", "native")
#: What WindowClassifier(backend=...) takes: ``auto`` picks native where it runs, else torch.
BACKEND_CHOICES = ("auto", "torch")


def native_engine(device: str, precision: str):
    """lymph_cv.net.amxforward when a classifier on ``device`` in ``precision`` may run without torch:
    the CPU (decided without importing torch) and the native engine running ``precision`` here
    (bfloat16: AMX or AVX512-BF16; float32: AVX-512 or AVX2 + FMA); else None (the torch backend)."""
    if precision not in PRECISIONS or not resolves_to_cpu(device, CONCRETE_DEVICES):
        return None
    from lymph_cv.net import amxforward  # it imports its optional extension itself

    return amxforward if precision in amxforward.available_precisions() else None


class WindowClassifier:
    """A deploy net with trained weights, predicting batches of preprocessed crops.

    ``backend`` (:data:`BACKENDS`): ``torch`` always runs torch's CaffeNet; ``auto`` runs a
    classifier on the CPU without torch when :func:`native_engine` allows and lymph_cv.net.plain
    supports the net (the native engine's prefix, then :class:`~lymph_cv.net.plain.PlainNet`'s
    float32 rest; a bfloat16 classifier's float32 rechecks on the engine's float32 prefix), else
    torch.  ``self.backend`` says which; ``self.net`` is the torch CaffeNet (None natively)."""

    def __init__(self, deploy: PathLike, model: PathLike, device: str = "cpu", precision: str = "float32",
                 backend: str = "auto"):
        from lymph_cv.formats.caffe.model import read_caffemodel
        from lymph_cv.formats.caffe.prototxt import read_net_prototxt

        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}", valid=PRECISIONS)
        if backend not in BACKEND_CHOICES:
            raise ConfigError(f"unknown backend {backend!r}", valid=BACKEND_CHOICES)
        #: The arithmetic of :meth:`predict` by default (``PRECISIONS``).
        self.precision = precision
        net_param = read_net_prototxt(deploy)
        data = sorted({layer.type for layer in net_param.layer if layer.type.endswith("Data")})
        if data:
            # (building it would open the layers' databases and mean files, relative to the cwd)
            raise EvaluationError(f"expected a deploy net (an input blob, no data layers), got one with "
                                  f"{', '.join(data)} layers: a train/test net?", deploy)
        weights = read_caffemodel(model)
        self.net = self.plain = self._engine = None
        engine = native_engine(device, precision) if backend == "auto" else None
        if engine is not None:
            self._native(engine, net_param, weights, deploy, model)
        if self.plain is None:
            self._torch_net(net_param, weights, deploy, model, device)
        self.default_batch_size = NATIVE_BATCH_SIZE if self.backend == "native" else DEFAULT_BATCH_SIZES[self.device_type]
        log.debug("window classifier: %s backend, %s", self.backend, precision)

    def _native(self, engine, net_param, weights, deploy: PathLike, model: PathLike) -> None:
        """The torch-free backend, when lymph_cv.net.plain and the native engine both take the net."""
        from lymph_cv.net.plain import PlainNet, UnsupportedNet

        try:
            plain = PlainNet.build(net_param, weights, deploy, model)
        except UnsupportedNet as exc:
            log.debug("torch backend: %s", exc.detail)
            return
        self._shape(plain.inputs, plain.blob_shapes, deploy)
        try:
            self._engine = engine.AMXForward(plain)
        except UnsupportedNet as exc:
            log.debug("torch backend: %s", exc.detail)
            return
        # the engine reads N×C×H×W crops in C order: built so, they reach it without a conversion copy
        self.plain, self.backend, self.device_type, self.channels_last = plain, "native", "cpu", False
        self.output = plain.output
        self.n_classes = int(np.prod(plain.blob_shapes[self.output][1:]))

    def _shape(self, inputs: Sequence[str], blob_shapes: dict, deploy: PathLike) -> None:
        """The one input blob, its channels and square crop size; EvaluationError for other nets."""
        if len(inputs) != 1:
            raise EvaluationError(f"deploy net must have one input blob, has {len(inputs)}", deploy)
        self.input = inputs[0]
        shape = tuple(blob_shapes[self.input])
        if len(shape) != 4 or shape[2] != shape[3]:
            raise EvaluationError(f"deploy net input must be N×C×S×S, got {shape}", deploy)
        self.channels, self.crop = int(shape[1]), int(shape[2])

    def _torch_net(self, net_param, weights, deploy: PathLike, model: PathLike, device: str) -> None:
        import torch

        from lymph_cv.formats.caffe import caffe_pb2
        from lymph_cv.net.build import build_net
        from lymph_cv.net.netspec import fit_weights

        self._torch = torch
        self.backend = "torch"
        self.device = resolve_device(device, CONCRETE_DEVICES)
        self.device_type = self.device.type
        self.net = build_net(net_param, caffe_pb2.TEST, source=deploy)
        self._shape(self.net.input_blobs, self.net.blob_shapes, deploy)
        self.output = self.net.output_blobs[0]
        fit_weights(self.net.load_weights, weights, list(self.net.params()), model, deploy)
        self.net.to(self.device).eval()
        # NHWC is markedly faster for oneDNN's CPU convolutions and pooling; same values.
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.channels_last = self.memory_format == torch.channels_last
        self.net.to(memory_format=self.memory_format)
        out_shape = self.net.blob_shapes[self.output]
        self.n_classes = int(np.prod(out_shape[1:]))
        self._bf16 = None

    def predict(self, crops: np.ndarray, precision: Optional[str] = None) -> np.ndarray:
        """(N, classes) float32 first-output values (``prob``) for N preprocessed crops, computed in
        ``precision`` (default: the classifier's)."""
        if self._engine is not None:
            out = self._engine.predict(crops, precision or self.precision)
        else:
            out = self.forward(crops, precision=precision)[self.output]
        return out.reshape(out.shape[0], -1)

    def forward(self, crops: np.ndarray, blobs: Sequence[str] = (), precision: Optional[str] = None) -> dict:
        """The first output and the named ``blobs`` (e.g. the features a class activation map
        weighs) of one forward pass over N preprocessed crops, as float32 arrays by name.
        (Natively, blobs inside the native engine's prefix come from the numpy forward, in float32.)"""
        if self.plain is not None:
            if set(blobs) <= self._engine.rest_blobs:
                return self._engine.forward(crops, blobs=blobs, precision=precision or self.precision)
            return self.plain.forward({self.input: crops}, blobs=blobs)
        torch = self._torch
        with torch.inference_mode():
            batch = torch.from_numpy(crops).to(self.device).contiguous(memory_format=self.memory_format)
            if (precision or self.precision) == "bfloat16":
                if self._bf16 is None:
                    from lymph_cv.net.bf16 import BFloat16Forward

                    self._bf16 = BFloat16Forward(self.net)
                found = self._bf16.forward({self.input: batch})
            else:
                found = self.net.forward({self.input: batch})
            return {name: found[name].float().contiguous().cpu().numpy() for name in (self.output, *blobs)}


# ----------------------------------------------------------------------------- workdir defaults
def latest_snapshot(folder: PathLike) -> Path:
    """The ``*_iter_N.caffemodel`` with the highest N in ``folder``; of several snapshot series (the
    plain and the dropout net), the one the fold's rendered solver names, else an InputError."""
    folder = Path(folder)
    series = snapshot_series(folder, "caffemodel")
    if not series:
        raise InputError("no snapshot *_iter_N.caffemodel found (train the fold or pass --model)", folder)
    if len(series) > 1:
        prefix = _solver_prefix(folder)
        if prefix not in series:
            raise InputError(f"snapshots of several nets ({', '.join(sorted(series))}); pass --model", folder)
        series = {prefix: series[prefix]}
    (found,) = series.values()
    return found[max(found)]


def _solver_prefix(folder: Path) -> Optional[str]:
    """``snapshot_prefix`` of the fold's rendered solver (``K-alexnet_solver_ada.prototxt``), if any."""
    from lymph_cv.formats.caffe.prototxt import read_solver
    from lymph_cv.workdir.layout import SOLVER_NAME

    solver = folder / SOLVER_NAME.format(fold=folder.name)
    if not solver.is_file():
        return None
    try:
        return read_solver(solver).snapshot_prefix or None
    except LymphCVError:
        return None


def workdir_info(workdir: PathLike) -> dict:
    """What the earlier stages recorded (``folds.json`` and the manifest it names, by default
    ``subs/manifest.json``): ``classes``, ``images`` (the data folder), ``window`` (patch size)
    and ``stride`` (grid step), where known."""
    workdir = Path(workdir)
    folds = read_record(workdir / FOLDS_JSON, FOLDS) or {}
    manifest = read_record(workdir / folds.get("manifest", MANIFEST), MANIFEST_RECORD) or {}
    found = {
        "classes": manifest.get("classes") or folds.get("classes"),
        "images": manifest.get("data_dir") or folds.get("data_dir"),
        "window": manifest.get("patch_size"),
        "stride": manifest.get("step"),
    }
    return {key: value for key, value in found.items() if value}


def default_classes(entries: Iterable[str]) -> List[str]:
    """Class names when no workdir records them: the parent list's class folders, sorted (the
    tutorial's labels CLL=0, FL=1, MCL=2 are in that order)."""
    folders = sorted({PurePosixPath(e.strip()).parts[0] for e in entries if len(PurePosixPath(e.strip()).parts) > 1})
    return folders


# ----------------------------------------------------------------------------- evaluation
def _load(path: Path, stain: Optional[StainTransform]) -> Tuple[np.ndarray, bool]:
    """``load_image`` through the stain hook; also whether the hook left the image unchanged."""
    transform = stain_hook(stain)
    image = load_image(path, transform)
    return image, transform is not None and transform.unchanged


def _prefetch(paths: Sequence[Path], stain: Optional[StainTransform] = None,
              unchanged: Optional[List[int]] = None) -> Iterator[Tuple[int, np.ndarray]]:
    """Load images one ahead in a thread (OpenCV decodes without the GIL) while the net runs;
    the indices of images the stain normalisation left unchanged go to ``unchanged``."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load, paths[0], stain) if paths else None
        for index in range(len(paths)):
            image, kept = pending.result()
            if kept and unchanged is not None:
                unchanged.append(index)
            if index + 1 < len(paths):
                pending = pool.submit(_load, paths[index + 1], stain)
            yield index, image


def _batches(pieces: Iterable[Tuple[int, np.ndarray]], per_batch: int) -> Iterator[List[Tuple[int, int, np.ndarray]]]:
    """Group (owner, windows) pieces into lists of (owner, start, windows) with ``per_batch`` windows
    each (the last may be smaller); a batch spans image boundaries."""
    pending: List[Tuple[int, int, np.ndarray]] = []
    size = 0
    for owner, windows in pieces:
        start = 0
        while start < len(windows):
            take = min(per_batch - size, len(windows) - start)
            pending.append((owner, start, windows[start : start + take]))
            size += take
            start += take
            if size == per_batch:
                yield pending
                pending, size = [], 0
    if pending:
        yield pending


def window_scores(crop_probs: np.ndarray, crops_per_window: int) -> np.ndarray:
    """(windows, classes): each window's crops' probabilities averaged (the crops consecutive)."""
    return crop_probs.reshape(len(crop_probs) // crops_per_window, crops_per_window, -1).mean(axis=1)


def decision_margins(probs: np.ndarray) -> np.ndarray:
    """Each row's top-1 minus top-2 value (+inf with fewer than two classes)."""
    if probs.shape[1] < 2:
        return np.full(len(probs), np.inf, dtype=probs.dtype)
    top = np.partition(probs, -2, axis=1)
    return top[:, -1] - top[:, -2]


@dataclass
class Rechecks:
    """A bfloat16 evaluation's counts: windows classified, and of them predicted again in float32."""

    windows: int = 0
    rechecked: int = 0


class _Rechecker:
    """Windows whose bfloat16 margin is below ``bound``, predicted again in float32 in batches of
    about ``batch_size`` crops; their float32 probabilities replace the bfloat16 ones in place."""

    def __init__(self, classifier: WindowClassifier, crops_per_window: int, batch_size: int, bound: float,
                 counts: Optional[Rechecks]):
        self.classifier, self.per_window, self.batch_size, self.bound = classifier, crops_per_window, batch_size, bound
        self.counts = counts if counts is not None else Rechecks()
        self.pending: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (probs, rows, their crops)
        self.size = 0

    def add(self, probs: np.ndarray, crops: np.ndarray) -> None:
        """Queue the close windows of one batch (``probs`` (N, classes), ``crops`` their N × crops)."""
        self.counts.windows += len(probs)
        rows = np.flatnonzero(decision_margins(probs) < self.bound)
        if not len(rows):
            return
        picked = (rows[:, None] * self.per_window + np.arange(self.per_window)).ravel()
        self.pending.append((probs, rows, crops[picked]))  # a copy: the crops' buffer is reused
        self.size += len(picked)
        self.counts.rechecked += len(rows)
        if self.size >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Predict the queued windows in float32."""
        if not self.pending:
            return
        crops = np.concatenate([c for _, _, c in self.pending])
        n = len(crops)
        if self.classifier.backend == "torch":
            from lymph_cv.net.fuse import MIN_FUSED_BATCH

            if n < MIN_FUSED_BATCH:
                # below it a float32 convolution may leave oneDNN (other rounding than the float32 path's)
                crops = np.concatenate([crops, np.zeros((MIN_FUSED_BATCH - n,) + crops.shape[1:], crops.dtype)])
        probs = self.classifier.predict(crops, precision="float32")[:n]
        probs = window_scores(probs, self.per_window)
        offset = 0
        for target, rows, _ in self.pending:
            target[rows] = probs[offset : offset + len(rows)]
            offset += len(rows)
        self.pending, self.size = [], 0


def classify_windows(
    classifier: WindowClassifier,
    images: Iterable[Tuple[int, np.ndarray]],
    mean: np.ndarray,
    *,
    window: int,
    oversample: bool,
    tta: bool = False,
    mean_mode: str,
    batch_size: int,
    meanwhile: Optional[Callable[[], None]] = None,
    margin_bound: Optional[float] = None,
    rechecks: Optional[Rechecks] = None,
) -> dict:
    """Window probabilities per owner for a stream of (owner, (N, C, window, window)) windows.

    ``mean`` is :func:`prepare_mean`'s.  The result maps owner → (N, classes) float32 probabilities
    averaged over the crops, as ``Classifier.predict`` returns them.  ``meanwhile`` is called once,
    just before the first forward pass (e.g. to start imports the outputs need: the passes leave
    a core idle part of the time).  A bfloat16 classifier's windows with a decision margin below
    ``margin_bound`` (default :data:`BF16_MARGIN_BOUND`) take float32 probabilities instead;
    ``rechecks`` receives the counts."""
    crop = classifier.crop
    boxes = crop_boxes(window, window, crop, oversample, tta)
    per_batch = max(1, batch_size // len(boxes))
    parts: dict = {}
    batches = _batches(images, per_batch)
    recheck = None
    if classifier.precision == "bfloat16":
        bound = BF16_MARGIN_BOUND if margin_bound is None else margin_bound
        recheck = _Rechecker(classifier, len(boxes), batch_size, bound, rechecks)

    def prepare(buffer: np.ndarray) -> Optional[Tuple[List[Tuple[int, int, np.ndarray]], np.ndarray]]:
        """The next batch and its preprocessed crops (in ``buffer``); None after the last."""
        batch = next(batches, None)
        if batch is None:
            return None
        out = buffer[: sum(len(w) for _, _, w in batch) * len(boxes)]
        offset = 0
        for _, _, windows in batch:
            if mean_mode == "crop":
                windows = windows - mean  # each crop then carries the mean at its own offset
            make_crops(windows, boxes, crop, out[offset : offset + len(windows) * len(boxes)])
            offset += len(windows) * len(boxes)
        if mean_mode == "resize":
            out -= mean
        return batch, out

    # Built channels-last where the net runs so: the batch reaches torch without a conversion copy.
    # Two buffers: a thread cuts the next batch's crops (numpy's copies release the GIL) while the
    # net runs on this one, instead of the cores waiting for them between forward passes.
    buffers = [crop_buffer(per_batch * len(boxes), classifier.channels, crop, classifier.channels_last) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crops") as pool:
        pending = pool.submit(prepare, buffers[0])
        for index in itertools.count(1):
            ready = pending.result()
            if ready is None:
                break
            batch, out = ready
            pending = pool.submit(prepare, buffers[index % 2])
            if meanwhile is not None:
                meanwhile()
                meanwhile = None
            probs = window_scores(classifier.predict(out), len(boxes))
            if recheck is not None:
                recheck.add(probs, out)
            offset = 0
            for owner, _, windows in batch:
                parts.setdefault(owner, []).append(probs[offset : offset + len(windows)])
                offset += len(windows)
    if recheck is not None:
        recheck.flush()
    return {owner: np.concatenate(chunks) for owner, chunks in parts.items()}


def evaluate_images(
    classifier: WindowClassifier,
    entries: Sequence[ParentEntry],
    mean: np.ndarray,
    *,
    window: int = WINDOW_SIZE,
    stride: int = WINDOW_STEP,
    oversample: bool = True,
    tta: bool = False,
    mean_mode: str = "resize",
    aggregate: Aggregate = Aggregate("vote"),
    batch_size: Optional[int] = None,
    progress: bool = True,
    stain: Optional[StainTransform] = None,
    unchanged: Optional[List[int]] = None,
    meanwhile: Optional[Callable[[], None]] = None,
    margin_bound: Optional[float] = None,
    rechecks: Optional[Rechecks] = None,
) -> List[ImageResult]:
    """Classify every entry's image by its windows; one forward call per batch of crops.

    ``stain`` normalises each whole image as it is read (the indices of images it left unchanged
    go to ``unchanged``); ``meanwhile``, ``margin_bound``, ``rechecks``: see :func:`classify_windows`."""
    mean = prepare_mean(mean, classifier.channels, window, classifier.crop, mean_mode)
    batch_size = batch_size or classifier.default_batch_size
    centres: dict = {}
    # A bar on a terminal, plain periodic lines into a file or pipe.
    bar = Progress(len(entries), "evaluate", "img", quiet=not progress, leave=False)

    def stream() -> Iterator[Tuple[int, np.ndarray]]:
        for index, image in _prefetch([e.path for e in entries], stain, unchanged):
            if image.shape[0] != classifier.channels:
                raise EvaluationError(f"image has {image.shape[0]} channels, the net expects {classifier.channels}", entries[index].path)
            grid = window_grid(image.shape[1], image.shape[2], window, stride)
            if not len(grid):
                raise InputError(f"image of {image.shape[2]}×{image.shape[1]} pixels holds no {window}-pixel window", entries[index].path)
            centres[index] = grid
            yield index, extract_windows(image, grid, window)
            bar.update(1)

    try:
        probs = classify_windows(classifier, stream(), mean, window=window, oversample=oversample, tta=tta,
                                 mean_mode=mean_mode, batch_size=batch_size, meanwhile=meanwhile,
                                 margin_bound=margin_bound, rechecks=rechecks)
    finally:
        bar.close()
    results = []
    for index, entry in enumerate(entries):
        window_probs = probs[index]
        scores = aggregate_scores(window_probs, aggregate)
        results.append(ImageResult(entry.entry, entry.path, entry.label, decide(scores),
                                   vote_counts(window_probs, classifier.n_classes), scores, centres[index], window_probs))
    return results



def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(f"{what} not found", path)
    return path


def fold_output_dir(workdir: PathLike, fold: int) -> Path:
    """``WORKDIR/eval/fold_K``."""
    return Path(workdir) / EVAL_DIR / FOLD_DIR_TEMPLATE.format(fold=fold)


def evaluate_fold(
    workdir: PathLike,
    fold: int,
    *,
    model: Optional[PathLike] = None,
    deploy: Optional[PathLike] = None,
    mean: Optional[PathLike] = None,
    parent_list: Optional[PathLike] = None,
    images: Optional[PathLike] = None,
    classes: Optional[Sequence[str]] = None,
    skip_missing: bool = False,
    device: str = "cpu",
    oversample: bool = True,
    tta: bool = False,
    mean_mode: str = "resize",
    aggregate: Union[str, Aggregate] = "vote",
    window: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: Optional[int] = None,
    precision: str = "float32",
    progress: bool = True,
    stain: Optional[StainRecord] = None,
    recorded_stain: bool = True,
    meanwhile: Optional[Callable[[], None]] = None,
) -> FoldResult:
    """Evaluate fold ``fold`` of ``workdir`` the tutorial's way; nothing is written.

    Defaults follow the workdir layout: model = the highest ``K/*_iter_N.caffemodel``, deploy =
    ``K/deploy_train32.prototxt``, mean = ``DB_train_w32_K.binaryproto``, parent list =
    ``test_w32_parent_K.txt``, images / classes / window / stride = what ``folds.json`` and
    ``subs/manifest.json`` record.  With all of model, deploy, mean, parent list and images given
    (and classes, or class folders in the parent list) the workdir need not exist.
    ``skip_missing`` evaluates the listed images that exist (e.g. a published parent list over a
    partial image folder) instead of failing on the first missing one.
    ``stain``: normalise the images with this target; without it (and with ``recorded_stain``) the
    one the workdir records for this fold (``stain_K.json`` from ``dbs``, else the patch folder's
    ``stain.json``) is applied as recorded, never refitted, so evaluation sees training's pixels.
    ``meanwhile`` is called once, just before the first forward pass (:func:`classify_windows`).
    ``precision``: :data:`PRECISIONS` (bfloat16: the votes stay float32's, see :data:`BF16_MARGIN_BOUND`)."""
    workdir = Path(workdir)
    fold_dir = workdir / str(fold)
    if mean_mode not in MEAN_MODES:
        raise ConfigError(f"unknown mean mode {mean_mode!r}", valid=MEAN_MODES)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", valid=PRECISIONS)
    aggregate = parse_aggregate(aggregate) if isinstance(aggregate, str) else aggregate
    info = workdir_info(workdir) if workdir.is_dir() else {}
    parent_list = _existing(Path(parent_list) if parent_list else workdir / PARENT_LIST_TEMPLATE.format(fold=fold), "parent list")
    if images is None:
        if "images" not in info:
            raise ConfigError("no image folder recorded in the workdir (subs/manifest.json); pass --images", workdir)
        images = info["images"]
    if classes is None:
        classes = info.get("classes")
    if not classes:
        try:
            lines = parent_list.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the parent list ({exc})", parent_list) from exc
        if not any(line.strip() for line in lines):
            raise InputError("the parent list is empty (expected one image per line)", parent_list)
        classes = default_classes(lines)
    if not classes:
        raise ConfigError("class names unknown: the workdir records none and the parent list has no class folders; pass --classes")
    classes = list(classes)
    window = int(window or info.get("window") or WINDOW_SIZE)
    stride = int(stride or info.get("stride") or WINDOW_STEP)
    if window < 2 or window % 2 or stride < 1:
        raise ConfigError(f"window must be an even size ≥ 2 and stride ≥ 1, got window {window}, stride {stride}")
    listed = read_parent_list(parent_list, images, classes, skip_missing)
    entries = listed.entries

    deploy = _existing(Path(deploy) if deploy else fold_dir / DEPLOY_NAME, "deploy net")
    model = _existing(Path(model), "model") if model else latest_snapshot(fold_dir)
    mean_path = _existing(Path(mean) if mean else workdir / MEAN_TEMPLATE.format(fold=fold), "mean file")
    from lymph_cv.formats.caffe.blob import read_mean

    mean_array = read_mean(mean_path)
    asked = precision
    if precision == "bfloat16" and resolves_to_cpu(device, CONCRETE_DEVICES) and not cpu_has_bfloat16():
        # bfloat16's votes are float32's (the rechecks): float32 gives them faster here
        log.warning("warning: this CPU has no bfloat16 arithmetic (neither AMX nor AVX512-BF16): evaluating in "
                    "float32, which gives the votes bfloat16 would, faster than emulated bfloat16")
        precision = "float32"
    classifier = WindowClassifier(deploy, model, device, precision)
    if classifier.n_classes != len(classes):
        raise EvaluationError(f"deploy net {deploy} outputs {classifier.n_classes} values per window, "
                              f"but there are {len(classes)} classes ({', '.join(classes)})")
    prepare_mean(mean_array, classifier.channels, window, classifier.crop, mean_mode, mean_path)  # checks the shape
    stain_source = None
    if stain is None and recorded_stain and workdir.is_dir():
        stain_source = recorded_stain_path(workdir, fold)
        stain = None if stain_source is None else read_stain_record(stain_source)
        if stain is not None:
            log.info("fold %d: images normalised with the recorded %s target %s", fold, stain.method, stain_source)
    transform = None if stain is None or stain.method == "none" else stain.transform
    log.info("fold %d: %d images, model %s, %s crops per window, mean %s, aggregate %s",
             fold, len(entries), model, len(crop_boxes(window, window, classifier.crop, oversample, tta)), mean_mode, aggregate)
    unchanged: List[int] = []
    rechecks = Rechecks()
    results = evaluate_images(classifier, entries, mean_array, window=window, stride=stride, oversample=oversample, tta=tta,
                              mean_mode=mean_mode, aggregate=aggregate, batch_size=batch_size, progress=progress,
                              stain=transform, unchanged=unchanged, meanwhile=meanwhile, rechecks=rechecks)
    for index in unchanged:
        log.warning("warning: %s: stain normalisation left it unchanged (too little tissue)", entries[index].path)
    settings = {
        "model": str(model), "deploy": str(deploy), "mean": str(mean_path), "parent_list": str(parent_list),
        "images": str(images), "skipped_missing": listed.missing, "device": device, "mean_mode": mean_mode, "oversample": oversample, "tta": tta,
        "crops": len(crop_boxes(window, window, classifier.crop, oversample, tta)), "aggregate": str(aggregate),
        "window": window, "stride": stride, "crop": classifier.crop,
        "batch_size": batch_size or classifier.default_batch_size, "precision": precision,
        **({"precision_asked": asked} if asked != precision else {}),
        "stain": None if transform is None else {**transform.to_json(), "record": None if stain_source is None else str(stain_source),
                                                 "unchanged": [entries[i].entry for i in unchanged]},
    }
    if precision == "bfloat16":
        settings["rechecked"] = {"bound": BF16_MARGIN_BOUND, "windows": rechecks.windows, "rechecked": rechecks.rechecked}
    settings["backend"] = classifier.backend  # native: no torch (lymph_cv.net.amxforward, lymph_cv.net.plain)
    return FoldResult(fold, classes, results, settings)


class EvaluateStage(PatchPipelineStage):
    """Step 5: each fold's test images with its final snapshot (``eval/fold_K/``)."""

    name = "evaluate"
    reads = (PARENT_LIST_TEMPLATE, MEAN_TEMPLATE, f"{{fold}}/{DEPLOY_NAME}", "{fold}/*_iter_N.caffemodel")
    writes = (f"{EVAL_DIR}/{FOLD_DIR_TEMPLATE}/{METRICS_JSON}", f"{EVAL_DIR}/{FOLD_DIR_TEMPLATE}/")
    per_fold = True

    def enabled(self, o: RunOptions) -> bool:
        return super().enabled(o) and not o.slides  # whole slides: slide by slide (stages.slide_eval)

    def check(self, o: RunOptions) -> None:
        try:
            parse_aggregate(o.aggregate)
        except ConfigError as exc:
            raise ConfigError(exc.detail, "--aggregate") from None
        try:
            resolve_device(o.device, CONCRETE_DEVICES)  # evaluation takes a concrete device: no auto
        except ConfigError as exc:
            raise ConfigError(exc.detail, "--device") from None

    def params(self, o: RunOptions) -> dict:
        params = {"oversample": o.oversample, "aggregate": o.aggregate, "device": o.device, "folds": o.fold_list}
        # Absent when off: earlier runs keep their key.
        if o.tta:
            params["tta"] = True
        if o.precision != "float32":
            params["precision"] = o.precision
        if o.heatmaps:
            params["heatmaps"] = True
        return params

    @staticmethod
    def evaluated(o: RunOptions, fold: int) -> bool:
        """Fold ``fold``'s evaluation is on disk (with its heatmaps, when asked for)."""
        metrics = fold_output_dir(o.workdir, fold) / METRICS_JSON
        return metrics.is_file() and (not o.heatmaps or (metrics.parent / HEATMAP_DIR).is_dir())

    def complete(self, o: RunOptions) -> bool:
        return all(self.evaluated(o, k) for k in o.fold_list)

    def run(self, o: RunOptions, fresh: bool) -> None:
        from lymph_cv.core.preload import Preload
        from lymph_cv.stages.figures import MODULES
        from lymph_cv.stages.report import write_fold

        for k, model in folds_to_evaluate(o, fresh, self.evaluated):
            preload = Preload(MODULES)  # matplotlib, imported while the net runs
            result = evaluate_fold(o.workdir, k, model=model, device=o.device, oversample=o.oversample, tta=o.tta,
                                   aggregate=o.aggregate, precision=o.precision, meanwhile=preload.start)
            preload.wait()
            record = write_locked(fold_output_dir(o.workdir, k), lambda out: write_fold(result, out, heatmaps=o.heatmaps))
            log.info("fold %d: accuracy %.3f on %d test images", k, record["accuracy"], len(result.images))


def folds_to_evaluate(o: RunOptions, fresh: bool, evaluated: Callable[[RunOptions, int], bool]
                      ) -> Iterator[Tuple[int, Path]]:
    """(fold, its final snapshot) for every fold of the run still to evaluate (every fold when
    ``fresh``); a TrainingError for a fold without its final snapshot."""
    from lymph_cv.stages.train import final_snapshot, fold_solver

    for k in o.fold_list:
        if not fresh and evaluated(o, k):
            continue
        model = final_snapshot(o.workdir, k)
        if model is None:
            raise TrainingError(f"fold {k} has no final snapshot; rerun `lymph-cv run` to train it",
                                fold_solver(o.workdir, k))
        yield k, model


def write_locked(out: Path, write: Callable[[Path], dict]) -> dict:
    """``write(out)`` under the lock `lymph-cv evaluate` takes for ``out`` (replaced as a whole)."""
    with folder_lock(out.parent, name=target_lock_name(out), sweep=False):
        return write(out)


STAGE = EvaluateStage()
