"""``lymph-cv slides info | tissue``: whole-slide images read through OpenSlide."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from lymph_cv.formats.slides import format_info, slide_info
from lymph_cv.stages import tissue as tissue_module


@click.group("slides")
def slides() -> None:
    """Whole-slide images: `slides info SLIDE` describes one, `slides tissue SLIDE` finds its tissue."""


@slides.command("info")
@click.argument("slide", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(slide: str, as_json: bool) -> None:
    """Vendor, levels, dimensions, downsamples, microns per pixel and objective power of SLIDE."""
    description = slide_info(slide)
    if as_json:
        click.echo(json.dumps(description.to_dict(), indent=2))
    else:
        click.echo(format_info(description), nl=False)


@slides.command("tissue")
@click.argument("slide", type=click.Path(path_type=str))
@click.option("--mask", "mask_png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the tissue mask here as a PNG (tissue white).")
@click.option("--side", type=click.IntRange(min=1), default=tissue_module.DEFAULT_MASK_SIDE, show_default=True,
              help="Longer side in pixels of the low-resolution view tissue is detected on.")
@click.option("--tile-size", type=click.IntRange(min=1), default=None,
              help="Also report the tissue fraction of each tile of this many level-0 pixels.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tissue(slide: str, mask_png: Optional[Path], side: int, tile_size: Optional[int], as_json: bool) -> None:
    """Tissue share of SLIDE by Otsu on saturation (specks and small holes removed)."""
    found = tissue_module.detect_tissue(slide, max_side=side)
    if mask_png is not None:
        tissue_module.write_mask_png(mask_png, found.mask)
    result = {"slide": slide, "tissue_fraction": round(found.fraction, 6), "threshold": found.threshold,
              "mask_shape": list(found.mask.shape), "downsample": list(found.downsample)}
    if tile_size is not None:
        fractions = found.tile_fractions(tile_size)
        result["tile_size"] = tile_size
        result["tile_fractions"] = [[round(float(v), 4) for v in row] for row in fractions]
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{slide}: tissue {found.fraction:.1%} (saturation threshold {found.threshold:g})")
    if tile_size is not None:
        kept = int((fractions >= tissue_module.DEFAULT_MIN_TISSUE).sum())
        click.echo(f"tiles of {tile_size} px: {fractions.size} whole, {kept} with tissue fraction "
                   f">= {tissue_module.DEFAULT_MIN_TISSUE:g}")
