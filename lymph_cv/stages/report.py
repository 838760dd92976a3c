"""Metrics, confusion matrices, PNGs and the Markdown summary of step 5.

Confusion matrices are counts with rows = true class and columns = predicted class; the tutorial
printed the transpose (predicted × actual), available as the *legacy layout* when formatting.
Computing (metrics, pooled results) is kept apart from formatting (text, CSV, Markdown) and from
drawing (matplotlib PNGs: :mod:`lymph_cv.stages.figures`, :mod:`lymph_cv.stages.heatmaps`); writing a
fold's or the report's files is one atomic step each.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np

from lymph_cv.errors import EvaluationError, InputError
from lymph_cv.core import faults
from lymph_cv.core.fsutil import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, write_error
from lymph_cv.stages.figures import confusion_png
from lymph_cv.stages.heatmaps import heatmap_png
from lymph_cv.stages.html_report import render_html
from lymph_cv.stages.report_folds import fold_records, headline_text, image_rows, unlisted_folds
from lymph_cv.stages.report_folds import number_text as _num
from lymph_cv.stages.roc import ROC_PNG, draw_roc, roc_record
from lymph_cv.stages import slide_report
from lymph_cv.workdir.layout import (CONFUSION_PNG, EVAL_DIR, HEATMAP_DIR, IMAGES_CSV, METRICS_JSON, REPORT_HTML, REPORT_JSON,
                                     REPORT_MD, REPORT_TXT, SUMMARY_TXT, heatmap_name)
from lymph_cv.workdir.records import METRICS
from lymph_cv.stages.stage import PatchPipelineStage, RunOptions
from lymph_cv.stages.metrics import (accuracy, balanced_accuracy, class_metrics, confusion_matrix,  # noqa: F401 - the report's API
                                     mean_sd, summary_metrics)
from lymph_cv.stages.results import FoldResult

PathLike = Union[str, Path]

LAYOUT = "rows = true class, columns = predicted class"
LEGACY_LAYOUT = "rows = predicted class, columns = true class (the tutorial's layout)"
#: How many misclassified images the one-page summary names before abbreviating.
MD_MISCLASSIFIED_MAX = 12
#: Heatmap backgrounds: the [0, 1] pixels evaluation saw, back to 8 bits.
DISPLAY_SCALE = 255.0


# ----------------------------------------------------------------------------- text formatting
def format_confusion(matrix: np.ndarray, classes: Sequence[str], legacy: bool = False) -> str:
    """A labelled text matrix; ``legacy`` prints the tutorial's predicted × actual orientation."""
    matrix = np.asarray(matrix)
    rows_title, cols_title = ("predicted", "actual") if legacy else ("true", "predicted")
    shown = matrix.T if legacy else matrix
    width = max(6, max(len(c) for c in classes) + 1, len(str(int(matrix.max(initial=0)))) + 1)
    label_width = max(len(rows_title), max(len(c) for c in classes)) + 2
    lines = [" " * label_width + cols_title.center(width * len(classes))]
    lines.append(rows_title.ljust(label_width) + "".join(c.rjust(width) for c in classes))
    for name, row in zip(classes, shown):
        lines.append(("  " + name).ljust(label_width) + "".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(lines)


def format_class_table(per_class: dict) -> str:
    """Precision / recall / F1 / support, one class a line."""
    width = max(5, max(len(name) for name in per_class)) + 2
    lines = ["class".ljust(width) + "precision    recall        f1   support"]
    for name, m in per_class.items():
        lines.append(name.ljust(width) + f"{_num(m['precision']):>9} {_num(m['recall']):>9} {_num(m['f1']):>9} {m['support']:>9}")
    return "\n".join(lines)


def _votes_text(votes: Sequence[int], classes: Sequence[str]) -> str:
    return " ".join(f"{c}={int(v)}" for c, v in zip(classes, votes))


def image_roc(scores: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> dict:
    """ROC figures of images by their aggregate scores: for two classes AUC, curve and operating
    threshold of the second class's score; else one-vs-rest AUC per class (:mod:`lymph_cv.stages.roc`)."""
    return roc_record(np.asarray(scores, dtype=np.float64).reshape(len(labels), len(classes)), labels, classes)


def roc_auc_of(record: Optional[dict]) -> Optional[float]:
    """The headline AUC of a ROC record: the binary AUC, else the one-vs-rest mean."""
    if not record:
        return None
    return record.get("auc") if record.get("kind") == "binary" else record.get("macro_auc")


def format_roc(record: Optional[dict]) -> str:
    """One line: AUC and operating threshold (two classes) or per-class one-vs-rest AUC."""
    if not record:
        return "ROC: n/a"
    if record.get("kind") == "binary":
        if record.get("auc") is None:
            return f"ROC AUC ({record['positive']} positive): n/a (needs both classes)"
        return (f"ROC AUC ({record['positive']} positive) {_num(record['auc'])}, operating threshold "
                f"{record['threshold']:.4g} (sensitivity {_num(record['sensitivity'])}, "
                f"specificity {_num(record['specificity'])})")
    per_class = ", ".join(f"{name} {_num(value)}" for name, value in record["per_class"].items())
    return f"one-vs-rest ROC AUC: {per_class}; mean {_num(record.get('macro_auc'))}"


def fold_record(result: FoldResult) -> dict:
    """The JSON-ready record of a fold's evaluation (``metrics.json``)."""
    matrix = result.confusion
    classes = result.classes
    scores = np.array([r.scores for r in result.images], dtype=np.float64)
    return {
        "fold": result.fold,
        "classes": list(classes),
        "images": len(result.images),
        "layout": LAYOUT,
        "confusion": matrix.tolist(),
        **summary_metrics(matrix, classes),
        "misclassified": [
            {"image": r.entry, "true": classes[r.label], "predicted": classes[r.predicted],
             "votes": {c: int(v) for c, v in zip(classes, r.votes)}, "windows": int(len(r.probs)),
             "scores": {c: round(float(v), 6) for c, v in zip(classes, r.scores)}}
            for r in result.misclassified
        ],
        "roc": image_roc(scores, [r.label for r in result.images], classes),
        "settings": result.settings,
    }


def _unit(record: dict) -> str:
    """What a record's matrix counts: images, or slides (slide-level evaluation)."""
    return "slides" if record.get("unit") == "slide" else "images"


def format_fold(record: dict, legacy: bool = False) -> str:
    """The human summary of a fold: header, matrix, per-class table, misclassified images."""
    classes = record["classes"]
    settings = record.get("settings", {})
    lines = [
        f"fold {record['fold']}: {record['images']} {_unit(record)}, accuracy {_num(record['accuracy'])}, "
        f"balanced accuracy {_num(record['balanced_accuracy'])}",
        f"(aggregate {settings.get('aggregate', '?')}, {settings.get('crops', '?')} crops per window, "
        f"mean {settings.get('mean_mode', '?')}, model {settings.get('model', '?')})",
        "",
        format_confusion(np.array(record["confusion"]), classes, legacy),
        "",
        format_class_table(record["per_class"]),
        "",
        format_roc(record.get("roc")),
        "",
        f"misclassified: {len(record['misclassified'])}",
    ]
    for item in record["misclassified"]:
        votes = _votes_text([item["votes"][c] for c in classes], classes)
        lines.append(f"  {item['image']}  true {item['true']}  predicted {item['predicted']}  votes {votes}")
    skipped = settings.get("skipped_missing") or []
    if skipped:
        lines.append(f"not evaluated (not under {settings.get('images')}): {len(skipped)} listed images")
    unscored = settings.get("unscored") or []
    if unscored:
        lines.append(f"not scored (no tissue tile): {len(unscored)} slide(s): {', '.join(unscored)}")
    return "\n".join(lines) + "\n"


def images_csv(result: FoldResult) -> str:
    """Per image: truth, decision, windows, votes, vote fractions and the aggregate's scores."""
    classes = result.classes
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "true", "predicted", "correct", "windows"]
                    + [f"votes_{c}" for c in classes] + [f"fraction_{c}" for c in classes] + [f"score_{c}" for c in classes])
    for r in result.images:
        n = len(r.probs)
        writer.writerow([r.entry, classes[r.label], classes[r.predicted], int(r.correct), n]
                        + [int(v) for v in r.votes] + [f"{v / n:.6f}" for v in r.votes] + [f"{s:.6f}" for s in r.scores])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- drawing
def _display_image(path: Path) -> np.ndarray:
    # The pixels evaluation saw (8 bits of a 16-bit image, rounded), as BGR uint8.
    from lymph_cv.core.images import read_unit  # OpenCV loads for a heatmap, not for the report's text

    return np.clip(read_unit(path) * np.float32(DISPLAY_SCALE) + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- writing a fold
def write_fold(result: FoldResult, out_dir: PathLike, *, legacy_layout: bool = False, heatmaps: bool = False,
               extra_record: Optional[dict] = None, extra_files: Optional[Mapping[str, bytes]] = None) -> dict:
    """Write a fold's outputs into ``out_dir`` (built under a temporary name, renamed when
    complete): metrics.json, summary.txt, images.csv, confusion.png and optional heatmaps/.
    ``extra_record`` is merged into metrics.json, ``extra_files`` (relative name → bytes, e.g. the
    slide-level evaluation's) are written into the folder too.  Returns the JSON record."""
    record = {**fold_record(result), **(extra_record or {})}
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / METRICS_JSON).is_file():
        # The folder is replaced as a whole: never one that holds something else.
        raise EvaluationError(f"output folder exists and is not an evaluation folder (no {METRICS_JSON}); choose another", out_dir)
    _write_fold_files(result, record, out_dir, legacy_layout, heatmaps, extra_files or {})
    return record


def _write_fold_files(result: FoldResult, record: dict, out_dir: Path, legacy_layout: bool, heatmaps: bool,
                      extra_files: Mapping[str, bytes]) -> None:
    temp = out_dir
    try:
        with atomic_path(out_dir) as temp:
            _fill_fold_folder(temp, result, record, out_dir, legacy_layout, heatmaps)
            for name, data in extra_files.items():
                (temp / name).parent.mkdir(parents=True, exist_ok=True)
                (temp / name).write_bytes(data)
    except OSError as exc:  # a full or read-only disk: one line naming the file; the temporary is gone
        failed = Path(exc.filename) if exc.filename else out_dir
        if failed.is_relative_to(temp):
            failed = out_dir / failed.relative_to(temp)
        raise write_error(exc, failed) from None


def _fill_fold_folder(temp: Path, result: FoldResult, record: dict, out_dir: Path, legacy_layout: bool,
                      heatmaps: bool) -> None:
    """The files of eval/fold_K, written into the temporary folder ``temp``."""
    faults.before_write(out_dir / METRICS_JSON)
    temp.mkdir()
    (temp / METRICS_JSON).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (temp / SUMMARY_TXT).write_text(format_fold(record, legacy_layout), encoding="utf-8")
    (temp / IMAGES_CSV).write_text(images_csv(result), encoding="utf-8")
    title = f"fold {result.fold}: accuracy {_num(record['accuracy'])}, balanced {_num(record['balanced_accuracy'])}"
    (temp / CONFUSION_PNG).write_bytes(confusion_png(result.confusion, result.classes, title))
    if record["roc"].get("curve"):
        (temp / ROC_PNG).write_bytes(draw_roc(record["roc"], f"fold {result.fold}: ROC"))
    if heatmaps:
        (temp / HEATMAP_DIR).mkdir()
        stride = int(result.settings.get("stride", 0)) or _grid_step(result.images[0].centres)
        for image in result.images:
            png = heatmap_png(_display_image(image.path), image.centres, image.probs, stride, result.classes,
                              entry=image.entry, label=image.label, predicted=image.predicted, votes=image.votes)
            (temp / HEATMAP_DIR / heatmap_name(image.entry)).write_bytes(png)


def _grid_step(centres: np.ndarray) -> int:
    steps = np.diff(np.unique(centres[:, 1]))
    return int(steps[0]) if len(steps) else 1


# ----------------------------------------------------------------------------- the pooled report
@dataclass
class Report:
    """Pooled results over the evaluated folds of a workdir."""

    workdir: Path
    classes: List[str]
    folds: List[dict]  # the folds' metrics.json records, in fold order
    confusion: np.ndarray
    #: every image's true label and aggregate scores over the folds (from images.csv), when all have them
    labels: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None

    @property
    def roc(self) -> Optional[dict]:
        """ROC figures of the pooled images (None without their scores)."""
        if self.labels is None or self.scores is None:
            return None
        return image_roc(self.scores, self.labels, self.classes)

    @property
    def metrics(self) -> dict:
        return summary_metrics(self.confusion, self.classes)

    def spread(self, key: str) -> tuple[float, Optional[float]]:
        """Mean and sample sd over folds of ``accuracy`` or ``balanced_accuracy``."""
        return mean_sd([f[key] for f in self.folds])


def _check_metrics(record, path: Path) -> None:
    """InputError unless ``record`` looks like a fold's metrics.json (as ``write_fold`` writes it)."""
    try:
        classes = record["classes"]
        confusion = np.array(record["confusion"], dtype=np.int64)
        ok = (isinstance(record["fold"], int) and isinstance(classes, list) and len(classes) >= 1
              and all(isinstance(c, str) for c in classes) and confusion.shape == (len(classes), len(classes))
              and all(isinstance(record[k], (int, float)) for k in ("accuracy", "balanced_accuracy")))
    except (KeyError, TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise InputError(METRICS.refusal, path)


def read_image_scores(path: Path, classes: Sequence[str]) -> Optional[tuple]:
    """(labels, N × classes scores) from a fold's images.csv, or None when it is absent."""
    rows = image_rows(path, classes)
    if rows is None:
        return None
    labels, scores = rows
    return np.array(labels, dtype=np.int64), np.array(scores, dtype=np.float64).reshape(len(labels), len(classes))


def build_report(workdir: PathLike, folds: Optional[Sequence[int]] = None) -> Report:
    """Collect ``eval/fold_K/metrics.json`` of every evaluated fold (or only of ``folds``) and pool
    their matrices."""
    workdir = Path(workdir)
    records, folders = fold_records(workdir, folds, _check_metrics)
    classes = records[0]["classes"]
    pooled = sum(np.array(r["confusion"], dtype=np.int64) for r in records)
    image_scores = [read_image_scores(folder / IMAGES_CSV, classes) for folder in folders]
    if any(item is None for item in image_scores):
        return Report(workdir, list(classes), records, pooled)
    labels = np.concatenate([item[0] for item in image_scores])
    scores = np.concatenate([item[1] for item in image_scores])
    return Report(workdir, list(classes), records, pooled, labels, scores)


def report_record(report: Report) -> dict:
    """JSON-ready pooled results."""
    acc_mean, acc_sd = report.spread("accuracy")
    bal_mean, bal_sd = report.spread("balanced_accuracy")
    return {
        "classes": report.classes,
        "folds": [r["fold"] for r in report.folds],
        "images": int(report.confusion.sum()),
        "layout": LAYOUT,
        "confusion": report.confusion.tolist(),
        **report.metrics,
        "fold_accuracy": {"mean": acc_mean, "sd": acc_sd, "values": [r["accuracy"] for r in report.folds]},
        "fold_balanced_accuracy": {"mean": bal_mean, "sd": bal_sd, "values": [r["balanced_accuracy"] for r in report.folds]},
        "roc": report.roc,
        "fold_auc": _fold_auc(report),
        **({"unit": "slide", "tiles": slide_report.pooled_tiles(report.folds, report.classes)}
           if slide_report.is_slide_report(report.folds) else {}),
    }


def _fold_auc(report: Report) -> Optional[dict]:
    """Mean and sd of the folds' headline AUCs (the folds where it is defined), or None."""
    values = [roc_auc_of(f.get("roc")) for f in report.folds]
    defined = [v for v in values if v is not None]
    if not defined:
        return None
    mean, sd = mean_sd(defined)
    return {"mean": mean, "sd": sd, "values": values}


def _count(items: Optional[list]) -> str:
    """How many ``items``; n/a where a hand-made record does not list them."""
    return "n/a" if items is None else str(len(items))


def _pm(mean: float, sd: Optional[float]) -> str:
    return f"{_num(mean)} ± {_num(sd)}"


def format_report(report: Report, legacy: bool = False) -> str:
    """The pooled results as plain text (what ``lymph-cv report`` prints)."""
    record = report_record(report)
    lines = [
        headline_text(record["images"], _unit(record), record["folds"], record["accuracy"], record["balanced_accuracy"]),
        f"per-fold accuracy {_pm(record['fold_accuracy']['mean'], record['fold_accuracy']['sd'])}, "
        f"balanced accuracy {_pm(record['fold_balanced_accuracy']['mean'], record['fold_balanced_accuracy']['sd'])}",
        "",
        format_confusion(report.confusion, report.classes, legacy),
        "",
        format_class_table(record["per_class"]),
        "",
        format_roc(record["roc"]),
    ]
    return "\n".join(lines) + "\n"


def _md_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_markdown(report: Report) -> str:
    """A one-page Markdown summary: pooled matrix, per-fold table, per-class table, errors."""
    record = report_record(report)
    classes = report.classes
    first = report.folds[0].get("settings", {})
    slides = slide_report.is_slide_report(report.folds)
    labelled = (slide_report.intro(first) if slides else
                f"Image label = {first.get('aggregate', 'vote')} over {first.get('window', '?')}-pixel windows at "
                f"stride {first.get('stride', '?')}, {first.get('crops', '?')} crops per window, mean mode "
                f"{first.get('mean_mode', '?')}.")
    lines = [
        "# Lymphoma sub-type classification: evaluation",
        "",
        f"{record['images']} test {'slides' if slides else 'images'}, {len(report.folds)} fold(s) "
        f"({', '.join(str(f) for f in record['folds'])}), classes {', '.join(classes)}. {labelled}",
        "",
        f"**Pooled accuracy {_num(record['accuracy'])}, balanced accuracy {_num(record['balanced_accuracy'])}; "
        f"per fold {_pm(record['fold_accuracy']['mean'], record['fold_accuracy']['sd'])} "
        f"(balanced {_pm(record['fold_balanced_accuracy']['mean'], record['fold_balanced_accuracy']['sd'])}, mean ± sd).**",
        "",
        "## Pooled confusion matrix (rows = true class, columns = predicted class)",
        "",
        _md_row(["true \\ predicted", *classes, "recall"]),
        _md_row(["---"] * (len(classes) + 2)),
    ]
    for name, row in zip(classes, report.confusion):
        lines.append(_md_row([f"**{name}**", *[int(v) for v in row], _num(record["per_class"][name]["recall"])]))
    lines += ["", f"![pooled confusion matrix]({CONFUSION_PNG})", "", "## Per fold", "",
              _md_row(["fold", "slides" if slides else "images", "accuracy", "balanced accuracy", "misclassified", "model"]),
              _md_row(["---"] * 6)]
    for fold in report.folds:
        model = Path(fold.get("settings", {}).get("model", "?")).name
        lines.append(_md_row([fold["fold"], fold["images"], _num(fold["accuracy"]), _num(fold["balanced_accuracy"]),
                              _count(fold["misclassified"]), f"`{model}`"]))
    lines.append(_md_row(["mean ± sd", "", _pm(record["fold_accuracy"]["mean"], record["fold_accuracy"]["sd"]),
                          _pm(record["fold_balanced_accuracy"]["mean"], record["fold_balanced_accuracy"]["sd"]), "", ""]))
    lines += ["", "## Per class (pooled)", "", _md_row(["class", "precision", "recall", "F1", "support"]), _md_row(["---"] * 5)]
    for name, m in record["per_class"].items():
        lines.append(_md_row([name, _num(m["precision"]), _num(m["recall"]), _num(m["f1"]), m["support"]]))
    lines += _markdown_roc(record)
    if slides:
        lines += slide_report.markdown_section(report.folds, classes)
    wrong = [(f["fold"], item) for f in report.folds for item in f["misclassified"] or ()]
    lines += ["", f"## Misclassified {'slides' if slides else 'images'} ({len(wrong)})", ""]
    unrecorded = unlisted_folds(report.folds)
    if unrecorded:
        lines += [f"Not recorded for fold {', '.join(map(str, unrecorded))} (a metrics.json without `misclassified`).", ""]
    for fold, item in wrong[:MD_MISCLASSIFIED_MAX]:
        votes = _votes_text([item["votes"][c] for c in classes], classes)
        lines.append(f"- fold {fold}: `{item['image']}`: true {item['true']}, predicted {item['predicted']} (votes {votes})")
    if len(wrong) > MD_MISCLASSIFIED_MAX:
        lines.append(f"- … and {len(wrong) - MD_MISCLASSIFIED_MAX} more (see `eval/fold_K/{SUMMARY_TXT}`)")
    if not wrong and not unrecorded:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _markdown_roc(record: dict) -> List[str]:
    """The report's ROC section: pooled figures, per-fold AUC, the curve (two classes)."""
    roc, per_fold = record.get("roc"), record.get("fold_auc")
    if roc is None and per_fold is None:
        return []
    lines = ["", "## ROC (image scores of the aggregation)", ""]
    if roc is not None:
        lines.append(f"Pooled: {format_roc(roc)}.")
    if per_fold is not None:
        values = ", ".join(_num(v) for v in per_fold["values"])
        lines.append(f"Per fold AUC {_pm(per_fold['mean'], per_fold['sd'])} ({values}).")
    if roc is not None and roc.get("curve"):
        lines += ["", f"![pooled ROC curve]({ROC_PNG})"]
    return lines


def write_report(report: Report, legacy_layout: bool = False) -> List[Path]:
    """Write ``eval/report.json``, ``report.txt``, ``confusion.png``, ``report.md`` and the
    self-contained ``report.html``; each atomically."""
    eval_dir = report.workdir / EVAL_DIR
    paths = [eval_dir / REPORT_JSON, eval_dir / REPORT_TXT, eval_dir / CONFUSION_PNG, eval_dir / REPORT_MD,
             eval_dir / REPORT_HTML]
    acc_mean, acc_sd = report.spread("accuracy")
    title = f"{len(report.folds)} fold(s) pooled: accuracy {_num(accuracy(report.confusion))}, per fold {_pm(acc_mean, acc_sd)}"
    atomic_write_json(paths[0], report_record(report))
    atomic_write_text(paths[1], format_report(report, legacy_layout))
    atomic_write_bytes(paths[2], confusion_png(report.confusion, report.classes, title))
    atomic_write_text(paths[3], format_markdown(report))
    atomic_write_text(paths[4], render_html(report.workdir, report_record(report), report.folds))
    roc = report.roc
    if roc is not None and roc.get("curve"):
        paths.append(eval_dir / ROC_PNG)
        atomic_write_bytes(paths[-1], draw_roc(roc, f"{len(report.folds)} fold(s) pooled: ROC"))
    return paths


class ReportStage(PatchPipelineStage):
    """The pooled report of this run's folds (``eval/report.md`` and friends)."""

    name = "report"
    reads = (f"{EVAL_DIR}/fold_K/{METRICS_JSON}",)
    writes = (f"{EVAL_DIR}/{REPORT_MD}", f"{EVAL_DIR}/{REPORT_HTML}", f"{EVAL_DIR}/{REPORT_JSON}",
              f"{EVAL_DIR}/{REPORT_TXT}")

    def params(self, o: RunOptions) -> dict:
        return {"folds": o.fold_list}

    def complete(self, o: RunOptions) -> bool:
        return all((Path(o.workdir) / EVAL_DIR / name).is_file() for name in (REPORT_MD, REPORT_HTML))

    def run(self, o: RunOptions, fresh: bool) -> Report:
        # Only this run's folds: eval/fold_K of other folds may come from another split or other settings.
        report = build_report(o.workdir, o.fold_list)
        write_report(report)
        return report

    def result(self, o: RunOptions) -> Report:
        return build_report(o.workdir, o.fold_list)


STAGE = ReportStage()
