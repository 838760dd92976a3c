"""Slide-level evaluation: every tissue tile of a test slide scored, the slide labelled by its tiles.

A slide's score per class is the fraction of its tiles predicted that class (the follicular-lymphoma
system's score), kept beside the mean tile probability; its label is the argmax of the fractions, or
for two classes the second class when its fraction reaches ``threshold``.  Tiles are read from the
slide as the tiler cut them (level, position, side, resampled to the patch size) and preprocessed as
image evaluation preprocesses windows (:mod:`lymph_cv.stages.evaluate`: the fold's mean, ``resize``
or ``crop`` mean mode, optional oversampling), so tile probabilities are those a patch of the
database would get.

Class activation maps (nets with global average pooling before the classifier, as the ResNets):
the last convolutional features of each tile's centre crop weighted by the classifier's weights
(plus its bias), one (h, w) map per class whose spatial mean is the class's score.  The features
blob and the classifier layer are found from the net: the classifier is the architecture's head
(``render.json``'s arch in the registry) or else the last InnerProduct, the features the bottom of
the global average pooling that feeds it.

A fold's results are a :class:`~lymph_cv.stages.results.FoldResult` with one entry per slide
(scores = tile fractions), so the fold folder, the pooled report and its ROC work unchanged; the
tile-level metrics, ``slides.csv`` and the heatmaps are written beside them.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from lymph_cv.core.images import ColourTransform
from lymph_cv.core.progress import Progress
from lymph_cv.errors import ConfigError, EvaluationError, InputError, UnsupportedError
from lymph_cv.formats import slides as slide_files
from lymph_cv.stages.evaluate import WindowClassifier, crop_boxes, decide, make_crops, prepare_mean
from lymph_cv.stages.metrics import confusion_matrix, summary_metrics
from lymph_cv.stages.results import FoldResult, ImageResult
from lymph_cv.stages.roc import roc_record
from lymph_cv.stages.tiles import Tile, TileParams, TileSet, plan_slide, read_tile, read_tile_set
from lymph_cv.core.devices import CONCRETE_DEVICES, resolve_device
from lymph_cv.stages.stage import RunOptions, Stage
from lymph_cv.workdir.layout import (DEPLOY_NAME, EVAL_DIR, EVAL_FOLD_DIR, FOLDS_JSON, HEATMAP_DIR, MEAN_FILE, METRICS_JSON,
                                     PATCH_DIR, RENDER_JSON, TEST_PARENT)
from lymph_cv.workdir.records import ANY, FOLDS, read_record

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: The per-slide table beside images.csv in eval/fold_K/.
SLIDES_CSV = "slides.csv"
#: Heatmap file suffixes inside eval/fold_K/heatmaps/ (after the slide's flat name).
PROBABILITY_SUFFIX = ".png"
CAM_SUFFIX = ".cam.png"
#: Longer side (pixels) of the thumbnail heatmaps are drawn on (the figure's panel at most:
#: slide_heatmaps.MAX_PANEL inches at its DPI).
DEFAULT_THUMB_SIDE = 512
#: Tiles read per chunk before they are batched into forward calls (bounds the pixels held).
READ_CHUNK = 64
#: Caffe's pooling enum value of average pooling (PoolingParameter.AVE).
AVE_POOL = 1
#: Decimals of fractions and probabilities in slides.csv.
CSV_DIGITS = 6


# ----------------------------------------------------------------------------- tiles
@dataclass
class SlideTiles:
    """One test slide and its tissue tiles (:class:`lymph_cv.stages.tiles.Tile`, from the tile
    manifest or planned on the fly)."""

    path: Path
    entry: str  # as in the parent list: CLASS/slide.ext
    label: int
    tiles: List[Tile]

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def xs(self) -> np.ndarray:
        return np.array([t.x for t in self.tiles], dtype=np.int64)

    @property
    def ys(self) -> np.ndarray:
        return np.array([t.y for t in self.tiles], dtype=np.int64)

    @property
    def extent(self) -> int:
        """Level-0 side of the tiles (one tiling: the same for all)."""
        return self.tiles[0].extent if self.tiles else 0

    @property
    def out_size(self) -> int:
        return self.tiles[0].size if self.tiles else 0

    @property
    def centres(self) -> np.ndarray:
        """(N, 2) level-0 (row, col) tile centres (what ImageResult calls centres)."""
        half = self.extent // 2
        return np.stack([self.ys + half, self.xs + half], axis=1) if self.tiles else np.zeros((0, 2), np.int64)


def plan_test_slide(path: PathLike, entry: str, label: int, params: TileParams) -> SlideTiles:
    """A slide's tissue tiles planned with ``params`` (no tile manifest needed)."""
    record, tiles, _mask, _geometry = plan_slide(path, params, label=label)
    return SlideTiles(Path(path), entry, label, tiles)


def read_tiles(slide, tiles: Sequence[Tile], transform: Optional[ColourTransform] = None) -> np.ndarray:
    """(n, 3, S, S) float32 BGR 0–255 of ``tiles`` of the open slide, read as the tiler wrote them
    (:func:`lymph_cv.stages.tiles.read_tile`), in the layout evaluation's windows have."""
    size = tiles[0].size
    out = np.empty((len(tiles), 3, size, size), dtype=np.float32)
    for index, tile in enumerate(tiles):
        out[index] = read_tile(slide, tile, transform).transpose(2, 0, 1)
    return out


# ----------------------------------------------------------------------------- class activation maps
@dataclass(frozen=True)
class CamHead:
    """Where a class activation map comes from: the features blob and the classifier's weights."""

    features: str
    classifier: str
    weights: np.ndarray  # (classes, channels)
    bias: np.ndarray  # (classes,)

    def maps(self, features: np.ndarray) -> np.ndarray:
        """(N, classes, h, w) maps of (N, channels, h, w) features: ``W · F + b`` per position."""
        cams = np.einsum("kc,nchw->nkhw", self.weights, features, optimize=True)
        return cams + self.bias[None, :, None, None]


def cam_head(classifier: WindowClassifier, head: Optional[str] = None) -> CamHead:
    """The CAM head of a deploy net: ``head`` (the architecture's classifier layer) or else the last
    InnerProduct; its bottom must come from a global average pooling, whose bottom are the features.
    UnsupportedError for nets without one (e.g. the tutorial's AlexNet variant)."""
    if classifier.net is None:
        raise UnsupportedError("class activation maps read the torch net's layers; this classifier runs natively "
                               "(WindowClassifier backend='torch')")
    params = classifier.net.layer_params
    if head is None:
        inner = [p for p in params if p.type == "InnerProduct"]
        if not inner:
            raise UnsupportedError("class activation maps need a classifier (InnerProduct) layer; the net has none")
        head = inner[-1].name
    position = next((i for i, p in enumerate(params) if p.name == head), None)
    if position is None or params[position].type != "InnerProduct":
        raise UnsupportedError(f"class activation maps: the net has no InnerProduct layer {head!r}")
    fc = params[position]
    (pooled,) = fc.bottom
    producer = next((p for p in reversed(params[:position]) if pooled in p.top), None)
    if (producer is None or producer.type != "Pooling" or not producer.pooling_param.global_pooling
            or producer.pooling_param.pool != AVE_POOL):
        raise UnsupportedError(f"class activation maps need global average pooling before {head!r} "
                               f"(as the ResNets have); {pooled!r} comes from {producer.type if producer else 'no layer'}")
    blobs = classifier.net.layer(head).blobs
    weights = blobs[0].detach().float().cpu().numpy().reshape(fc.inner_product_param.num_output, -1)
    bias = blobs[1].detach().float().cpu().numpy().reshape(-1) if len(blobs) > 1 else np.zeros(len(weights), np.float32)
    return CamHead(producer.bottom[0], head, weights, bias)


# ----------------------------------------------------------------------------- scoring
@dataclass
class SlideScores:
    """One slide's tiles, their probabilities and (optionally) their class activation maps."""

    tiles: SlideTiles
    probs: np.ndarray  # (N, classes)
    cams: Optional[np.ndarray] = None  # (N, classes, h, w) float16

    @property
    def votes(self) -> np.ndarray:
        return np.bincount(self.probs.argmax(axis=1), minlength=self.probs.shape[1]) if len(self.probs) else \
            np.zeros(self.probs.shape[1], dtype=np.int64)

    @property
    def fractions(self) -> np.ndarray:
        """Share of the tiles predicted each class (the slide's score)."""
        return self.votes / max(len(self.probs), 1)

    @property
    def mean_probs(self) -> np.ndarray:
        return self.probs.mean(axis=0)


def slide_decision(fractions: np.ndarray, threshold: Optional[float] = None) -> int:
    """The slide's class: argmax of the fractions (ties to the lowest index), or with two classes
    and a ``threshold`` the second class when its fraction is at least the threshold."""
    if threshold is not None:
        if len(fractions) != 2:
            raise ConfigError(f"--threshold is for two classes; there are {len(fractions)}")
        return int(fractions[1] >= threshold)
    return decide(np.asarray(fractions))


def score_slide(classifier: WindowClassifier, tiles: SlideTiles, mean: np.ndarray, *, mean_mode: str = "resize",
                oversample: bool = False, batch_size: Optional[int] = None, head: Optional[CamHead] = None,
                transform: Optional[ColourTransform] = None) -> SlideScores:
    """Probabilities (and with ``head`` the CAMs of the centre crop) of every tile of one slide.

    ``mean`` is the fold's (C, S, S) mean, ``transform`` the stain normalisation the tiles were
    written with; at most ``READ_CHUNK`` tiles' pixels are held at a time."""
    window = tiles.out_size
    prepared = prepare_mean(mean, classifier.channels, window, classifier.crop, mean_mode)
    boxes = crop_boxes(window, window, classifier.crop, oversample)
    offset = int(window / 2 - classifier.crop / 2)
    centre = next(i for i, b in enumerate(boxes) if not b.mirrored and not b.turns and (b.top, b.left) == (offset, offset))
    per_call = max(1, min(READ_CHUNK, (batch_size or classifier.default_batch_size) // len(boxes)))
    probs, cams = [], []
    with slide_files.open_slide(tiles.path) as slide:
        for start in range(0, len(tiles), per_call):
            chunk = tiles.tiles[start : start + per_call]
            windows = read_tiles(slide, chunk, transform)
            if mean_mode == "crop":
                windows -= prepared
            crops = make_crops(windows, boxes, classifier.crop)
            if mean_mode == "resize":
                crops -= prepared
            blobs = classifier.forward(crops, (head.features,) if head else ())
            probs.append(blobs[classifier.output].reshape(len(chunk), len(boxes), -1).mean(axis=1))
            if head is not None:
                features = blobs[head.features]
                features = features.reshape((len(chunk), len(boxes)) + features.shape[1:])[:, centre]
                cams.append(head.maps(features).astype(np.float16))
    n_classes = classifier.n_classes
    return SlideScores(tiles, np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32),
                       np.concatenate(cams) if cams else None)


@dataclass
class SlideFold:
    """A fold's slide-level evaluation: the slides as a FoldResult and their tile scores."""

    result: FoldResult
    slides: List[SlideScores]
    threshold: Optional[float] = None


def evaluate_slides(classifier: WindowClassifier, slides: Sequence[SlideTiles], mean: np.ndarray, classes: Sequence[str],
                    fold: int = 1, *, mean_mode: str = "resize", oversample: bool = False, batch_size: Optional[int] = None,
                    threshold: Optional[float] = None, cams: Optional[bool] = True, head: Optional[str] = None,
                    transform: Optional[ColourTransform] = None, settings: Optional[dict] = None,
                    progress: bool = True) -> SlideFold:
    """Score every tile of every slide and label the slides (see the module docstring).

    ``cams``: also the class activation maps (True: an UnsupportedError for nets without global
    average pooling; None: where the net has one, else a warning and none; False: none)."""
    if classifier.n_classes != len(classes):
        raise EvaluationError(f"the net outputs {classifier.n_classes} values per tile, but there are "
                              f"{len(classes)} classes ({', '.join(classes)})")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be a fraction in [0, 1], got {threshold}")
    cam = None
    if cams or cams is None:
        try:
            cam = cam_head(classifier, head)
        except UnsupportedError as exc:
            if cams:
                raise
            log.warning("warning: no class activation maps: %s", exc.detail)
    bar = Progress(sum(len(s) for s in slides), "slides", "tile", quiet=not progress, leave=False)
    scored: List[SlideScores] = []
    results: List[ImageResult] = []
    unscored = [tiles.entry for tiles in slides if not len(tiles)]
    for entry in unscored:  # the tiler warned already; one such slide should not stop the fold
        log.warning("warning: %s: no tissue tile, not scored (lower --min-tissue or check its tissue mask)", entry)
    slides = [tiles for tiles in slides if len(tiles)]
    if not slides:
        raise EvaluationError(f"none of the {len(unscored)} test slides has a tissue tile to score "
                              "(lower --min-tissue or check the tissue masks)")
    try:
        for tiles in slides:
            scores = score_slide(classifier, tiles, mean, mean_mode=mean_mode, oversample=oversample,
                                 batch_size=batch_size, head=cam, transform=transform)
            bar.update(len(tiles))
            log.info("%s: %d tiles, fractions %s", tiles.entry, len(tiles),
                     ", ".join(f"{c} {f:.2f}" for c, f in zip(classes, scores.fractions)))
            scored.append(scores)
            results.append(ImageResult(tiles.entry, tiles.path, tiles.label, slide_decision(scores.fractions, threshold),
                                       scores.votes, scores.fractions, tiles.centres, scores.probs))
    finally:
        bar.close()
    info = dict(settings or {})
    info.update(unit="slide", score="tile fraction", unscored=unscored, threshold=threshold, mean_mode=mean_mode, oversample=oversample,
                crops=len(crop_boxes(slides[0].out_size, slides[0].out_size, classifier.crop, oversample)),
                aggregate="fraction" if threshold is None else f"fraction>={threshold:g}",
                window=slides[0].out_size, crop=classifier.crop,
                cam=None if cam is None else {"features": cam.features, "classifier": cam.classifier})
    return SlideFold(FoldResult(fold, list(classes), results, info), scored, threshold)


# ----------------------------------------------------------------------------- a fold of a work directory
def tile_set_dir(workdir: PathLike) -> Path:
    """The folder of the work directory's tile manifest: the one ``folds.json`` names, else ``subs/``."""
    workdir = Path(workdir)
    folds = read_record(workdir / FOLDS_JSON, FOLDS) or {}
    manifest = folds.get("manifest")
    return (workdir / manifest).parent if isinstance(manifest, str) else workdir / PATCH_DIR


def test_slides(tile_set: TileSet, parent_list: PathLike) -> List[SlideTiles]:
    """The slides of a parent list (``CLASS/slide.ext`` per line) with their tiles from ``tile_set``."""
    parent_list = Path(parent_list)
    by_entry = {f"{s.cls}/{s.name}": s for s in tile_set.slides}
    tiles: dict = {}
    for tile in tile_set.tiles:
        tiles.setdefault(tile.slide, []).append(tile)
    found = []
    for number, line in enumerate(read_text_lines(parent_list), start=1):
        entry = line.strip()
        if not entry:
            continue
        record = by_entry.get(entry)
        if record is None:
            raise InputError(f"line {number}: slide {entry!r} is not in the tile manifest", parent_list)
        found.append(SlideTiles(Path(record.path), entry, record.label, tiles.get(record.slide, [])))
    if not found:
        raise EvaluationError("the parent list is empty (expected one slide per line)", parent_list)
    return found


def read_text_lines(path: Path) -> List[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError("parent list not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the parent list ({exc})", path) from None


def arch_head(workdir: PathLike, fold: int) -> Optional[str]:
    """The classifier layer of the fold's architecture (``K/render.json``'s arch in the registry)."""
    from lymph_cv.net.archs import get_arch

    record = read_record(Path(workdir) / str(fold) / RENDER_JSON, ANY) or {}
    return get_arch(record["arch"]).head if isinstance(record.get("arch"), str) else None


def evaluate_slide_fold(workdir: PathLike, fold: int, *, model: Optional[PathLike] = None,
                        deploy: Optional[PathLike] = None, mean: Optional[PathLike] = None,
                        parent_list: Optional[PathLike] = None, tiles: Optional[PathLike] = None,
                        device: str = "cpu", mean_mode: str = "resize", oversample: bool = False,
                        batch_size: Optional[int] = None, threshold: Optional[float] = None, cams: Optional[bool] = True,
                        progress: bool = True) -> SlideFold:
    """Evaluate fold ``fold`` of a slide work directory: every tile of every test slide of
    ``test_w32_parent_K.txt`` (slides as ``CLASS/slide.ext``) from the tile manifest (``tiles``:
    its folder, default the one the folds were made from), read from the slide itself, scored by
    the fold's latest snapshot; the stain normalisation the workdir records is applied."""
    from lymph_cv.formats.caffe.blob import read_mean
    from lymph_cv.stages.evaluate import latest_snapshot
    from lymph_cv.stages.stain import hook, read_record as read_stain_record, recorded_stain_path

    workdir = Path(workdir)
    fold_dir = workdir / str(fold)
    tile_dir = Path(tiles) if tiles else tile_set_dir(workdir)
    tile_set = read_tile_set(tile_dir)
    parent_list = Path(parent_list) if parent_list else workdir / TEST_PARENT.format(fold=fold)
    slides = test_slides(tile_set, parent_list)
    deploy = Path(deploy) if deploy else fold_dir / DEPLOY_NAME
    mean_path = Path(mean) if mean else workdir / MEAN_FILE.format(fold=fold)
    for path, what in ((deploy, "deploy net"), (mean_path, "mean file")):
        if not path.is_file():
            raise InputError(f"{what} not found", path)
    model = Path(model) if model else latest_snapshot(fold_dir)
    if not model.is_file():
        raise InputError("model not found", model)
    # class activation maps read the torch net's head (cam_head); without them any backend serves
    classifier = WindowClassifier(deploy, model, device, backend="auto" if cams is False else "torch")
    stain_path = recorded_stain_path(workdir, fold)
    stain = None if stain_path is None else read_stain_record(stain_path)
    transform = None if stain is None or stain.method == "none" else hook(stain.transform)
    settings = {"model": str(model), "deploy": str(deploy), "mean": str(mean_path), "parent_list": str(parent_list),
                "tiles": str(tile_dir), "device": device, "tile_params": tile_set.params.to_json(),
                "stain": None if stain_path is None else str(stain_path), "batch_size": batch_size or classifier.default_batch_size}
    log.info("fold %d: %d test slides, %d tiles, model %s", fold, len(slides), sum(len(s) for s in slides), model)
    return evaluate_slides(classifier, slides, read_mean(mean_path), tile_set.classes, fold, mean_mode=mean_mode,
                           oversample=oversample, batch_size=batch_size, threshold=threshold, cams=cams,
                           head=arch_head(workdir, fold) if cams is not False else None, transform=transform, settings=settings,
                           progress=progress)


# ----------------------------------------------------------------------------- records
def tile_record(fold: SlideFold) -> dict:
    """Tile-level metrics: each tile labelled with its slide's class, predicted by its argmax."""
    classes = fold.result.classes
    labels = np.concatenate([np.full(len(s.probs), s.tiles.label) for s in fold.slides]) if fold.slides else np.zeros(0)
    probs = np.concatenate([s.probs for s in fold.slides]) if fold.slides else np.zeros((0, len(classes)))
    matrix = confusion_matrix(labels, probs.argmax(axis=1), len(classes))
    return {"tiles": int(len(labels)), "confusion": matrix.tolist(), **summary_metrics(matrix, classes),
            "roc": roc_record(probs, labels, classes)}


def slide_rows(fold: SlideFold) -> List[dict]:
    """Per slide: truth, decision, tile count, fractions, mean probabilities (metrics.json's list)."""
    classes = fold.result.classes
    rows = []
    for image, scores in zip(fold.result.images, fold.slides):
        rows.append({"slide": image.entry, "true": classes[image.label], "predicted": classes[image.predicted],
                     "tiles": len(scores.probs),
                     "fractions": {c: round(float(v), CSV_DIGITS) for c, v in zip(classes, scores.fractions)},
                     "mean_probs": {c: round(float(v), CSV_DIGITS) for c, v in zip(classes, scores.mean_probs)},
                     "heatmap": heatmap_names(image.entry)[0],
                     "cam": heatmap_names(image.entry)[1] if scores.cams is not None else None})
    return rows


def slides_csv(fold: SlideFold) -> str:
    """slides.csv: slide, true, predicted, correct, tiles, fraction_<c>, mean_prob_<c>."""
    classes = fold.result.classes
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide", "true", "predicted", "correct", "tiles"] + [f"fraction_{c}" for c in classes]
                    + [f"mean_prob_{c}" for c in classes])
    for image, scores in zip(fold.result.images, fold.slides):
        writer.writerow([image.entry, classes[image.label], classes[image.predicted], int(image.correct), len(scores.probs)]
                        + [f"{v:.{CSV_DIGITS}f}" for v in scores.fractions] + [f"{v:.{CSV_DIGITS}f}" for v in scores.mean_probs])
    return buffer.getvalue()


def heatmap_names(entry: str) -> Tuple[str, str]:
    """(probability heatmap, CAM) file names of a slide inside ``heatmaps/``."""
    from lymph_cv.workdir.layout import heatmap_name

    stem = heatmap_name(entry)[: -len(".png")]
    return stem + PROBABILITY_SUFFIX, stem + CAM_SUFFIX


def shown_class(classes: Sequence[str], predicted: int) -> int:
    """The class a slide's maps show: the positive (second) class of two, else the predicted one."""
    return 1 if len(classes) == 2 else predicted


def slide_figures(scores: SlideScores, image: ImageResult, classes: Sequence[str],
                  thumb_side: int = DEFAULT_THUMB_SIDE) -> Iterator[Tuple[str, bytes]]:
    """(file name, PNG) of a slide's probability heatmap and, with CAMs, its stitched CAM."""
    from lymph_cv.stages import slide_heatmaps

    with slide_files.open_slide(scores.tiles.path) as slide:
        thumb, downsample = slide_files.read_low_resolution(slide, thumb_side)
    tiles = scores.tiles
    boxes = slide_heatmaps.TileBoxes.from_level0(tiles.xs, tiles.ys, tiles.extent, downsample, thumb.shape[:2])
    cls = shown_class(classes, image.predicted)
    names = heatmap_names(image.entry)
    common = dict(name=image.entry, label=image.label, predicted=image.predicted, fractions=scores.fractions)
    yield names[0], slide_heatmaps.probability_png(thumb, boxes, scores.probs, cls, classes, **common)
    if scores.cams is not None:
        yield names[1], slide_heatmaps.cam_png(thumb, boxes, scores.cams, cls, classes, **common)


def write_slide_fold(fold: SlideFold, out_dir: PathLike, *, heatmaps: bool = True,
                     thumb_side: int = DEFAULT_THUMB_SIDE) -> dict:
    """Write eval/fold_K as :func:`lymph_cv.stages.report.write_fold` does (metrics.json with the
    slide-level matrix, summary.txt, images.csv, confusion.png, roc.png) plus slides.csv, the
    tile-level metrics in metrics.json and, with ``heatmaps``, heatmaps/<slide>.png and .cam.png."""
    from lymph_cv.stages.report import write_fold

    files = {SLIDES_CSV: slides_csv(fold).encode("utf-8")}
    if heatmaps:
        for scores, image in zip(fold.slides, fold.result.images):
            for name, png in slide_figures(scores, image, fold.result.classes, thumb_side):
                files[f"{HEATMAP_DIR}/{name}"] = png
    extra = {"unit": "slide", "tiles": tile_record(fold), "slides": slide_rows(fold) if heatmaps else
             [dict(row, heatmap=None, cam=None) for row in slide_rows(fold)]}
    return write_fold(fold.result, out_dir, extra_record=extra, extra_files=files)


# ----------------------------------------------------------------------------- the run's stage
class SlideEvalStage(Stage):
    """Step 5 for whole slides: each fold's test slides, every tissue tile scored by the fold's
    final snapshot, labelled by their tile fractions, with heatmaps and CAMs (``eval/fold_K/``)."""

    name = "slide_eval"
    reads = (TEST_PARENT, MEAN_FILE, f"{{fold}}/{DEPLOY_NAME}", "{fold}/*_iter_N.caffemodel", f"{PATCH_DIR}/tiles.json")
    writes = (f"{EVAL_DIR}/{EVAL_FOLD_DIR}/{METRICS_JSON}", f"{EVAL_DIR}/{EVAL_FOLD_DIR}/{SLIDES_CSV}",
              f"{EVAL_DIR}/{EVAL_FOLD_DIR}/{HEATMAP_DIR}/")
    per_fold = True

    def enabled(self, o: RunOptions) -> bool:
        return o.slides

    def check(self, o: RunOptions) -> None:
        try:
            resolve_device(o.device, CONCRETE_DEVICES)  # evaluation takes a concrete device: no auto
        except ConfigError as exc:
            raise ConfigError(exc.detail, "--device") from None
        if o.slide_threshold is not None:
            if len(o.classes) != 2:
                raise ConfigError(f"is for two classes; there are {len(o.classes)}", "--slide-threshold")
            if not 0.0 <= o.slide_threshold <= 1.0:
                raise ConfigError(f"must be a fraction in [0, 1], got {o.slide_threshold}", "--slide-threshold")

    def params(self, o: RunOptions) -> dict:
        return {"threshold": o.slide_threshold, "cams": o.cams, "device": o.device, "folds": o.fold_list}

    @staticmethod
    def evaluated(o: RunOptions, fold: int) -> bool:
        """Fold ``fold``'s slide-level evaluation is on disk."""
        from lymph_cv.stages.evaluate import fold_output_dir

        record = read_record(fold_output_dir(o.workdir, fold) / METRICS_JSON, ANY)
        return bool(record) and record.get("unit") == "slide"

    def complete(self, o: RunOptions) -> bool:
        return all(self.evaluated(o, k) for k in o.fold_list)

    def run(self, o: RunOptions, fresh: bool) -> None:
        from lymph_cv.stages.evaluate import fold_output_dir, folds_to_evaluate, write_locked

        for k, model in folds_to_evaluate(o, fresh, self.evaluated):
            # CAMs where the net allows them (hours of training are not lost to a net without GAP)
            fold = evaluate_slide_fold(o.workdir, k, model=model, device=o.device, threshold=o.slide_threshold,
                                       cams=None if o.cams else False)
            record = write_locked(fold_output_dir(o.workdir, k), lambda out: write_slide_fold(fold, out))
            log.info("fold %d: slide accuracy %.3f on %d test slides, tile accuracy %.3f on %d tiles", k,
                     record["accuracy"], len(fold.slides), record["tiles"]["accuracy"], record["tiles"]["tiles"])


STAGE = SlideEvalStage()
