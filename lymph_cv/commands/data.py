"""``lymph-cv synth | patches | folds | dbs``: the data steps (tutorial steps 1–3)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from lymph_cv.commands.options import WORKERS
from lymph_cv import DEFAULT_CLASSES
from lymph_cv.commands.options import classes_option
from lymph_cv.commands import defaults
from lymph_cv.commands.stain import resolve as resolve_stain
from lymph_cv.commands.stain import stain_options

_WORKERS = click.option("--workers", type=WORKERS, default=None, help="Processes (default or 0: all cores).")


def _counts(ctx: click.Context, param: click.Parameter, value: Optional[str]):
    """``--per-class``: one number, or one per class separated by commas."""
    if value is None:
        return None
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected a number or comma-separated numbers, got {value!r}") from None
    if min(numbers) < 1:
        raise click.BadParameter(f"counts must be at least 1, got {value!r}")
    return numbers[0] if len(numbers) == 1 else numbers


def _range(kind):
    """A ``LOW-HIGH`` option callback (``kind`` int or float) → (low, high)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str):
        low, dash, high = value.partition("-")
        try:
            pair = (kind(low), kind(high)) if dash else (kind(value), kind(value))
        except ValueError:
            raise click.BadParameter(f"expected LOW-HIGH, e.g. {param.default}, got {value!r}") from None
        if pair[0] > pair[1]:
            raise click.BadParameter(f"LOW must not exceed HIGH, got {value!r}")
        return pair

    return parse


_CLASSES = click.option(
    "--classes",
    default=",".join(DEFAULT_CLASSES),
    show_default=True,
    callback=classes_option,
    help="Class folders in label order (label = position).",
)


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", callback=_counts, default=None,
              help="Images per class: N, or N1,N2,N3 (default: the published 113,139,122).")
@click.option("--cases-per-class", type=click.IntRange(min=1), default=defaults.REAL_CASES_PER_CLASS, show_default=True)
@click.option("--width", type=click.IntRange(min=1), default=defaults.REAL_WIDTH, show_default=True)
@click.option("--height", type=click.IntRange(min=1), default=defaults.REAL_HEIGHT, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sites", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cases come from this many sites with strongly different stains (recorded in synth.json).")
@click.option("--layout", type=click.Choice(["tutorial", "pcam", "bags", "slides"]), default="tutorial",
              show_default=True,
              help="tutorial: class folders of full-size images; pcam: PatchCamelyon's HDF5 split files "
                   "(96x96 patches; --per-class N,N,N = train,valid,test patches, default 4096,512,512); "
                   "bags: one folder of cell images per patient + clinical.csv (reactive/tumoral, for MIL); "
                   "slides: class folders of pyramidal tiled TIFF slides (default 6 per class, 3 cases, 4096x4096).")
@click.option("--patients", type=click.IntRange(min=2), default=defaults.DEFAULT_PATIENTS, show_default=True,
              help="--layout bags: patients.")
@click.option("--cells", callback=_range(int), default="-".join(map(str, defaults.DEFAULT_CELLS)), show_default=True,
              help="--layout bags: cells per patient, MIN-MAX.")
@click.option("--abnormal", callback=_range(float), default="-".join(map(str, defaults.DEFAULT_ABNORMAL)),
              show_default=True, help="--layout bags: share of abnormal cells in a tumoral patient, LOW-HIGH.")
@click.option("--cell-size", type=click.IntRange(min=defaults.MIN_CELL_SIZE), default=defaults.DEFAULT_CELL_SIZE,
              show_default=True, help="--layout bags: side of a cell image in pixels.")
@click.option("--clinical-signal", type=click.FloatRange(min=0), default=defaults.DEFAULT_CLINICAL_SIGNAL,
              show_default=True, help="--layout bags: class shift of age and log lymphocyte count, in sds.")
@click.option("--mpp", type=float, default=None, help="--layout slides: microns per pixel of level 0 [default: 0.5].")
@click.option("--slide-compression", type=click.Choice(["jpeg", "deflate"]), default="jpeg", show_default=True,
              help="--layout slides: the compression of the TIFF tiles.")
@_CLASSES
@_WORKERS
@click.pass_context
def synth(ctx: click.Context, out: Path, per_class, cases_per_class: int, width: int, height: int, seed: int,
          sites: int, layout: str, patients: int, cells, abnormal, cell_size: int, clinical_signal: float,
          mpp: Optional[float], slide_compression: str, classes: list[str], workers) -> None:
    """Write a synthetic CLL/FL/MCL data set in the real layout to OUT."""
    bag_only = ("patients", "cells", "abnormal", "cell_size", "clinical_signal")
    slide_only = ("mpp", "slide_compression")
    others = {"bags": slide_only + ("per_class", "cases_per_class", "width", "height", "sites", "classes"),
              "slides": bag_only + ("sites",)}.get(layout, bag_only + slide_only)
    given = [name for name in others if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} does not apply with --layout {layout}")
    if layout == "bags":
        from lymph_cv.stages import synth_bags

        record = synth_bags.generate_bags(out, patients=patients, cells=cells, abnormal=abnormal, cell_size=cell_size,
                                          clinical_signal=clinical_signal, seed=seed, workers=workers)
        click.echo(f"{record['patients']} patients, {record['instances']} cell images and "
                   f"{synth_bags.CLINICAL_CSV} in {out}")
        return
    if layout == "slides":
        _synth_slides(ctx, out, per_class, cases_per_class, width, height, seed, mpp, slide_compression, classes,
                      workers)
        return
    if layout == "pcam":
        from lymph_cv.stages.pcam import synth_pcam

        counts = None
        if per_class is not None:
            values = [per_class] * 3 if isinstance(per_class, int) else list(per_class)
            if len(values) != 3:
                raise click.BadParameter("with --layout pcam give N or N_train,N_valid,N_test", param_hint="--per-class")
            counts = dict(zip(("train", "valid", "test"), values))
        written = synth_pcam(out, counts=counts, seed=seed)
        click.echo(", ".join(f"{split} {n}" for split, n in written.items()) + f" PCam patches in {out}")
        return
    from lymph_cv.stages import synth as synth_module

    paths = synth_module.generate(
        out, per_class=per_class, cases_per_class=cases_per_class, width=width, height=height,
        seed=seed, classes=classes, workers=workers, sites=sites,
    )
    click.echo(f"{len(paths)} images in {out}")


def _synth_slides(ctx: click.Context, out: Path, per_class, cases_per_class: int, width: int, height: int, seed: int,
                  mpp: Optional[float], compression: str, classes: list[str], workers) -> None:
    """``synth --layout slides``: the image defaults of --cases-per-class, --width, --height become the slides'."""
    from lymph_cv.stages import synth_slides

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)

    paths = synth_slides.generate_slides(
        out, per_class=synth_slides.DEFAULT_SLIDES_PER_CLASS if per_class is None else per_class,
        cases_per_class=cases_per_class if given("cases_per_class") else synth_slides.DEFAULT_SLIDE_CASES,
        width=width if given("width") else synth_slides.DEFAULT_SLIDE_SIDE,
        height=height if given("height") else synth_slides.DEFAULT_SLIDE_SIDE,
        mpp=synth_slides.DEFAULT_MPP if mpp is None else mpp, compression=compression, seed=seed, classes=classes,
        workers=workers)
    click.echo(f"{len(paths)} slides in {out}")


_SKIP_BAD = click.option("--skip-bad", is_flag=True, help="Warn about and skip bad inputs instead of stopping.")


@click.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@_CLASSES
@click.option("--patch-size", type=click.IntRange(min=1), default=defaults.WINDOW_SIZE, show_default=True)
@click.option("--step", type=click.IntRange(min=1), default=defaults.WINDOW_STEP, show_default=True)
@click.option("--mat", "write_mat", is_flag=True, help="Also write Matlab's class_struct.mat.")
@click.option("--manifest-only", is_flag=True, help="Write only manifest.json, no patch files (for `dbs --images`).")
@stain_options
@_SKIP_BAD
@_WORKERS
def patches(data: Path, out: Path, classes: list[str], patch_size: int, step: int, write_mat: bool,
            manifest_only: bool, stain, stain_target, stain_include_background, stain_params, skip_bad: bool,
            workers) -> None:
    """Step 1: rotated patches of every image of DATA/<class>/ into OUT (with manifest.json)."""
    from lymph_cv.stages import patches as patches_module

    method, record, _ = resolve_stain(stain, stain_target, stain_include_background, stain_params)
    if method is not None and record is None:
        raise click.UsageError("patches --stain needs --stain-target (a record or an image): before the folds "
                               "there are no training images to fit on (`dbs --images --stain` fits per fold)")
    manifest = patches_module.extract_patches(
        data, out, classes=classes, patch_size=patch_size, step=step,
        workers=workers, write_mat=write_mat, skip_bad=skip_bad, write_patches=not manifest_only, stain=record,
    )
    click.echo(f"{len(manifest.images)} images, {manifest.total_patches} patches in {out}")


class _DefaultCommandGroup(click.Group):
    """A group whose arguments, when they do not start with a subcommand, go to ``default``."""

    default = "make"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultCommandGroup)
def folds() -> None:
    """Step 2: `folds MANIFEST OUT` writes the k-fold lists; `folds check DIR` looks for leaks."""


@folds.command("make")
@click.argument("manifest", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--k", type=click.IntRange(min=2), default=defaults.DEFAULT_K, show_default=True, help="Number of folds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--group-by", type=click.Choice(defaults.GROUP_BY), default=defaults.GROUP_BY[0], show_default=True,
              help="image: the tutorial (each image its own patient); case: a case's images stay together; "
                   "site: one fold per site (as --by-site).")
@click.option("--by-site", is_flag=True, help="Hold out whole sites: fold K tests on site K (synth.json's sites); --k follows.")
@click.option("--case-regex", default=None, help="Case id from an image stem (group 'case'; default '<case>_NNN').")
@click.option("--from-parent-lists", "parent_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Reproduce the split of these train/test_w32_parent_K.txt lists.")
@click.pass_context
def make_folds(ctx: click.Context, manifest: Path, out: Path, k: int, seed: int, group_by: str, by_site: bool,
               case_regex, parent_dir) -> None:
    """Write train/test patch and parent lists per fold to OUT (MANIFEST: subs/manifest.json or subs/)."""
    from lymph_cv.stages import folds as folds_module
    from lymph_cv.stages import patches as patches_module

    if by_site:
        if ctx.get_parameter_source("group_by") is not click.core.ParameterSource.DEFAULT and group_by != "site":
            raise click.UsageError(f"--by-site and --group-by {group_by} contradict each other")
        group_by = "site"
    if group_by == "site":
        given = [f"--{name}" for name in ("k", "seed") if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{given[0]} does not apply with --by-site (one fold per site)")
    if parent_dir is not None:
        given = [f"--{name.replace('_', '-')}" for name in ("k", "seed", "group_by", "by_site", "case_regex")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{given[0]} does not apply with --from-parent-lists (the lists fix the split)")
        fold_set = folds_module.folds_from_parent_lists(manifest, parent_dir, out)
    elif group_by == "site":
        fold_set = folds_module.make_site_folds(manifest, out, case_regex=case_regex or patches_module.DEFAULT_CASE_REGEX)
    else:
        fold_set = folds_module.make_folds(manifest, out, k=k, seed=seed, group_by=group_by,
                                           case_regex=case_regex or patches_module.DEFAULT_CASE_REGEX)
    click.echo(folds_module.describe(fold_set))


@folds.command("check")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--case-regex", default=None, help="Case id from an image stem (default: folds.json's, else '<case>_NNN').")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any case or image is on both sides of a fold.")
def check(directory: Path, case_regex, strict: bool) -> None:
    """Report per fold the cases (bag splits: patients) found on both sides and the class balance."""
    from lymph_cv.stages import folds as folds_module

    reports = folds_module.check_directory(directory, case_regex)
    click.echo("\n\n".join(folds_module.format_check(report) for report in reports))
    if strict and any(report.leaks for report in reports):
        raise click.exceptions.Exit(1)


@click.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(defaults.BACKENDS), default=defaults.DEFAULT_BACKEND, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffle seed (recorded in dbs.json).")
@click.option("--no-shuffle", is_flag=True, help="Keep the list order (Caffe without -shuffle).")
@click.option("--fold", "folds", type=click.IntRange(min=1), multiple=True,
              help="Only this fold (repeatable; default: every fold with lists).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder the list names are relative to (default: folds.json's list_root, normally WORKDIR).")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Build straight from the source images in this folder (no patch files needed).")
@click.option("--overwrite", is_flag=True, help="Replace existing databases.")
@stain_options
@_SKIP_BAD
@_WORKERS
def dbs(workdir: Path, backend: str, seed: int, no_shuffle: bool, folds, root, images, overwrite: bool,
        stain, stain_target, stain_include_background, stain_params, skip_bad: bool, workers) -> None:
    """Step 3: DB_train_K, DB_test_K and DB_train_w32_K.binaryproto for every fold of WORKDIR."""
    from lymph_cv.stages import dbs as dbs_module

    method, record, params = resolve_stain(stain, stain_target, stain_include_background, stain_params)
    if method is not None and images is None:
        raise click.UsageError("--stain applies with --images (patch files keep the normalisation `patches --stain` gave them)")
    if images is not None and root is not None:
        raise click.UsageError("--root does not apply with --images (patches are cut from the images, no files are read)")
    results = dbs_module.build_dbs(workdir, folds=list(folds) or None, backend=backend,
                                   seed=None if no_shuffle else seed, root=root,
                                   images=images, overwrite=overwrite, workers=workers, skip_bad=skip_bad,
                                   stain=method, stain_params=params, stain_target=record)
    for result in sorted(results, key=lambda r: r.path):
        click.echo(f"{result.path}: {result.records} records")
