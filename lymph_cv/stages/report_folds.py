"""The evaluated folds a report pools, read without numpy, and the report's headline from them.

:mod:`lymph_cv.stages.report` builds the pooled report on these readers (so both raise the same
errors in the same order); ``lymph-cv report`` prints :func:`headline` before numpy, matplotlib and
the report's modules load (about a tenth of a second), then the rest of the report's text.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from lymph_cv.errors import EvaluationError, InputError
from lymph_cv.workdir.layout import EVAL_DIR, IMAGES_CSV, METRICS_JSON
from lymph_cv.workdir.layout import EVAL_FOLD_PATTERN as FOLD_DIR
from lymph_cv.workdir.records import METRICS, read_record

PathLike = Union[str, Path]

#: Decimal places of metrics in text and Markdown.
DIGITS = 3
#: Counts at or past this are left to numpy (int64 sums, floats exact below 2^53).
EXACT_COUNT = 2 ** 53
#: How close (in units of the last printed digit) a mean of ratios may come to a rounding midpoint
#: before the headline leaves it to numpy: its summation order may differ from ours in the last bits.
MIDPOINT_MARGIN = 1e-6


def number_text(value: Optional[float], digits: int = DIGITS) -> str:
    """A metric as the report prints it: ``digits`` places, ``n/a`` for None or NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def is_slide_report(folds: Sequence[dict]) -> bool:
    """Whether the folds were evaluated slide by slide."""
    return bool(folds) and all(f.get("unit") == "slide" for f in folds)


def headline_text(images: int, unit: str, folds: Sequence[int], accuracy: float, balanced: float) -> str:
    """The report's first line: what was pooled and its two accuracies."""
    return (f"{images} {unit} over folds {', '.join(str(f) for f in folds)}: "
            f"pooled accuracy {number_text(accuracy)}, balanced accuracy {number_text(balanced)}")


def fold_records(workdir: PathLike, folds: Optional[Sequence[int]],
                 check: Callable[[dict, Path], None]) -> Tuple[List[dict], List[Path]]:
    """The metrics.json records of the evaluated folds (or only of ``folds``) in fold order, each
    passed to ``check`` as it is read, and their folders; an EvaluationError when there are none or
    their classes differ."""
    workdir = Path(workdir)
    eval_dir = workdir / EVAL_DIR
    found = sorted((int(m.group(1)), p) for p in eval_dir.glob("fold_*") if (m := FOLD_DIR.match(p.name)) and p.is_dir())
    if folds is not None:
        found = [(k, p) for k, p in found if k in set(folds)]
    records, folders = [], []
    for _, folder in found:
        path = folder / METRICS_JSON
        record = read_record(path, METRICS)
        if record is None:
            continue
        check(record, path)
        check_fold_details(record, path)
        records.append(record)
        folders.append(folder)
    if not records:
        raise EvaluationError("no evaluated fold found (expected eval/fold_K/metrics.json; run `lymph-cv evaluate` first)", workdir)
    classes = records[0]["classes"]
    for record in records[1:]:
        if record["classes"] != classes:
            raise EvaluationError(f"fold {record['fold']} has classes {record['classes']}, fold {records[0]['fold']} has {classes}", eval_dir)
    return records, folders


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_number(value) -> bool:
    return value is None or _number(value)


def _per_class(value, classes: Sequence[str]) -> bool:
    return isinstance(value, dict) and all(_number(value.get(c)) for c in classes)


def _named(item, classes: Sequence[str], names: Sequence[str], per_class: Sequence[str]) -> bool:
    return (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in names)
            and all(_per_class(item.get(k), classes) for k in per_class))


def _roc_record(roc) -> bool:
    return roc is None or (isinstance(roc, dict) and all(_optional_number(roc.get(k)) for k in ("auc", "macro_auc")))


def _tile_record(tiles, classes: Sequence[str]) -> bool:
    confusion = tiles.get("confusion") if isinstance(tiles, dict) else None
    return (isinstance(confusion, list) and len(confusion) == len(classes)
            and all(isinstance(row, list) and len(row) == len(classes) and all(type(v) is int and v >= 0 for v in row)
                    for row in confusion)
            and all(_optional_number(tiles.get(k)) for k in ("accuracy", "balanced_accuracy")))


def check_fold_details(record: dict, path: Path) -> None:
    """InputError unless the fields a report reads beyond the matrix (``images``, ``misclassified``,
    ``settings``, ``roc``, a slide fold's ``tiles`` and ``slides``) have the shape ``evaluate`` writes.
    A hand-made record may leave them out: ``images`` is then the matrix's total, ``misclassified``
    None (not recorded)."""
    classes = record["classes"]
    if "images" not in record:
        record["images"] = int(sum(sum(row) for row in record["confusion"]))
    if "misclassified" not in record:
        record["misclassified"] = None
    checks = (
        ("images", "a count of images", lambda v: type(v) is int and v >= 0),
        ("misclassified", "a list of {image, true, predicted, votes per class}",
         lambda v: v is None or (isinstance(v, list) and all(_named(i, classes, ("image", "true", "predicted"), ("votes",))
                                                            for i in v))),
        ("settings", "an object of evaluation settings", lambda v: isinstance(v, dict)),
        ("roc", "a ROC record (auc, macro_auc numbers) or null", _roc_record),
        ("unit", 'a word ("slide")', lambda v: isinstance(v, str)),
        ("tiles", "tile-level metrics (a square confusion matrix of counts, accuracy, balanced_accuracy)",
         lambda v: _tile_record(v, classes)),
        ("slides", "a list of {slide, true, predicted, tiles, fractions and mean_probs per class}",
         lambda v: isinstance(v, list) and all(_named(r, classes, ("slide", "true", "predicted"), ("fractions", "mean_probs"))
                                               and type(r.get("tiles")) is int for r in v)),
    )
    for key, expected, ok in checks:
        if key in record and not ok(record[key]):
            raise InputError(f"{key}: expected {expected} as `lymph-cv evaluate` writes it, got {_shown(record[key])}",
                             path)


def unlisted_folds(folds: Sequence[dict]) -> List[int]:
    """The folds whose record does not list its misclassified images (hand-made ones)."""
    return [f["fold"] for f in folds if f.get("misclassified") is None]


def _shown(value, limit: int = 60) -> str:
    """A JSON value in an error line, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def image_rows(path: Path, classes: Sequence[str]) -> Optional[Tuple[List[int], List[List[float]]]]:
    """(true labels, per-image scores) from a fold's images.csv, or None when it is absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the fold's images ({exc})", path) from exc
    rows = list(csv.DictReader(io.StringIO(text)))
    try:
        labels = [list(classes).index(row["true"]) for row in rows]
        scores = [[float(row[f"score_{c}"]) for c in classes] for row in rows]
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"expected the images.csv `lymph-cv evaluate` writes (true, score_<class> columns): {exc}",
                         path) from None
    return labels, scores


class _Inexact(Exception):
    """A fold record the headline leaves to numpy (the report's own check decides on it)."""


def _plain_counts(record: dict, path: Path) -> None:
    """_Inexact unless ``record`` is a metrics.json the report's check accepts with plain counts:
    a square matrix of non-negative ints, one row and column per class."""
    try:
        classes, confusion = record["classes"], record["confusion"]
        ok = (isinstance(record["fold"], int) and isinstance(classes, list) and len(classes) >= 1
              and all(isinstance(c, str) for c in classes) and isinstance(confusion, list)
              and len(confusion) == len(classes)
              and all(isinstance(row, list) and len(row) == len(classes) for row in confusion)
              and all(type(v) is int and 0 <= v < EXACT_COUNT for row in confusion for v in row)
              and all(isinstance(record[k], (int, float)) for k in ("accuracy", "balanced_accuracy")))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise _Inexact(path)


def headline(workdir: PathLike) -> Optional[str]:
    """The first line ``lymph-cv report WORKDIR`` prints, computed without numpy; None where the
    report's own computation must decide (unusual records, a balanced accuracy at a rounding
    midpoint). Raises what :func:`lymph_cv.stages.report.build_report` would raise for the folds'
    files, so a bad work folder gives its one error line before anything is printed."""
    try:
        records, folders = fold_records(workdir, None, _plain_counts)
    except _Inexact:
        return None
    classes = records[0]["classes"]
    for folder in folders:  # read for their errors: the report reads them after the records too
        image_rows(folder / IMAGES_CSV, classes)
    size = len(classes)
    pooled = [[sum(r["confusion"][i][j] for r in records) for j in range(size)] for i in range(size)]
    total = sum(map(sum, pooled))
    if total >= EXACT_COUNT:
        return None
    # as stages.metrics: a trace over a total, and the mean recall over the classes with true images
    accuracy = float(sum(pooled[i][i] for i in range(size))) / total if total else 0.0
    recalls = [pooled[i][i] / sum(pooled[i]) for i in range(size) if sum(pooled[i])]
    balanced = sum(recalls) / len(recalls) if recalls else 0.0
    scaled = balanced * 10 ** DIGITS
    if abs(scaled - math.floor(scaled) - 0.5) < MIDPOINT_MARGIN:
        return None
    unit = "slides" if is_slide_report(records) else "images"
    return headline_text(total, unit, [r["fold"] for r in records], accuracy, balanced)
