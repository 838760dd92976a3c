"""``lymph-cv plot-log``: learning curves from Caffe-format training logs (Caffe's plot_training_log.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import click

from lymph_cv.commands.defaults import CHART_HELP
from lymph_cv.errors import ConfigError


def _charts(ctx, param, values: Sequence[str]):
    # the stage (log parser, plotting) loads once a command runs, not for --help
    from lymph_cv.stages.curves import chart

    try:
        return [chart(value) for value in values]
    except ConfigError as exc:
        raise click.BadParameter(exc.detail, ctx=ctx, param=param) from exc


@click.command("plot-log")
@click.argument("logs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG to write.")
@click.option("--chart", "charts", multiple=True, callback=_charts, metavar="N|NAME",
              help="Caffe's chart type, repeatable: " + ", ".join(f"{number}={name}" for number, name in CHART_HELP)
                   + " [default: an overview of loss, test accuracy and learning rate].")
@click.option("--x", "x_axis", type=click.Choice(["iterations", "seconds"]), default="iterations", show_default=True,
              help="The overview's x axis.")
def plot_log(logs: Sequence[Path], output: Path, charts, x_axis: str) -> None:
    """Plot train/test loss, test accuracy and learning rate of one or more `caffe train` logs
    (ours or Caffe's own), overlaid.  A work directory stands for its folds' K/train.log."""
    from lymph_cv.core.fsutil import atomic_write_bytes
    from lymph_cv.stages.curves import fold_logs, plot_charts, plot_overview, read_logs

    paths, labels = [], []
    for given in logs:
        if given.is_dir():
            found = fold_logs(given)
            if not found:
                raise click.BadParameter(f"{given}: expected a train.log file or a work directory with K/train.log",
                                         param_hint="LOGS")
            labels += [label for label, _ in found]
            paths += [path for _, path in found]
        else:
            labels.append(None)
            paths.append(given)
    parsed = read_logs(paths)
    parsed = [(label or default, data) for label, (default, data) in zip(labels, parsed)]
    png = plot_charts(parsed, charts) if charts else plot_overview(parsed, x_axis)
    atomic_write_bytes(output, png)
    click.echo(str(output))
