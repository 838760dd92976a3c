"""``lymph-cv evaluate`` (step 5 for one fold) and ``lymph-cv report`` (all evaluated folds pooled)."""
from __future__ import annotations

from pathlib import Path


import click

from lymph_cv.core.threads import quiet_numpy_blas

# Before numpy loads (the options' callbacks load it): these commands' own matrices are small (the
# native engine's float32 rest, the report's tables), and OpenBLAS's idle threads only took CPU from
# the net: whole `evaluate` 2.29 s against 2.35 s median of 5, less system time (0.13-0.18 s, 0.22-0.27).
quiet_numpy_blas()

from lymph_cv.commands.defaults import AGGREGATION_CHOICES, DEFAULT_BATCH_SIZES, MEAN_MODES, PRECISIONS  # noqa: E402
from lymph_cv.commands.options import DEVICE, classes_option  # noqa: E402
from lymph_cv.commands.stain import stain_for_evaluation, stain_options  # noqa: E402
from lymph_cv.errors import ConfigError  # noqa: E402

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)


def _aggregate(ctx, param, value: str):
    from lymph_cv.stages.aggregate import parse_aggregate

    try:
        return parse_aggregate(value)
    except ConfigError as exc:
        raise click.BadParameter(exc.detail, ctx=ctx, param=param) from exc


@click.command()
@click.argument("workdir", type=_DIR)
@click.option("--fold", "-k", type=click.IntRange(min=1), required=True, help="Fold K to evaluate.")
@click.option("--model", type=_FILE, help="Trained .caffemodel [default: the highest WORKDIR/K/*_iter_N.caffemodel; "
                                          "of several series, the one the fold's solver names].")
@click.option("--deploy", type=_FILE, help="Deploy net [default: WORKDIR/K/deploy_train32.prototxt].")
@click.option("--mean", type=_FILE, help="Mean .binaryproto [default: WORKDIR/DB_train_w32_K.binaryproto].")
@click.option("--parent-list", type=_FILE, help="Test images, one per line [default: WORKDIR/test_w32_parent_K.txt].")
@click.option("--images", type=_DIR, help="Folder the parent list's entries are under [default: the data folder in WORKDIR/subs/manifest.json].")
@click.option("--classes", callback=classes_option, help="Class names in label order, e.g. CLL,FL,MCL [default: from the workdir, else the parent list's class folders sorted].")
@click.option("--skip-missing", is_flag=True, help="Evaluate the listed images that exist, skipping (and recording) the others.")
@click.option("--out", type=_DIR, help="Output folder [default: WORKDIR/eval/fold_K].")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="torch device (auto: CUDA when available).")
@click.option("--oversample/--no-oversample", default=True, show_default=True, help="10 crops per window (4 corners, centre, mirrored) or the centre crop only.")
@click.option("--tta", is_flag=True, help="Test-time augmentation: every crop also turned by 90, 180 and 270 degrees (40 views; 8 with --no-oversample).")
@click.option("--mean-mode", type=click.Choice(MEAN_MODES), default="resize", show_default=True,
              help="resize: the tutorial pycaffe's mean resized to the net input; crop: training's mean at each crop's offset.")
@click.option("--aggregate", default="vote", show_default=True, callback=_aggregate,
              help=f"Window probabilities → image label: {', '.join(AGGREGATION_CHOICES)}.")
@click.option("--window", type=click.IntRange(min=2), help="Window size [default: the manifest's patch size, else 36].")
@click.option("--stride", type=click.IntRange(min=1), help="Window grid step [default: the manifest's step, else 32].")
@click.option("--batch-size", type=click.IntRange(min=1),
              help=f"Crops per forward call [default: {', '.join(f'{k} {v}' for k, v in DEFAULT_BATCH_SIZES.items())}].")
@click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="Forward arithmetic: float32 is Caffe's; bfloat16 runs the convolutions and poolings in bfloat16 "
                   "(fast on CPUs with AMX or AVX512-BF16; others run float32 instead) and predicts again in float32 every window whose vote it "
                   "could change, so the votes stay float32's (probabilities differ slightly).")
@click.option("--heatmaps", is_flag=True, help="Also write a PNG overlay per image (eval/fold_K/heatmaps/).")
@click.option("--legacy-layout", is_flag=True, help="Print the matrix as the tutorial did: rows predicted, columns actual.")
@stain_options
def evaluate(workdir: Path, fold: int, model, deploy, mean, parent_list, images, classes, skip_missing, out, device, oversample,
             tta, mean_mode, aggregate, window, stride, batch_size, precision, heatmaps, legacy_layout, stain, stain_target,
             stain_include_background, stain_params) -> None:
    """Step 5: label every test image of fold K by voting over its windows; write metrics,
    matrices and PNGs to WORKDIR/eval/fold_K.

    Without a full workdir give --model, --deploy, --mean, --parent-list and --images (WORKDIR is
    then only where eval/fold_K is written).

    Stain: by default the normalisation the workdir records for fold K (stain_K.json, or the patch
    folder's stain.json) is applied as recorded; --stain METHOD checks it is that method (or uses
    --stain-target), --stain none evaluates the images as they are."""
    import logging

    from lymph_cv.core import faults
    from lymph_cv.core.fsutil import check_writable
    from lymph_cv.core.preload import Preload
    from lymph_cv.stages.evaluate import evaluate_fold, fold_output_dir
    from lymph_cv.stages.figures import MODULES
    from lymph_cv.stages.report import format_fold, write_fold

    out_dir = out or fold_output_dir(workdir, fold)
    check_writable(out_dir.parent)  # before the evaluation, not after it (it is replaced as a whole)
    record = stain_for_evaluation(workdir, fold, stain, stain_target, stain_include_background, stain_params)
    preload = Preload(MODULES)  # the figures' matplotlib, imported while the net runs
    result = evaluate_fold(workdir, fold, model=model, deploy=deploy, mean=mean, parent_list=parent_list,
                           images=images, classes=classes, skip_missing=skip_missing, device=device, oversample=oversample,
                           tta=tta, mean_mode=mean_mode, aggregate=aggregate, window=window, stride=stride,
                           batch_size=batch_size, precision=precision, stain=record, recorded_stain=stain is None,
                           meanwhile=preload.start)
    faults.event("evaluate:scored")
    preload.wait()
    record = write_fold(result, out_dir, legacy_layout=legacy_layout, heatmaps=heatmaps)
    click.echo(format_fold(record, legacy_layout), nl=False)
    logging.getLogger(__name__).info("wrote %s", out_dir)


@click.command()
@click.argument("workdir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--legacy-layout", is_flag=True, help="Print the matrix as the tutorial did: rows predicted, columns actual.")
def report(workdir: Path, legacy_layout: bool) -> None:
    """Pool every evaluated fold of WORKDIR: matrix, per-fold mean ± sd, per-class metrics,
    eval/report.md, report.json, report.txt and confusion.png."""
    import logging

    from lymph_cv.stages.report_folds import headline

    # The headline before numpy and the report's modules load; it raises what build_report would
    # for the folds' files, so a bad work folder still gives one error line and nothing on stdout.
    head = headline(workdir)
    if head is not None:
        click.echo(head)
    from lymph_cv.stages.report import build_report, format_report, write_report

    result = build_report(workdir)
    # the text next: the files' figures (matplotlib, the HTML page) take most of the command's time
    text = format_report(result, legacy_layout)
    first, _, rest = text.partition("\n")
    click.echo(rest if first == head else text, nl=False)
    paths = write_report(result, legacy_layout)
    logging.getLogger(__name__).info("wrote %s", ", ".join(str(p) for p in paths))
