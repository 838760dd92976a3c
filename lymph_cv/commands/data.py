"""``lymph-cv synth | patches | folds | dbs``: the data steps (tutorial steps 1–3)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from lymph_cv import synth as synth_module

_WORKERS = click.option("--workers", type=click.IntRange(min=0), default=None, help="Processes (default: all cores).")


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


def _classes(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise click.BadParameter(f"expected at least two distinct comma-separated class names, got {value!r}")
    return names


_CLASSES = click.option(
    "--classes",
    default=",".join(synth_module.DEFAULT_CLASSES),
    show_default=True,
    callback=_classes,
    help="Class folders in label order (label = position).",
)


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", callback=_counts, default=None, help="Images per class: N, or N1,N2,N3 (default: the published 113,139,122).")
@click.option("--cases-per-class", type=click.IntRange(min=1), default=synth_module.REAL_CASES_PER_CLASS, show_default=True)
@click.option("--width", type=click.IntRange(min=1), default=synth_module.REAL_WIDTH, show_default=True)
@click.option("--height", type=click.IntRange(min=1), default=synth_module.REAL_HEIGHT, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_CLASSES
@_WORKERS
def synth(out: Path, per_class, cases_per_class: int, width: int, height: int, seed: int, classes: list[str], workers) -> None:
    """Write a synthetic CLL/FL/MCL data set in the real layout to OUT."""
    paths = synth_module.generate(
        out, per_class=per_class, cases_per_class=cases_per_class, width=width, height=height,
        seed=seed, classes=classes, workers=workers,
    )
    click.echo(f"{len(paths)} images in {out}")


_SKIP_BAD = click.option("--skip-bad", is_flag=True, help="Warn about and skip bad inputs instead of stopping.")


@click.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@_CLASSES
@click.option("--patch-size", type=click.IntRange(min=1), default=36, show_default=True)
@click.option("--step", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--mat", "write_mat", is_flag=True, help="Also write Matlab's class_struct.mat.")
@_SKIP_BAD
@_WORKERS
def patches(data: Path, out: Path, classes: list[str], patch_size: int, step: int, write_mat: bool, skip_bad: bool, workers) -> None:
    """Step 1: rotated patches of every image of DATA/<class>/ into OUT (with manifest.json)."""
    from lymph_cv import patches as patches_module

    manifest = patches_module.extract_patches(
        data, out, classes=classes, patch_size=patch_size, step=step,
        workers=workers, write_mat=write_mat, skip_bad=skip_bad,
    )
    click.echo(f"{len(manifest.images)} images, {manifest.total_patches} patches in {out}")
