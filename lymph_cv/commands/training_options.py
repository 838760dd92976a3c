"""Command-line options of modern training shared by ``render``, ``train`` and ``run``."""
from __future__ import annotations

import click

#: the mixup α ``--mixup`` takes when given without a value (fastai's default).
DEFAULT_MIXUP_ALPHA = 0.4


def augmentation_options(command):
    """``--mixup [ALPHA]``, ``--label-smoothing``, ``--vertical-flip``, ``--rotate90`` (shared by
    render, train and run); unset options leave the solver's or the template's values."""
    options = [
        click.option("--mixup", "mixup_alpha", type=click.FloatRange(min=0), is_flag=False,
                     flag_value=DEFAULT_MIXUP_ALPHA, default=None, metavar="[ALPHA]",
                     help=f"Mixup with λ ~ Beta(ALPHA, ALPHA) per sample, max(λ, 1−λ) "
                          f"[ALPHA {DEFAULT_MIXUP_ALPHA} when not given; 0 = off]."),
        click.option("--label-smoothing", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
                     metavar="EPS", help="Spread EPS of each target over the classes."),
        click.option("--vertical-flip/--no-vertical-flip", default=None,
                     help="Flip training samples upside down at random (after Caffe's crop and mirror)."),
        click.option("--rotate90/--no-rotate90", default=None,
                     help="Turn training samples by 0, 90, 180 or 270 degrees at random."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def augmentation_overrides(mixup_alpha, label_smoothing, vertical_flip, rotate90) -> dict:
    """The given augmentation options as AugmentationParameter field values (unset ones left out)."""
    values = {"mixup_alpha": mixup_alpha, "label_smoothing": label_smoothing,
              "vertical_flip": vertical_flip, "rotate90": rotate90}
    return {key: value for key, value in values.items() if value is not None}
