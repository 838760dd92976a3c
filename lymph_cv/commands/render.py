"""``lymph-cv render``: per-fold solver, train/test net and deploy net (tutorial step 4, configs)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click

from lymph_cv.commands.options import DEVICE, folds_option
from lymph_cv.commands.training_options import augmentation_options, augmentation_overrides
from lymph_cv.commands.stain import stain_augment_options, stain_augment_overrides
from lymph_cv.commands.defaults import ARCH_HELP, DEFAULT_ARCH, RENDER_VARIABLES, STEMS

_SET_HELP = f"Override a template variable, KEY=VALUE (repeatable). Keys: {', '.join(RENDER_VARIABLES)}."


@click.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--folds", callback=folds_option, default=None, help="Folds to render, e.g. 1-5 or 1,3 (default: all).")
@click.option("--arch", type=click.Choice([name for name, _description in ARCH_HELP]), default=DEFAULT_ARCH,
              show_default=True, help="Network: " + "; ".join(f"{name}: {text}" for name, text in ARCH_HELP) + ".")
@click.option("--stem", type=click.Choice(STEMS), default=None,
              help="ResNet stem (default: cifar 3x3 below 96 px patches, imagenet 7x7/2 + max-pool from 96).")
@click.option("--dropout", is_flag=True, help="The dropout variant (relu+dropout after ip1 and ip2).")
@click.option("--legacy-v1", is_flag=True, help="The tutorial's V1 syntax (layers {...}, solver_type).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="solver_mode: CPU for cpu, GPU for the others (cuda, cuda:N, auto).")
@augmentation_options
@stain_augment_options
def render(workdir: Path, folds, arch: str, stem: Optional[str], dropout: bool, legacy_v1: bool,
           settings: Sequence[str], device: str, mixup_alpha, label_smoothing, vertical_flip, rotate90,
           stain_augment, stain_augment_scale, stain_augment_shift) -> None:
    """Render WORKDIR/K/ solver, net and deploy prototxt for every fold.

    Modern training (lymph_cv's solver extensions, not trainable by real Caffe): --set
    lr_policy=onecycle, --set solver_type=AdamW and the augmentation options."""
    from lymph_cv.stages import render as render_module

    overrides = render_module.parse_overrides(settings)
    overrides.update(augmentation_overrides(mixup_alpha, label_smoothing, vertical_flip, rotate90))
    overrides.update(stain_augment_overrides(stain_augment, stain_augment_scale, stain_augment_shift))
    rendered = render_module.render_folds(workdir, folds, dropout=dropout, legacy_v1=legacy_v1,
                                          overrides=overrides, device=render_module.solver_device(device),
                                          arch=arch, stem=stem)
    for fold in rendered:
        click.echo(f"fold {fold.fold}: {fold.solver} {fold.net} {fold.deploy}")
