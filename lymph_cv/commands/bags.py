"""``lymph-cv bags make | split``: the bag set of a MIL run (bags.json) and its patient-level splits."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from lymph_cv.commands import defaults
from lymph_cv.commands.options import classes_option
from lymph_cv.core.options import parse_pairs
from lymph_cv.errors import ConfigError
from lymph_cv.workdir.layout import MANIFEST_NAME, TILE_SET


def _columns(ctx: click.Context, param: click.Parameter, value):
    """``--columns id=PID,dob=AGE,gender=`` → {key: name} (ClinicalColumns checks the keys)."""
    return parse_pairs([part for part in (value or "").split(",") if part.strip()], "--columns")


def _date(ctx: click.Context, param: click.Parameter, value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected a date YYYY-MM-DD, got {value!r}") from None


def _rotations(ctx: click.Context, param: click.Parameter, value: str) -> tuple:
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected angles like 0 or 0,90, got {value!r}") from None


@click.group()
def bags() -> None:
    """MIL bags: `bags make SOURCE WORKDIR` writes bags.json; `bags split WORKDIR` the patient-level splits."""


@bags.command("make")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--bag", type=click.Choice(defaults.BAG_KINDS), default=None,
              help="patient: SOURCE is DATA/<patient>/*.jpg|png|tif + a clinical CSV (the default for a data "
                   "folder); image, case or slide: SOURCE is a patch manifest or tiling folder (default image).")
@click.option("--clinical", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The clinical CSV (default: the one *.csv in SOURCE).")
@click.option("--columns", callback=_columns, default="",
              help="CSV column names as key=NAME pairs (keys id, label, gender, dob, count; NAME empty drops "
                   "it; default ID,LABEL,GENDER,DOB,LYMPH_COUNT).")
@click.option("--impute", type=click.Choice(defaults.IMPUTE_CHOICES), default="none", show_default=True,
              help="median: fill missing or malformed clinical values with the training bags' median (recorded).")
@click.option("--reference-date", callback=_date, default=defaults.REFERENCE_DATE, show_default=True,
              help="Ages are computed from dates of birth at this date.")
@click.option("--classes", default=",".join(defaults.BAG_CLASSES), show_default=True, callback=classes_option,
              help="patient bags: class names in label order (LABEL holds a name or its index).")
@click.option("--case-regex", default=None, help="image/case bags: case id from an image stem (default '<case>_NNN').")
@click.option("--rotations", callback=_rotations, default="0", show_default=True,
              help="image/case bags: which of the patch step's rotations are instances (0 or 0,90).")
@click.pass_context
def make(ctx: click.Context, source: Path, workdir: Path, bag, clinical, columns, impute: str, reference_date,
         classes, case_regex, rotations) -> None:
    """Write WORKDIR/bags.json from a patient folder (+ clinical CSV) or a patch manifest / tiling folder."""
    from lymph_cv.stages import bags as bags_module
    from lymph_cv.stages.sources.patients import ClinicalColumns

    from_patches = source.is_file() or (source / MANIFEST_NAME).is_file() or (source / TILE_SET).is_file()
    bag = bag or ("image" if from_patches else "patient")
    patient_only = ("clinical", "columns", "impute", "reference_date", "classes")
    patch_only = ("case_regex", "rotations")
    given = [name for name in (patient_only if bag != "patient" else patch_only)
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} does not apply with --bag {bag}")
    if bag == "patient":
        if from_patches:
            raise ConfigError("--bag patient: SOURCE must be a folder of patient folders, not a patch manifest", source)
        bag_set = bags_module.load_bags(source, clinical=clinical, classes=classes,
                                        columns=ClinicalColumns.parse(columns, "--columns"),
                                        reference_date=reference_date, impute=impute)
    else:
        bag_set = bags_module.bags_from_patches(source, bag, rotations=rotations,
                                                **({} if case_regex is None else {"case_regex": case_regex}))
    from lymph_cv.core.fsutil import make_dirs

    make_dirs(workdir)
    path = bags_module.write_bags(workdir, bag_set)
    instances = sum(len(b.instances) for b in bag_set.bags)
    click.echo(f"{len(bag_set.bags)} {bag_set.kind} bags, {instances} instances in {path}")


@bags.command("split")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(defaults.SPLIT_METHODS), default="kfold", show_default=True,
              help="kfold: stratified k-fold by patient; random: repeated stratified 50/50 splits; folds: the "
                   "patch folds' parent lists in WORKDIR (image, case and slide bags).")
@click.option("--k", type=click.IntRange(min=2), default=defaults.DEFAULT_K, show_default=True, help="kfold: folds.")
@click.option("--repeats", type=click.IntRange(min=1), default=defaults.DEFAULT_REPEATS, show_default=True,
              help="random: splits, split r seeded by seed + r.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--group-by", type=click.Choice(defaults.SPLIT_GROUPS), default="patient", show_default=True,
              help="patient: no patient on both sides; bag: each bag on its own (the tutorial's images).")
@click.option("--bags", "bags_path", type=click.Path(path_type=Path), default=None,
              help="The bags.json to split (default: WORKDIR/bags.json).")
@click.pass_context
def split(ctx: click.Context, workdir: Path, method: str, k: int, repeats: int, seed: int, group_by: str,
          bags_path) -> None:
    """Write bags_train_K.txt / bags_test_K.txt and bag_folds.json to WORKDIR."""
    from lymph_cv.stages import bag_folds
    from lymph_cv.stages import bags as bags_module

    others = {"kfold": ("repeats",), "random": ("k",), "folds": ("k", "repeats", "seed", "group_by")}[method]
    given = [name for name in others if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} does not apply with --method {method}")
    bag_set = bags_module.read_bags(bags_path or workdir)
    if method == "folds":
        splits = bag_folds.splits_from_folds(bag_set, workdir, workdir)
    else:
        splits = bag_folds.split_bags(bag_set, workdir, method=method, k=k, repeats=repeats, seed=seed,
                                      group_by=group_by)
    click.echo(bag_folds.describe_splits(splits))
