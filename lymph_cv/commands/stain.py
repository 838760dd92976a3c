"""``lymph-cv stain fit | apply``, and the ``--stain*`` options the image-reading stages share."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import click

#: The registered stain methods (``stages.stain.method_names()``), spelled out so that loading the
#: commands (``--help``) does not import the methods' modules, OpenCV and numpy
#: (tests/test_fast_paths.py holds them to the registry, as cli.SUMMARIES to the commands).
STAIN_METHODS = ("macenko", "none", "reinhard")
#: ``stain apply --montage``'s default (``stages.stain.apply.MONTAGE_IMAGES``, same test).
MONTAGE_IMAGES = 6


def _stages():
    """The stain stage package, imported when a command runs (it loads OpenCV and numpy)."""
    from lymph_cv.stages import stain as stain_module

    return stain_module


def _params(ctx, param, values: Sequence[str]) -> dict:
    """``--stain-param KEY=VALUE``: the value read as JSON (numbers, true/false), else as text."""
    import json

    params: dict[str, Any] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got {value!r}", ctx=ctx, param=param)
        try:
            params[key.strip()] = json.loads(text)
        except ValueError:
            params[key.strip()] = text.strip()
    return params


def method_params(method: str, include_background: bool, params: dict) -> dict:
    """The method's parameters from the shared options (``--stain-include-background`` is Reinhard's)."""
    params = dict(params)
    if include_background:
        if method != "reinhard":
            raise click.UsageError(f"--stain-include-background applies to reinhard, not {method}")
        params["include_background"] = True
    return params


_METHOD_HELP = f"Stain normalisation method: {', '.join(STAIN_METHODS)}."


def stain_options(function):
    """``--stain``, ``--stain-target``, ``--stain-include-background``, ``--stain-param`` on a command."""
    options = [
        click.option("--stain", "stain", default=None, metavar="METHOD", help=_METHOD_HELP + " [default: none]"),
        click.option("--stain-target", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="A target record (stain fit's JSON) or an image to fit the target on."),
        click.option("--stain-include-background", is_flag=True,
                     help="Reinhard: statistics over the whole image (the classic method), not tissue only."),
        click.option("--stain-param", "stain_params", multiple=True, callback=_params, metavar="KEY=VALUE",
                     help="A method parameter, e.g. io=255 for macenko (repeatable)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group()
def stain() -> None:
    """Stain normalisation: `stain fit` makes a target, `stain apply` normalises a folder."""


@stain.command("fit")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", default="macenko", show_default=True, help=_METHOD_HELP)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Target record (JSON).")
@click.option("--include-background", is_flag=True, help="Reinhard: statistics over the whole image.")
@click.option("--param", "params", multiple=True, callback=_params, metavar="KEY=VALUE", help="A method parameter (repeatable).")
def fit(images: Sequence[Path], method: str, out: Path, include_background: bool, params: dict) -> None:
    """Fit METHOD's target on IMAGE... (several: the medians of their statistics) into OUT."""
    stain_module = _stages()
    record = stain_module.fit_record(list(images), method, method_params(method, include_background, params))
    stain_module.write_record(out, record)
    click.echo(f"{out}: {method} target from {len(record.fitted_on)} image(s)"
               + (f", {len(record.unusable)} with too little tissue left out" if record.unusable else ""))


@stain.command("apply")
@click.argument("source", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--target", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="A target record (JSON from `stain fit`) or an image to fit on.")
@click.option("--method", default="macenko", show_default=True, help=_METHOD_HELP)
@click.option("--include-background", is_flag=True, help="Reinhard: statistics over the whole image.")
@click.option("--param", "params", multiple=True, callback=_params, metavar="KEY=VALUE", help="A method parameter (repeatable).")
@click.option("--montage", "montage_count", type=click.IntRange(min=0), default=MONTAGE_IMAGES, show_default=True,
              help="Images shown in OUT/montage.png (before above, after below; 0: none).")
def apply(source: Path, out: Path, target: Path, method: str, include_background: bool, params: dict,
          montage_count: int) -> None:
    """Normalise every image under SOURCE into OUT (same names), with stain.json and montage.png."""
    from lymph_cv.stages.stain import apply as apply_module

    record = _stages().resolve_target(target, method, method_params(method, include_background, params) or None)
    result = apply_module.apply_folder(source, out, record, montage=montage_count)
    click.echo(f"{len(result.written)} image(s) in {out}" + (f", {len(result.unchanged)} left unchanged (too little tissue)"
                                                          if result.unchanged else ""))


def resolve(method: Optional[str], target: Optional[Path], include_background: bool, params: dict):
    """The shared options → (method or None, StainRecord or None, parameters) for a stage (``none``: None)."""
    if method is None or method == "none":
        if target is not None or include_background or params:
            raise click.UsageError("--stain-target/--stain-include-background/--stain-param need --stain METHOD")
        return None, None, {}
    params = method_params(method, include_background, params)
    stain_module = _stages()
    stain_module.get_normaliser(method, **params)  # an unknown name or parameter: one line listing the valid ones
    record = None if target is None else stain_module.resolve_target(target, method, params or None)
    return method, record, params


def stain_for_evaluation(workdir: Path, fold: int, method: Optional[str], target: Optional[Path],
                         include_background: bool, params: dict):
    """``evaluate``'s stain: None (the recorded one, decided by the library, or none with ``--stain none``),
    or the record to use: ``--stain-target``, else the workdir's record checked against ``--stain``."""
    method, record, params = resolve(method, target, include_background, params)
    if method is None or record is not None:
        return record
    stain_module = _stages()
    recorded = stain_module.recorded_stain_path(workdir, fold)
    if recorded is None:
        raise click.UsageError(f"--stain {method}: {workdir} records no stain target for fold {fold} "
                               "(stain_K.json or subs/stain.json); give --stain-target")
    return stain_module.read_record(recorded, method)


def stain_augment_options(command):
    """``--stain-augment``, ``--stain-augment-scale``, ``--stain-augment-shift`` (render, train, run):
    HED jitter of the training samples, written to the solver's augmentation_param."""
    options = [
        click.option("--stain-augment/--no-stain-augment", "stain_augment", default=None,
                     help="HED stain jitter of training samples, per sample and stain (glass untouched)."),
        click.option("--stain-augment-scale", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
                     metavar="SIGMA", help="Stain jitter: scale ~ U(1 - SIGMA, 1 + SIGMA) [0.05]."),
        click.option("--stain-augment-shift", type=click.FloatRange(min=0), default=None, metavar="SIGMA",
                     help="Stain jitter: shift ~ U(-SIGMA, SIGMA) in OD units [0.05]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def stain_augment_overrides(stain_augment, scale, shift) -> dict:
    """The given stain-jitter options as augmentation_param values (unset ones left out)."""
    if stain_augment is None and (scale is not None or shift is not None):
        raise click.UsageError("--stain-augment-scale/--stain-augment-shift need --stain-augment")
    values = {"stain_jitter": stain_augment, "stain_scale_sigma": scale, "stain_shift_sigma": shift}
    return {key: value for key, value in values.items() if value is not None}
