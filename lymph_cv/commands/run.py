"""``lymph-cv run``: steps 1–5 and the report in one resumable command."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from lymph_cv.commands.options import DEVICE, WORKERS, classes_option, folds_option, pairs_option
from lymph_cv.commands.mil import mil_run_fields, mil_run_options, mil_run_summary
from lymph_cv.commands.training_options import augmentation_options, augmentation_overrides
from lymph_cv.commands.stain import method_params, stain_augment_options, stain_augment_overrides, stain_options
# static copies of the stage names, executors and nets: the engine (stages, cluster, locks) loads when it runs
from lymph_cv.commands.defaults import ARCH_HELP, DEFAULT_ARCH, EXECUTORS, PRECISIONS, RUN_STAGES, STEMS
from lymph_cv.workdir.layout import EVAL_DIR, REPORT_HTML, REPORT_MD

#: ``--demo`` trains this many iterations per fold unless --max-iter says otherwise.
DEMO_MAX_ITER = 300


def plan_line(options, mil: Optional[str]) -> str:
    """``== run WORKDIR: what, on which data, where`` from the options alone (no stage loaded)."""
    source = "demo data" if options.demo is not None else f"data {options.data}"
    folds = options.fold_list
    span = f"folds {folds[0]}-{folds[-1]}" if folds == list(range(folds[0], folds[-1] + 1)) else \
        "folds " + ",".join(map(str, folds))
    what = f"MIL {mil} over {options.bag or 'patient'} bags" if mil is not None else \
        f"{options.arch} on {options.device}, {span} of {options.k}, training {options.executor}"
    redo = f", redoing from {options.from_stage}" if options.from_stage else ""
    return f"== run {options.workdir}: {source}, {what}{redo}"


@click.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(file_okay=False, path_type=Path),
              help="Images, one sub-folder per class [default with --demo: WORKDIR/data, generated].")
@click.option("--demo", is_flag=True, help="Generate a small synthetic data set and train briefly (the quickstart).")
@click.option("--classes", default="CLL,FL,MCL", show_default=True, callback=classes_option,
              help="Class folders in label order.")
@click.option("--k", type=click.IntRange(min=2), default=5, show_default=True, help="Number of folds.")
@click.option("--folds", callback=folds_option, default=None, help="Only these folds, e.g. 1-5 or 1,3 (default: all).")
@click.option("--group-by", type=click.Choice(["image", "case", "site"]), default="image", show_default=True,
              help="image: the tutorial's split; case: all images of a patient on one side; "
                   "site: fold K holds out site K (synth --sites; --k = the number of sites).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds folds, DB shuffles and training.")
@click.option("--backend", type=click.Choice(["leveldb", "lmdb"]), default="leveldb", show_default=True)
@click.option("--direct", is_flag=True, help="Build the databases straight from the images (no patch files).")
@click.option("--max-iter", type=click.IntRange(min=1), default=None,
              help=f"Training iterations per fold [default: the tutorial's 600000; {DEMO_MAX_ITER} with --demo].")
@click.option("--dropout", is_flag=True, help="Train the dropout variant of the net.")
@click.option("--arch", type=click.Choice([name for name, _description in ARCH_HELP]), default=DEFAULT_ARCH, show_default=True,
              help="Network from the architecture registry (see `lymph-cv render --help`).")
@click.option("--stem", type=click.Choice(STEMS), default=None,
              help="ResNet stem (default: by patch size, cifar below 96 px, imagenet from 96).")
@click.option("--set", "overrides", multiple=True, callback=pairs_option, metavar="KEY=VALUE",
              help="Template variable for the rendered solver/net (see `lymph-cv render --help`); repeatable.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="Training and evaluation (auto: CUDA when available).")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="Train folds here, or as PBS / Slurm jobs (evaluation waits for them).")
@click.option("--walltime", default=None, help="Cluster jobs: [D-]HH:MM:SS.")
@click.option("--queue", default=None, help="Cluster jobs: PBS queue / Slurm partition.")
@click.option("--job-timeout", type=click.FloatRange(min=0), default=None, help="Cluster jobs: give up waiting after this many seconds.")
@click.option("--aggregate", default="vote", show_default=True, help="Image label from windows: vote, mean, topk:K.")
@click.option("--no-oversample", is_flag=True, help="Evaluate the centre crop of each window only.")
@click.option("--tta", is_flag=True, help="Test-time augmentation: every crop also turned by 90, 180, 270 degrees.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="Evaluation arithmetic (see `lymph-cv evaluate --help`): bfloat16 keeps float32's votes.")
@click.option("--heatmaps", is_flag=True,
              help="Also draw a heatmap per test image (eval/fold_K/heatmaps/; the misclassified ones go into report.html).")
@click.option("--workers", type=WORKERS, default=None, help="Processes for patches/DBs [default or 0: all cores].")
@click.option("--from", "from_stage", type=click.Choice(RUN_STAGES), default=None,
              help="Redo this stage and everything after it.")
@click.option("--tile-size", type=click.IntRange(min=1), default=None,
              help="The data are whole slides (DATA/CLASS/*.svs|tif…): tile them at this side (in pixels at "
                   "--tile-mpp or --tile-level) instead of cutting patches, and evaluate slide by slide.")
@click.option("--tile-mpp", type=float, default=None, help="Slides: microns per pixel of the tiles (best level, resampled).")
@click.option("--tile-level", type=click.IntRange(min=0), default=None, help="Slides: read tiles at this pyramid level.")
@click.option("--tile-stride", type=click.IntRange(min=1), default=None, help="Slides: tile origin step [default: --tile-size].")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=None,
              help="Slides: keep a tile when at least this share of it is tissue [default: 0.5].")
@click.option("--tile-resize", type=click.IntRange(min=1), default=None,
              help="Slides: write tiles of this side (the patch size trained on) [default: --tile-size].")
@click.option("--slide-threshold", type=click.FloatRange(0, 1), default=None,
              help="Slides, two classes: a slide is the second class when its tile fraction reaches this [default: argmax].")
@click.option("--no-cam", is_flag=True, help="Slides: no class activation maps (nets without global average pooling).")
@augmentation_options
@stain_augment_options
@stain_options
@mil_run_options
@click.pass_context
def run(ctx: click.Context, workdir: Path, data: Optional[Path], demo: bool, classes, k: int, folds, group_by: str,
        seed: int, backend: str, direct: bool, max_iter: Optional[int], dropout: bool, arch: str, stem: Optional[str],
        overrides: dict, device: str, executor: str, walltime, queue, job_timeout, aggregate: str,
        no_oversample: bool, tta: bool, precision: str, heatmaps: bool, workers, from_stage,
        mixup_alpha, label_smoothing, vertical_flip, rotate90, stain_augment, stain_augment_scale,
        stain_augment_shift, tile_size, tile_mpp, tile_level, tile_stride, min_tissue, tile_resize, slide_threshold,
        no_cam, stain, stain_target, stain_include_background, stain_params, mil, bag, clinical, fusion,
        mil_set) -> None:
    """Steps 1–5 and the report: images → patches → folds → DBs → training → confusion matrices.

    Resumable: each stage is recorded in WORKDIR/run.json and skipped when its outputs are
    complete and its parameters unchanged; rerun after an interruption to continue.

    --stain METHOD normalises every image as it is read; without --stain-target the target is
    fitted per fold on that fold's training images, which builds the databases straight from the
    images (--direct is implied).

    --mil METHOD runs multiple-instance learning over bags instead (patient folders, or --bag image|case
    of the images): bags → patient splits → a MIL model per split (WORKDIR/mil/NAME/)."""
    import logging

    from lymph_cv.stages.stage import DemoData, RunOptions  # the options alone; the engine after the plan line

    if data is None and not demo:
        raise click.UsageError("give --data DIR (one sub-folder per class) or --demo")
    overrides = {**overrides, **{key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in
                                 {**augmentation_overrides(mixup_alpha, label_smoothing, vertical_flip, rotate90),
                                  **stain_augment_overrides(stain_augment, stain_augment_scale,
                                                            stain_augment_shift)}.items()}}
    if stain is None and (stain_target is not None or stain_include_background or stain_params):
        raise click.UsageError("--stain-target/--stain-include-background/--stain-param need --stain METHOD")
    if stain == "none":
        stain = None
    stain_params = method_params(stain, stain_include_background, stain_params) if stain else {}
    if tile_size is None and any(v is not None for v in (tile_mpp, tile_level, tile_stride, min_tissue, tile_resize,
                                                         slide_threshold)):
        raise click.UsageError("the --tile-* / --min-tissue / --slide-threshold options are for slides: give --tile-size")
    if stain is not None and stain_target is None and not direct:
        logging.getLogger(__name__).info("--stain %s without --stain-target: targets fitted per fold, databases built from the images", stain)
        direct = True
    job_options = None
    if executor != "local":
        from lymph_cv.cluster.jobs import JobOptions

        job_options = JobOptions(**{k_: v for k_, v in (("walltime", walltime), ("queue", queue)) if v is not None})
    fields = {"classes": classes, "direct": direct, **mil_run_fields(ctx, mil, bag, clinical, fusion, mil_set)}
    options = RunOptions(
        workdir=workdir, data=data, demo=DemoData() if demo else None, k=k, folds=folds,
        group_by=group_by, seed=seed, backend=backend,
        max_iter=max_iter if max_iter is not None else (DEMO_MAX_ITER if demo else None),
        dropout=dropout, arch=arch, stem=stem, overrides=overrides, device=device, executor=executor,
        job_options=job_options, job_timeout=job_timeout, oversample=not no_oversample, tta=tta, precision=precision,
        aggregate=aggregate, heatmaps=heatmaps, workers=workers,
        from_stage=from_stage, stain=stain, stain_params=stain_params, stain_target=stain_target,
        tile_size=tile_size, tile_mpp=tile_mpp, tile_level=tile_level, tile_stride=tile_stride, min_tissue=min_tissue,
        tile_resize=tile_resize, slide_threshold=slide_threshold, cams=not no_cam, **fields)

    # The plan first on a terminal: loading the stages (torch, OpenCV) takes seconds before the first
    # stage line.  Not into a pipe or log: there a bad option stays the one error line.
    if sys.stderr.isatty():
        click.echo(plan_line(options, mil), err=True)
    from lymph_cv.pipeline import run_pipeline

    def announce(name: str, action: str) -> None:
        verb = {"skip": "up to date, skipped", "resume": "resuming", "run": "running"}[action]
        click.echo(f"== {name}: {verb}", err=True)

    result = run_pipeline(options, on_stage=announce)
    if mil is not None:
        click.echo(mil_run_summary(result.results.get("mil")))
    if result.report is not None:
        from lymph_cv.stages.report import format_report

        click.echo(format_report(result.report), nl=False)
        click.echo(f"report: {Path(workdir) / EVAL_DIR / REPORT_MD}")
        click.echo(f"report (HTML, open in a browser): {Path(workdir) / EVAL_DIR / REPORT_HTML}")
