"""Learning curves from Caffe-format training logs (ours or Caffe's own), drawn with matplotlib.

The chart types are those of Caffe's ``tools/extra/plot_training_log.py`` (test accuracy, test
loss, train learning rate, train loss, against iterations or seconds); the default figure is an
overview with one panel each for loss (train solid, test dashed), test accuracy and learning rate,
every log (fold) overlaid in its own colour.  Figures are built on matplotlib's Agg canvas
directly (no pyplot state, no display needed).
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from lymph_cv.errors import ConfigError, EvaluationError
from lymph_cv.formats.caffelog import TrainingLog, read_log
from lymph_cv.workdir.layout import TRAIN_LOG

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Chart:
    """One of Caffe's chart types: ``phase``'s output ``field`` against ``x``."""

    number: int
    phase: str
    field: str
    x: str

    @property
    def name(self) -> str:
        what = "lr" if self.field == "lr" else self.field
        return f"{self.phase}-{what}-{self.x}"

    @property
    def title(self) -> str:
        what = {"lr": "learning rate"}.get(self.field, self.field)
        return f"{self.phase} {what} vs. {self.x}"


#: plot_training_log.py's numbering: 0 test accuracy/iters … 7 train loss/seconds.
CHARTS: Tuple[Chart, ...] = tuple(
    Chart(2 * k + j, phase, field_, x)
    for k, (phase, field_) in enumerate((("test", "accuracy"), ("test", "loss"), ("train", "lr"), ("train", "loss")))
    for j, x in enumerate(("iterations", "seconds")))


def chart_help() -> Tuple[Tuple[int, str], ...]:
    """(number, name) of every chart type, in Caffe's numbering (the ``--chart`` help)."""
    return tuple((c.number, c.name) for c in CHARTS)


#: Figure sizes (inches) and resolution of the PNGs.
PANEL_SIZE = (5.2, 3.4)
DPI = 100
#: Colours cycled over logs (matplotlib's tab10, colour-blind friendlier than the default order).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
_FOLD_LOG = re.compile(r"^(\d+)$")


def chart(spec: str) -> Chart:
    """A chart from its number (``0``–``7``, as plot_training_log.py) or name
    (``test-accuracy-iterations``); :class:`ConfigError` listing the valid ones."""
    for item in CHARTS:
        if spec.strip() in (str(item.number), item.name):
            return item
    raise ConfigError(f"unknown chart {spec!r}", valid=[f"{c.number}={c.name}" for c in CHARTS])


def fold_logs(workdir: PathLike, folds: Optional[Sequence[int]] = None) -> List[Tuple[str, Path]]:
    """(label ``fold K``, path) of every ``WORKDIR/K/train.log`` (or only of ``folds``), by fold."""
    found = []
    for folder in Path(workdir).iterdir() if Path(workdir).is_dir() else ():
        match = _FOLD_LOG.match(folder.name)
        if match and (folder / TRAIN_LOG).is_file() and (folds is None or int(match.group(1)) in folds):
            found.append((int(match.group(1)), folder / TRAIN_LOG))
    return [(f"fold {k}", path) for k, path in sorted(found)]


def _figure(panels: int):
    from matplotlib.figure import Figure

    columns = min(panels, 3)
    rows = -(-panels // columns)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw(axis, logs: Sequence[Tuple[str, TrainingLog]], item: Chart, style: str = "-", suffix: str = "") -> int:
    """Plot ``item`` of every log on ``axis``; returns how many lines were drawn."""
    drawn = 0
    for index, (label, log) in enumerate(logs):
        xs, ys = log.series(item.phase, item.field, item.x)
        if xs:
            marker = "o" if len(xs) < 30 else None
            axis.plot(xs, ys, style, color=COLOURS[index % len(COLOURS)], label=f"{label}{suffix}",
                      marker=marker, markersize=3)
            drawn += 1
    return drawn


def _finish(axis, title: str, x: str, ylabel: str, drawn: int, log_scale: bool = False) -> None:
    axis.set_title(title)
    axis.set_xlabel(x)
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    if not drawn:
        axis.text(0.5, 0.5, "not in the log(s)", ha="center", va="center", transform=axis.transAxes, color="grey")
        return
    if log_scale:
        axis.set_yscale("log")
    axis.legend(fontsize="small")


def plot_charts(logs: Sequence[Tuple[str, TrainingLog]], charts: Sequence[Chart]) -> bytes:
    """PNG of Caffe's chart types, one panel each, every log overlaid."""
    if not logs:
        raise EvaluationError("no training log to plot")
    figure, axes = _figure(len(charts))
    for axis, item in zip(axes, charts):
        drawn = _draw(axis, logs, item)
        _finish(axis, item.title, item.x, item.field, drawn, log_scale=item.field == "lr")
    return _png(figure)


def plot_overview(logs: Sequence[Tuple[str, TrainingLog]], x: str = "iterations") -> bytes:
    """PNG of the learning curves: loss (train solid, test dashed), test accuracy, learning rate."""
    if not logs:
        raise EvaluationError("no training log to plot")
    by_name = {(c.phase, c.field, c.x): c for c in CHARTS}
    figure, (loss, acc, rate) = _figure(3)
    drawn = _draw(loss, logs, by_name["train", "loss", x], "-", " train")
    drawn += _draw(loss, logs, by_name["test", "loss", x], "--", " test")
    _finish(loss, "loss (train solid, test dashed)", x, "loss", drawn)
    _finish(acc, "test accuracy", x, "accuracy", _draw(acc, logs, by_name["test", "accuracy", x]))
    _finish(rate, "learning rate", x, "lr", _draw(rate, logs, by_name["train", "lr", x]), log_scale=True)
    return _png(figure)


def read_logs(paths: Sequence[PathLike], labels: Optional[Sequence[str]] = None) -> List[Tuple[str, TrainingLog]]:
    """(label, parsed log) per path; labels default to the file's folder and name."""
    if labels is None:
        labels = [_label(Path(p)) for p in paths]
    return [(label, read_log(path)) for label, path in zip(labels, paths)]


def _label(path: Path) -> str:
    fold = _FOLD_LOG.match(path.parent.name)
    return f"fold {fold.group(1)}" if fold and path.name == TRAIN_LOG else f"{path.parent.name}/{path.name}"
