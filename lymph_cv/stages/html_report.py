"""``eval/report.html``: the pooled report as one self-contained page (images embedded as base64).

Sections: the pooled result and matrix first (so a screenshot of the first screen shows it), then
the image-level ROC, per fold its matrix and metrics, the misclassified images with their
heatmaps (when ``evaluate --heatmaps`` wrote them), learning curves from the folds'
``train.log``, the leak check of the folds, a held-out split scored by ``lymph-cv heldout``, and
the run's parameters, seeds and stage keys (``run.json`` and the stages' records).  The page
needs no network and no script except a check that logs a console error for an image that does
not decode (the browser test reads the console).
"""
from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from lymph_cv.workdir.records import ANY, read_record
from lymph_cv.errors import LymphCVError
from lymph_cv.stages import figures, slide_report
from lymph_cv.stages.report_folds import unlisted_folds
from lymph_cv.stages.roc import ROC_PNG
from lymph_cv.workdir.layout import (DBS_JSON, EVAL_DIR, EVAL_FOLD_DIR, FOLDS_JSON, HEATMAP_DIR, RENDER_JSON,
                                     RUN_JSON, TRAIN_JSON, TRAIN_LOG, heatmap_name)

log = logging.getLogger(__name__)

#: Colour of a 100 % matrix cell (the confusion PNG's dark blue, as RGB 0–255).
FULL_CELL = tuple(round(255 * c) for c in figures.FULL_CELL)
DARK_CELL = figures.DARK_CELL
#: Decimal places of metrics.
DIGITS = 3
#: Width (CSS pixels) of a heatmap thumbnail; click opens the full image.
THUMB_WIDTH = 260
#: The one record of the synthetic data set (``lymph-cv synth``), inside the data folder.
SYNTH_JSON = "synth.json"
#: ``eval/heldout_K/`` of ``lymph-cv heldout`` and the metrics file in it.
_HELDOUT_DIR = re.compile(r"^heldout_(\d+)$")
METRICS_NAME = "metrics.json"
RECALL_NOTE = ("Rows are the true class, columns the predicted class; the percentage in a cell is its share "
               "of the row, so the diagonal percentages are each class's recall.")

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1b1f24;line-height:1.4;padding:0 16px}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ccd;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #bbc;padding:4px 8px;text-align:right}
th{background:#eef}td.l,th.l{text-align:left}.matrix td{width:72px;height:48px;text-align:center}
.matrix td small{display:block;font-size:.8em}.note{color:#555;font-size:.92em}.headline{font-size:1.15em}
.ok{color:#176d17}.bad{color:#b3261e}code{background:#f3f3f6;padding:0 3px}
.fold{display:inline-block;vertical-align:top;margin-right:28px;max-width:390px}.thumbs figure{display:inline-block;margin:6px;
vertical-align:top;max-width:%dpx}.thumbs img{width:100%%;border:1px solid #ccd}figcaption{font-size:.85em}
pre{background:#f6f6f9;padding:6px;overflow-x:auto;font-size:.85em}
""" % THUMB_WIDTH
# Logs a console error for every image that failed to decode: what the browser test checks.
_SCRIPT = """window.addEventListener("load",function(){document.querySelectorAll("img").forEach(function(i){
if(!i.complete||i.naturalWidth===0){console.error("image did not load: "+i.alt);}});});"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{DIGITS}f}"


def _pm(spread: dict) -> str:
    return f"{_num(spread['mean'])} ± {_num(spread['sd'])}"


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, width: Optional[int] = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(png)}" alt="{_e(alt)}"{size}>'


def matrix_table(confusion: Sequence[Sequence[int]], classes: Sequence[str], element_id: str = "") -> str:
    """The matrix as an HTML table: counts and row percentages, cells shaded by the row fraction."""
    ident = f' id="{_e(element_id)}"' if element_id else ""
    rows = [f'<table class="matrix"{ident}><tr><th class="l">true \\ predicted</th>'
            + "".join(f"<th>{_e(c)}</th>" for c in classes) + "<th>images</th></tr>"]
    for name, row in zip(classes, confusion):
        total = sum(int(v) for v in row)
        cells = []
        for value in row:
            fraction = int(value) / total if total else 0.0
            colour = tuple(round(255 - fraction * (255 - c)) for c in FULL_CELL)
            ink = "#fff" if fraction > DARK_CELL else "#000"
            cells.append(f'<td style="background:rgb{colour};color:{ink}">{int(value)}'
                         f"<small>{100 * fraction:.0f}%</small></td>")
        rows.append(f'<tr><th class="l">{_e(name)}</th>{"".join(cells)}<td>{total}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def class_table(per_class: Dict[str, dict]) -> str:
    """Precision / recall / F1 / support per class."""
    rows = ['<table><tr><th class="l">class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>']
    for name, m in per_class.items():
        rows.append(f'<tr><td class="l">{_e(name)}</td><td>{_num(m["precision"])}</td><td>{_num(m["recall"])}</td>'
                    f'<td>{_num(m["f1"])}</td><td>{m["support"]}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def _compact(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def _run_section(workdir: Path, folds: Sequence[int]) -> str:
    parts = ["<h2>Run</h2>"]
    run = read_record(workdir / RUN_JSON, ANY)
    stages = (run or {}).get("stages", {})
    if stages:
        parts.append('<p class="note">Each stage\'s key chains its parameters to the stage before it '
                     "(<code>run.json</code>); an unchanged key with complete outputs is skipped on a rerun.</p>")
        parts.append('<table id="stages"><tr><th class="l">stage</th><th class="l">key</th><th class="l">parameters</th>'
                     "<th>seconds</th><th class=\"l\">finished</th></tr>")
        for name, entry in stages.items():
            parts.append(f'<tr><td class="l">{_e(name)}</td><td class="l"><code>{_e(entry.get("key", ""))}</code></td>'
                         f'<td class="l"><code>{_e(_compact(entry.get("params", {})))}</code></td>'
                         f'<td>{_e(entry.get("seconds", ""))}</td><td class="l">{_e(entry.get("finished", ""))}</td></tr>')
        parts.append("</table>")
    else:
        parts.append(f'<p class="note">No <code>{RUN_JSON}</code>: the stages were run one by one.</p>')
    seeds = _seeds(workdir, folds, stages)
    if seeds:
        parts.append('<table id="seeds"><tr><th class="l">record</th><th class="l">seed</th></tr>'
                     + "".join(f'<tr><td class="l"><code>{_e(where)}</code></td><td class="l">{_e(seed)}</td></tr>'
                               for where, seed in seeds) + "</table>")
    return "".join(parts)


def _seeds(workdir: Path, folds: Sequence[int], stages: dict) -> List[tuple]:
    """(record file, seed) of every record that holds one."""
    found = []
    data_dir = (stages.get("synth", {}).get("params", {}) or {}).get("data")
    candidates = [Path(data_dir) / SYNTH_JSON] if data_dir else []
    candidates += [Path(FOLDS_JSON), Path(DBS_JSON)]
    for k in folds:
        candidates += [Path(str(k)) / RENDER_JSON, Path(str(k)) / TRAIN_JSON]
    for relative in candidates:
        record = read_record(workdir / relative, ANY)
        if not record:
            continue
        for key in ("seed", "random_seed"):
            if key in record:
                found.append((f"{relative.as_posix()}: {key}", record[key]))
    return found


def _leak_section(workdir: Path) -> str:
    from lymph_cv.stages.folds import check_folds

    parts = ["<h2>Leak check</h2>"]
    try:
        check = check_folds(workdir)
    except LymphCVError as exc:
        return parts[0] + f'<p class="note">Not checked: {_e(exc)}</p>'
    if check.leaks:
        parts.append('<p class="bad" id="leaks"><b>Cases on both sides of a fold</b> (images of one patient in '
                     "train and test make the test easier than new patients would be):</p><ul>")
        for fold in check.folds:
            if fold.leaked_cases or fold.leaked_images:
                parts.append(f"<li>fold {fold.index}: {len(fold.leaked_cases)} case(s) "
                             f"{_e(', '.join(fold.leaked_cases[:8]))}{' …' if len(fold.leaked_cases) > 8 else ''}"
                             f"; {len(fold.leaked_images)} image(s) in both lists</li>")
        parts.append("</ul>")
    else:
        parts.append(f'<p class="ok" id="leaks">No leaks: no case (regex <code>{_e(check.case_regex)}</code>) has '
                     f"images on both sides of any of the {len(check.folds)} folds.</p>")
    if check.untested or check.tested_twice:
        parts.append(f'<p class="note">{len(check.untested)} image(s) never tested, '
                     f"{len(check.tested_twice)} tested in more than one fold.</p>")
    return "".join(parts)


def _curves_section(workdir: Path, folds: Sequence[int]) -> str:
    from lymph_cv.stages.curves import plot_overview, read_logs

    paths = [workdir / str(k) / TRAIN_LOG for k in folds if (workdir / str(k) / TRAIN_LOG).is_file()]
    head = "<h2>Learning curves</h2>"
    if not paths:
        return head + '<p class="note">No training log (<code>K/train.log</code>) in the work directory.</p>'
    try:
        png = plot_overview(read_logs(paths))
    except LymphCVError as exc:
        return head + f'<p class="note">Not drawn: {_e(exc)}</p>'
    return (head + '<p class="note">From each fold\'s <code>train.log</code> (<code>lymph-cv plot-log</code> draws '
            "the same and Caffe's chart types).</p>" + _img(png, "learning curves", None).replace(
                "<img ", '<img id="curves" style="max-width:100%" ', 1))


def _fold_section(workdir: Path, record: dict, classes: Sequence[str]) -> str:
    k = record["fold"]
    settings = record.get("settings", {})
    unit = "slides" if record.get("unit") == "slide" else "images"
    parts = [f'<div class="fold"><h3>Fold {k}</h3>',
             f"<p>{record['images']} {unit}: accuracy <b>{_num(record['accuracy'])}</b>, balanced "
             f"{_num(record['balanced_accuracy'])}; model <code>{_e(Path(settings.get('model', '?')).name)}</code></p>",
             matrix_table(record["confusion"], classes, f"matrix-fold-{k}")]
    tiles = record.get("tiles") if record.get("unit") == "slide" else None
    if isinstance(tiles, dict):
        parts.append(f'<p class="note">Tile level: {tiles.get("tiles", "?")} tiles, accuracy '
                     f'{_num(tiles.get("accuracy"))}, balanced {_num(tiles.get("balanced_accuracy"))}.</p>')
    parts.append("</div>")
    return "".join(parts)


def _misclassified_section(workdir: Path, folds: Sequence[dict], classes: Sequence[str]) -> str:
    wrong = [(f["fold"], item) for f in folds for item in f["misclassified"] or ()]
    unit = "slides" if slide_report.is_slide_report(folds) else "images"
    parts = [f"<h2>Misclassified {unit} ({len(wrong)})</h2>"]
    unrecorded = unlisted_folds(folds)
    if unrecorded:
        parts.append(f"<p>Not recorded for fold {', '.join(map(str, unrecorded))} (a metrics.json without "
                     "<code>misclassified</code>).</p>")
    if not wrong:
        return "".join(parts) if unrecorded else parts[0] + "<p>None.</p>"
    missing_maps = 0
    parts.append('<div class="thumbs">')
    for fold, item in wrong:
        votes = item["votes"]
        total = sum(votes.values()) or 1
        fractions = ", ".join(f"{_e(c)} {votes[c] / total:.0%}" for c in classes)
        caption = (f"fold {fold}: <code>{_e(item['image'])}</code><br>true <b>{_e(item['true'])}</b>, "
                   f"predicted <b class=\"bad\">{_e(item['predicted'])}</b><br>votes {fractions}")
        thumb = workdir / EVAL_DIR / EVAL_FOLD_DIR.format(fold=fold) / HEATMAP_DIR / heatmap_name(item["image"])
        if thumb.is_file():
            picture = _img(thumb.read_bytes(), f"heatmap of {item['image']}")
        else:
            picture, missing_maps = "", missing_maps + 1
        parts.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    parts.append("</div>")
    if missing_maps:
        parts.append(f'<p class="note">{missing_maps} image(s) without a heatmap: evaluate with '
                     "<code>--heatmaps</code> (or <code>lymph-cv run --heatmaps</code>) to see where the votes came from.</p>")
    return "".join(parts)


def shrunk_png(png: bytes, width: int) -> bytes:
    """``png`` resized by area to ``width`` pixels (when wider): what a page embeds for a thumbnail
    (twice its CSS width, sharp on high-density screens), the full figure one click away."""
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.shape[1] <= width:
        return png
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    ok, data = cv2.imencode(".png", cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
    return data.tobytes() if ok else png


def _slides_section(workdir: Path, pooled: dict, folds: Sequence[dict], classes: Sequence[str]) -> str:
    """Slide-level evaluation: tile-level metrics and, per slide, its fractions and its tile heatmap
    and CAM (embedded shrunk; a click opens the full PNG in ``eval/fold_K/heatmaps/``)."""
    if not slide_report.is_slide_report(folds):
        return ""
    parts = ["<h2>Slides</h2>"]
    tiles = pooled.get("tiles")
    if tiles:
        parts.append(f'<p id="tile-metrics">Tile level (each tile labelled with its slide\'s class): {tiles["tiles"]} '
                     f'tiles, accuracy <b>{_num(tiles["accuracy"])}</b>, balanced accuracy '
                     f'{_num(tiles["balanced_accuracy"])}.</p>')
        parts.append(matrix_table(tiles["confusion"], classes, "tile-matrix"))
    parts.append('<div class="thumbs" id="slide-maps">')
    for fold in folds:
        for row in fold.get("slides", []):
            shares = ", ".join(f"{_e(c)} {row['fractions'][c]:.0%}" for c in classes)
            ok = "ok" if row["true"] == row["predicted"] else "bad"
            caption = (f"fold {fold['fold']}: <code>{_e(row['slide'])}</code><br>true <b>{_e(row['true'])}</b>, "
                       f"predicted <b class=\"{ok}\">{_e(row['predicted'])}</b><br>{row['tiles']} tiles: {shares}")
            pictures = []
            for what in ("heatmap", "cam"):
                relative = slide_report.heatmap_path(fold["fold"], row.get(what))
                png = workdir / EVAL_DIR / relative if relative else None
                if png is not None and png.is_file():
                    label = "tile probabilities" if what == "heatmap" else "class activation map"
                    picture = _img(shrunk_png(png.read_bytes(), 2 * THUMB_WIDTH), f"{label} of {row['slide']}")
                    pictures.append(f'<a href="{_e(relative)}">{picture}</a>')
            parts.append(f"<figure>{''.join(pictures)}<figcaption>{caption}</figcaption></figure>")
    parts.append("</div>")
    return "".join(parts)


def _roc_section(pooled: dict) -> str:
    """ROC of the pooled image scores: AUC, threshold and the curve (two classes), or the
    one-vs-rest AUC per class; nothing when the report has no image scores."""
    from lymph_cv.stages.roc import draw_roc

    roc, per_fold = pooled.get("roc"), pooled.get("fold_auc")
    if not roc:
        return ""
    parts = ["<h2>ROC</h2>"]
    spread = f"; per fold {_pm(per_fold)}" if per_fold else ""
    if roc.get("kind") == "binary":
        if roc.get("auc") is None:
            return parts[0] + '<p class="note">No AUC: the test images are all of one class.</p>'
        parts.append(f'<p id="roc">AUC ({_e(roc["positive"])} positive) <b>{_num(roc["auc"])}</b>{spread}; '
                     f'operating threshold {roc["threshold"]:.4g} (sensitivity {_num(roc["sensitivity"])}, '
                     f'specificity {_num(roc["specificity"])}, Youden\'s J).</p>')
        parts.append(_img(draw_roc(roc, "pooled ROC"), "pooled ROC curve"))
    else:
        cells = "".join(f"<tr><td>{_e(name)}</td><td>{_num(value)}</td></tr>" for name, value in roc["per_class"].items())
        parts.append(f'<p id="roc">One-vs-rest AUC, mean <b>{_num(roc.get("macro_auc"))}</b>{spread}.</p>'
                     f"<table><tr><th>class</th><th>AUC</th></tr>{cells}</table>")
    return "".join(parts)


def _heldout_section(workdir: Path) -> str:
    """The held-out split scored by ``lymph-cv heldout`` (``eval/heldout_K/``), when there is one."""
    found = sorted((int(m.group(1)), p) for p in (workdir / EVAL_DIR).glob("heldout_*")
                   if (m := _HELDOUT_DIR.match(p.name)) and (p / METRICS_NAME).is_file())
    if not found:
        return ""
    parts = ["<h2>Held-out split</h2>"]
    for fold, folder in found:
        record = read_record(folder / METRICS_NAME, ANY) or {}
        classes = record.get("classes") or []
        parts.append(f'<h3>Fold {fold}\'s model on the held-out patches</h3><p>{record.get("records", "?")} patches: '
                     f"accuracy <b>{_num(record.get('accuracy'))}</b>, AUC {_num(record.get('auc'))}"
                     + (f", {record.get('views')} views per patch (TTA)" if record.get("tta") else "")
                     + f"; model <code>{_e(Path(str(record.get('model', '?'))).name)}</code></p>")
        if record.get("confusion") and len(classes) == len(record["confusion"]):
            parts.append(matrix_table(record["confusion"], classes, f"matrix-heldout-{fold}"))
        if (folder / ROC_PNG).is_file():
            parts.append(_img((folder / ROC_PNG).read_bytes(), f"held-out ROC of fold {fold}"))
    return "".join(parts)


def render_html(workdir: Path, pooled: dict, folds: Sequence[dict], title: str = "Lymphoma sub-type classification") -> str:
    """The report page: ``pooled`` is the pooled record (``report.json``), ``folds`` the folds'
    ``metrics.json`` records, ``workdir`` where the run's records, logs and heatmaps are."""
    workdir = Path(workdir)
    classes = pooled["classes"]
    fold_numbers = [f["fold"] for f in folds]
    first = folds[0].get("settings", {}) if folds else {}
    slides = slide_report.is_slide_report(folds)
    labelled = (_e(slide_report.intro(first)) if slides else
                f"Image label = {_e(first.get('aggregate', 'vote'))} over {_e(first.get('window', '?'))}-pixel windows "
                f"at stride {_e(first.get('stride', '?'))}, {_e(first.get('crops', '?'))} crops per window.")
    body = [
        f"<h1>{_e(title)}: evaluation</h1>",
        f'<p class="note">Work directory <code>{_e(workdir.resolve())}</code>; {pooled["images"]} test '
        f"{'slides' if slides else 'images'}, {len(folds)} fold(s) ({', '.join(str(k) for k in fold_numbers)}), "
        f"classes {_e(', '.join(classes))}. {labelled}</p>",
        f'<p class="headline" id="headline">Pooled accuracy <b>{_num(pooled["accuracy"])}</b>, balanced accuracy '
        f'<b>{_num(pooled["balanced_accuracy"])}</b>; per fold {_pm(pooled["fold_accuracy"])} '
        f'(balanced {_pm(pooled["fold_balanced_accuracy"])}, mean ± sd).</p>',
        "<h2>Pooled confusion matrix</h2>",
        f'<p class="note" id="recall-note">{_e(RECALL_NOTE)}</p>',
        matrix_table(pooled["confusion"], classes, "pooled-matrix"),
        class_table(pooled["per_class"]),
        _roc_section(pooled),
        "<h2>Per fold</h2>",
        "".join(_fold_section(workdir, f, classes) for f in folds),
        _misclassified_section(workdir, folds, classes),
        _slides_section(workdir, pooled, folds, classes),
        _curves_section(workdir, fold_numbers),
        _leak_section(workdir),
        _heldout_section(workdir),
        _run_section(workdir, fold_numbers),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}: evaluation</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
            f"<body>{''.join(body)}</body></html>\n")
