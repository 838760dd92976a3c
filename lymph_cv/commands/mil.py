"""``lymph-cv mil train | evaluate``: multiple-instance learning over the bag splits of a work directory
(``lymph-cv bags make`` / ``bags split`` write them)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from lymph_cv.commands.options import DEVICE, folds_option, pairs_option

#: The registered methods and fusions, written out so that loading this module imports no torch
#: (the library checks the names and lists the valid ones).
METHOD_HELP = "vote, mean, max, topk, learned or attention"
FUSION_CHOICES = ("concat", "sum", "late")


def _summary(pooled: dict) -> str:
    parts = []
    for key in ("balanced_accuracy", "accuracy", "auc"):
        entry = pooled.get(key) or {}
        if entry.get("mean") is not None:
            sd = "" if entry.get("sd") is None else f" ± {entry['sd']:.3f}"
            parts.append(f"{key} {entry['mean']:.3f}{sd}")
    return f"{len(pooled['folds'])} split(s): " + ", ".join(parts)


@click.group()
def mil() -> None:
    """Multiple-instance learning: `mil train WORKDIR` trains and evaluates each bag split, `mil evaluate WORKDIR` re-evaluates."""


@mil.command("train")
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--method", default="attention", show_default=True, help=f"MIL method: {METHOD_HELP}.")
@click.option("--arch", default="alexnet32w", show_default=True,
              help="Instance encoder from the architecture registry (alexnet32w, resnet18, ...).")
@click.option("--crop", type=click.IntRange(min=1), default=32, show_default=True,
              help="Centre crop of each instance, the encoder's input (the seed's 112 for resnet18).")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--bags-per-batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--grad-instances", type=click.IntRange(min=1), default=16, show_default=True,
              help="Instances per bag forwarded with gradients (a seeded random subset; the rest without).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--k-train", default="5", show_default=True, help="topk: k of the loss, a count (5), 25% or 25%,min=3.")
@click.option("--k-agg", default="5", show_default=True, help="topk: k of the decision (same syntax).")
@click.option("--attention-dim", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--fusion", type=click.Choice(FUSION_CHOICES), default=None,
              help="Use the bags' clinical attributes: concat (with the bag embedding), sum (of the logits), "
                   "late (a separate MLP, probabilities averaged).")
@click.option("--frozen", is_flag=True, help="Keep the trunk fixed (from --weights): train on cached features.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Initialise the encoder from this caffemodel (layers by name).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the initialisation, bag order, gradient subsets and flips (recorded in mil.json).")
@click.option("--folds", callback=folds_option, default=None, help="Splits to train, e.g. 1-5 or 1,3 (default: all).")
@click.option("--name", default=None, help="Output folder WORKDIR/mil/NAME (default: the method, +FUSION).")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--redo", is_flag=True, help="Retrain splits that are already done, and stopped ones from their start.")
def train(workdir: Path, method: str, arch: str, crop: int, epochs: int, bags_per_batch: int, grad_instances: int,
          lr: float, weight_decay: float, k_train: str, k_agg: str, attention_dim: int, fusion: Optional[str],
          frozen: bool, weights: Optional[Path], seed: int, folds, name: Optional[str], device: str, redo: bool) -> None:
    """Train a MIL model on every bag split of WORKDIR and evaluate it on the split's test bags."""
    from lymph_cv.core.devices import resolve_device
    from lymph_cv.stages.mil.folds import train_folds
    from lymph_cv.stages.mil.train import MILConfig

    config = MILConfig(method=method, arch=arch, crop=crop, epochs=epochs, bags_per_batch=bags_per_batch,
                       grad_instances=grad_instances, lr=lr, weight_decay=weight_decay, k_train=k_train, k_agg=k_agg,
                       attention_dim=attention_dim, fusion=fusion, frozen=frozen, seed=seed)

    def report(index: int, metrics: dict) -> None:
        click.echo(f"split {index}: balanced accuracy {metrics['balanced_accuracy']:.3f}, "
                   f"accuracy {metrics['accuracy']:.3f} ({metrics['bags']} bags)")

    pooled = train_folds(workdir, config, name=name, folds=folds, weights=weights,
                         device=str(resolve_device(device)), redo=redo, on_fold=report)
    click.echo(_summary(pooled))


@mil.command("evaluate")
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", default="attention", show_default=True, help="The models of WORKDIR/mil/NAME.")
@click.option("--folds", callback=folds_option, default=None, help="Splits to evaluate (default: every trained one).")
@click.option("--json", "as_json", is_flag=True, help="Print the pooled metrics as JSON.")
def evaluate(workdir: Path, name: str, folds, as_json: bool) -> None:
    """Evaluate the saved MIL models of WORKDIR/mil/NAME on their test bags again (patients.csv, figures, metrics)."""
    from lymph_cv.stages.mil.folds import evaluate_folds

    pooled = evaluate_folds(workdir, name, folds)
    import json

    click.echo(json.dumps(pooled, indent=2) if as_json else _summary(pooled))


#: ``run --mil``'s default classes of patient bags (stages/sources/patients.py BAG_CLASSES, spelled out
#: so that loading this module reads no stage).
PATIENT_CLASSES = ("reactive", "tumoral")
PATIENT_BAGS = "patient"
BAG_CHOICES = (PATIENT_BAGS, "image", "case", "slide")


def mil_run_options(command):
    """``run``'s MIL options: --mil, --bag, --clinical, --fusion, --mil-set."""
    options = [
        click.option("--mil", default=None, metavar="METHOD",
                     help=f"Multiple-instance learning over bags instead of the patch classifier: {METHOD_HELP}."),
        click.option("--bag", type=click.Choice(BAG_CHOICES), default=None,
                     help="--mil: patient (DATA/<patient>/*.png + clinical CSV, the default) or the tutorial "
                          "images' windows by image or case."),
        click.option("--clinical", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="--mil, patient bags: the clinical CSV (default: the one *.csv in DATA)."),
        click.option("--fusion", type=click.Choice(FUSION_CHOICES), default=None,
                     help="--mil: use the clinical attributes (concat, sum or late)."),
        click.option("--mil-set", "mil_set", multiple=True, callback=pairs_option, metavar="KEY=VALUE",
                     help="--mil: a MIL training setting (crop, epochs, grad_instances, k_train, lr, ...; see "
                          "`lymph-cv mil train --help`); repeatable."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def mil_run_fields(ctx: click.Context, mil: Optional[str], bag: Optional[str], clinical: Optional[Path],
                   fusion: Optional[str], mil_set: Optional[dict]) -> dict:
    """The RunOptions fields of ``run``'s MIL options (empty without --mil; a usage error for MIL options
    given without it)."""
    if mil is None:
        given = [name for name, value in (("--bag", bag), ("--clinical", clinical), ("--fusion", fusion),
                                          ("--mil-set", mil_set)) if value]
        if given:
            raise click.UsageError(f"{given[0]} needs --mil METHOD")
        return {}
    bag = bag or PATIENT_BAGS
    fields = {"mil": mil, "bag": bag, "clinical": clinical, "fusion": fusion, "mil_params": dict(mil_set or {}),
              "direct": True}  # image bags read their windows from the images: no patch files
    if bag == PATIENT_BAGS and ctx.get_parameter_source("classes") is click.core.ParameterSource.DEFAULT:
        fields["classes"] = PATIENT_CLASSES
    return fields


def mil_run_summary(pooled: Optional[dict]) -> Optional[str]:
    return None if pooled is None else "MIL " + _summary(pooled)
