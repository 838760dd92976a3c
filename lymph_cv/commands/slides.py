"""``lymph-cv slides info | tissue | tile``: whole-slide images read through OpenSlide."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from lymph_cv import DEFAULT_CLASSES
from lymph_cv.commands import defaults
from lymph_cv.commands.options import DEVICE, WORKERS, classes_option
from lymph_cv.commands.stain import resolve as resolve_stain
from lymph_cv.commands.stain import stain_options


@click.group("slides")
def slides() -> None:
    """Whole-slide images: `slides info SLIDE`, `slides tissue SLIDE`, `slides tile DATA OUT` (tissue tiles),
    `slides evaluate WORKDIR -k K` (fold K's test slides labelled by their tiles)."""


@slides.command("info")
@click.argument("slide", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(slide: str, as_json: bool) -> None:
    """Vendor, levels, dimensions, downsamples, microns per pixel and objective power of SLIDE."""
    from lymph_cv.formats.slides import format_info, slide_info

    description = slide_info(slide)
    if as_json:
        import json

        click.echo(json.dumps(description.to_dict(), indent=2))
    else:
        click.echo(format_info(description), nl=False)


_TISSUE_METHOD = click.option("--tissue-method", type=click.Choice(defaults.TISSUE_METHODS),
                              default=defaults.DEFAULT_TISSUE_METHOD, show_default=True,
                              help="What Otsu thresholds: HSV saturation, or od (optical density summed over RGB).")


@slides.command("tissue")
@click.argument("slide", type=click.Path(path_type=str))
@click.option("--mask", "mask_png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the tissue mask here as a PNG (tissue white).")
@click.option("--side", type=click.IntRange(min=1), default=defaults.DEFAULT_MASK_SIDE, show_default=True,
              help="Longer side in pixels of the low-resolution view tissue is detected on.")
@click.option("--tile-size", type=click.IntRange(min=1), default=None,
              help="Also report the tissue fraction of each tile of this many level-0 pixels.")
@_TISSUE_METHOD
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tissue(slide: str, mask_png: Optional[Path], side: int, tile_size: Optional[int], tissue_method: str,
           as_json: bool) -> None:
    """Tissue share of SLIDE by Otsu on saturation (specks and small holes removed)."""
    from lymph_cv.stages import tissue as tissue_module

    found = tissue_module.detect_tissue(slide, max_side=side, method=tissue_method)
    if mask_png is not None:
        tissue_module.write_mask_png(mask_png, found.mask)
    result = {"slide": slide, "tissue_fraction": round(found.fraction, 6), "threshold": found.threshold,
              "mask_shape": list(found.mask.shape), "downsample": list(found.downsample)}
    if tile_size is not None:
        fractions = found.tile_fractions(tile_size)
        result["tile_size"] = tile_size
        result["tile_fractions"] = [[round(float(v), 4) for v in row] for row in fractions]
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{slide}: tissue {found.fraction:.1%} (saturation threshold {found.threshold:g})")
    if tile_size is not None:
        kept = int((fractions >= tissue_module.DEFAULT_MIN_TISSUE).sum())
        click.echo(f"tiles of {tile_size} px: {fractions.size} whole, {kept} with tissue fraction "
                   f">= {tissue_module.DEFAULT_MIN_TISSUE:g}")


def tile_params(options: dict):
    """The :class:`~lymph_cv.stages.tiles.TileParams` of ``slides tile``'s parsed options (checked)."""
    from lymph_cv.stages.tiles import TileParams

    return TileParams(options["size"], options["mpp"], options["level"], options["stride"], options["min_tissue"],
                      options["resize"], options["mask_side"], options["tissue_method"])


@slides.command("tile")
@click.argument("data", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", type=click.IntRange(min=1), required=True, help="Tile side in pixels at --mpp (or --level).")
@click.option("--mpp", type=float, default=None,
              help="Microns per pixel of the tiles (read from the best pyramid level, resampled).")
@click.option("--level", type=click.IntRange(min=0), default=None, help="Read tiles at this pyramid level as is (instead of --mpp).")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Origin step in tile pixels [default: --size].")
@click.option("--min-tissue", type=click.FloatRange(0.0, 1.0), default=defaults.DEFAULT_MIN_TISSUE, show_default=True,
              help="Keep a tile when at least this share of it is tissue.")
@click.option("--resize", type=click.IntRange(min=1), default=None, help="Write tiles of this side [default: --size].")
@click.option("--mask-side", type=click.IntRange(min=1), default=defaults.DEFAULT_MASK_SIDE, show_default=True,
              help="Longer side of the low-resolution view tissue is detected on.")
@click.option("--db", "db_backend", type=click.Choice(defaults.BACKENDS), default=None,
              help="Write each slide's tiles to a database OUT/<slide>_<backend> instead of tile files.")
@click.option("--slide", "only", type=click.IntRange(min=1), multiple=True,
              help="Tile only slide N (1-based, manifest order; repeatable): one array task's share.")
@click.option("--classes", default=",".join(DEFAULT_CLASSES), show_default=True, callback=classes_option,
              help="Class folders (or CSV labels) in label order.")
@_TISSUE_METHOD
@click.option("--no-qc", is_flag=True, help="Skip the mask and tile-grid PNGs in OUT/qc/.")
@click.option("--manifest-only", is_flag=True,
              help="Plan the tiles and write the manifests only, no tile files (`dbs --images` cuts them from the slides).")
@stain_options
@click.option("--workers", type=WORKERS, default=None, help="Processes (default or 0: all cores).")
def tile(data: Path, out: Path, size: int, mpp: Optional[float], level: Optional[int], stride: Optional[int],
         min_tissue: float, resize: Optional[int], mask_side: int, db_backend: Optional[str], only, classes,
         tissue_method: str, no_qc: bool, manifest_only: bool, stain, stain_target, stain_include_background, stain_params,
         workers) -> None:
    """Tissue tiles of every slide of DATA (DATA/<class>/<slide>, or a slide,label[,case] CSV) into OUT."""
    from lymph_cv.stages import tiling

    params = tile_params(click.get_current_context().params)
    method, record, _ = resolve_stain(stain, stain_target, stain_include_background, stain_params)
    if method is not None and record is None:
        raise click.UsageError("slides tile --stain needs --stain-target (a record or an image to fit on)")
    result = tiling.tile_slides(data, out, params, classes=classes, workers=workers, db_backend=db_backend,
                                stain=record, only=list(only), qc=not no_qc, write_tiles=not manifest_only)
    if result is None:
        click.echo(f"{out}: some slides are still to be tiled (other tasks, or run again without --slide)")
        return
    click.echo(f"{len(result.slides)} slides, {len(result.tiles)} tiles in {out}"
               + (f" ({db_backend} databases)" if db_backend else ""))


@slides.command("evaluate")
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fold", "-k", type=click.IntRange(min=1), required=True, help="Fold K to evaluate.")
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path),
              help="Trained .caffemodel [default: the highest WORKDIR/K/*_iter_N.caffemodel].")
@click.option("--deploy", type=click.Path(dir_okay=False, path_type=Path),
              help="Deploy net [default: WORKDIR/K/deploy_train32.prototxt].")
@click.option("--mean", type=click.Path(dir_okay=False, path_type=Path),
              help="Mean .binaryproto [default: WORKDIR/DB_train_w32_K.binaryproto].")
@click.option("--parent-list", type=click.Path(dir_okay=False, path_type=Path),
              help="Test slides, CLASS/slide.ext per line [default: WORKDIR/test_w32_parent_K.txt].")
@click.option("--tiles", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the tile manifest (tiles.json) [default: the one the folds were made from, else WORKDIR/subs].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder [default: WORKDIR/eval/fold_K].")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="torch device.")
@click.option("--threshold", type=click.FloatRange(0, 1),
              help="Two classes: a slide is the second class when its tile fraction reaches this [default: argmax].")
@click.option("--oversample/--no-oversample", default=False, show_default=True,
              help="10 crops per tile (corners, centre, mirrored) or the centre crop only.")
@click.option("--mean-mode", type=click.Choice(("resize", "crop")), default="resize", show_default=True,
              help="resize: the mean resized to the net input; crop: training's mean at each crop's offset.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Crops per forward call [default: by device].")
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True,
              help="Write each slide's tile-probability heatmap and CAM (eval/fold_K/heatmaps/).")
@click.option("--cam/--no-cam", default=True, show_default=True,
              help="Class activation maps (nets with global average pooling before the classifier, e.g. the ResNets; "
                   "none with --no-heatmaps).")
def evaluate(workdir: Path, fold: int, model, deploy, mean, parent_list, tiles, out, device, threshold, oversample,
             mean_mode, batch_size, heatmaps, cam) -> None:
    """Slide-level evaluation of fold K: every tissue tile of every test slide scored; a slide's
    score per class is the fraction of its tiles predicted that class (beside the mean probability);
    writes WORKDIR/eval/fold_K (metrics.json, slides.csv, images.csv, confusion.png, heatmaps/)."""
    from lymph_cv.core.fsutil import check_writable
    from lymph_cv.stages.evaluate import fold_output_dir
    from lymph_cv.stages.report import format_fold
    from lymph_cv.stages.slide_eval import evaluate_slide_fold, write_slide_fold

    out_dir = out or fold_output_dir(workdir, fold)
    check_writable(out_dir.parent)
    result = evaluate_slide_fold(workdir, fold, model=model, deploy=deploy, mean=mean, parent_list=parent_list,
                                 tiles=tiles, device=device, mean_mode=mean_mode, oversample=oversample,
                                 batch_size=batch_size, threshold=threshold,
                                 cams=cam and heatmaps)  # no heatmaps: no CAMs to draw, none computed
    record = write_slide_fold(result, out_dir, heatmaps=heatmaps)
    click.echo(format_fold(record), nl=False)
    tiles_record = record["tiles"]
    click.echo(f"tile level: {tiles_record['tiles']} tiles, accuracy {tiles_record['accuracy']:.3f}, "
               f"balanced accuracy {tiles_record['balanced_accuracy']:.3f}")
