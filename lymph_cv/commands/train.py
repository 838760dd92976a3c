"""``lymph-cv train``: train one fold's solver like ``caffe train``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from lymph_cv.core.threads import configure_openmp, usable_cores

configure_openmp(keep_memory=False)  # before lymph_cv.stages.train imports torch; the CLI keeps memory

from lymph_cv.commands.training_options import augmentation_options, augmentation_overrides  # noqa: E402
from lymph_cv.commands.stain import stain_augment_options, stain_augment_overrides  # noqa: E402
from lymph_cv.commands.options import DEVICE  # noqa: E402
from lymph_cv.errors import Interrupted, signal_name  # noqa: E402

#: --procs at most this many processes per core of this machine: more ranks than cores is fine for
#: trying a multi-process run on a small machine, thousands only fork until memory runs out.
PROCS_PER_CORE = 4


def stopped_error(result, solver: Path) -> Interrupted:
    """A training stopped by a signal after its snapshot: exit 128 + signal, never success."""
    signum = result.stop_signal or 2
    return Interrupted(f"stopped by {signal_name(signum)} at iteration {result.iterations} of "
                       f"{result.max_iter} after its snapshot; continue with `lymph-cv train --solver {solver} --resume`",
                       signum=signum)


def _memory(ctx, param, value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    from lymph_cv.net.stream import parse_memory

    try:
        return parse_memory(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command()
@click.option("--solver", "solver", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Solver prototxt, e.g. WORKDIR/1/1-alexnet_solver_ada.prototxt.")
@click.option("--snapshot", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Resume from this .solverstate.")
@click.option("--resume", is_flag=True,
              help="Resume from the solver's newest <prefix>_iter_N.solverstate if there is one (else start).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Fine-tune from this .caffemodel (layers copied by name).")
@click.option("--device", type=DEVICE, default=None,
              help="Where to train; default: the solver's solver_mode as a hint (GPU → auto).")
@click.option("--seed", type=int, default=None,
              help="Seed for initialisation, crops, mirrors and dropout (default: the solver's random_seed).")
@click.option("--max-iter", type=click.IntRange(min=1), default=None, help="Override the solver's max_iter.")
@augmentation_options
@stain_augment_options
@click.option("--max-memory", callback=_memory, default=None,
              help="Memory a decoded database may take, e.g. 2G; larger ones are streamed "
                   "(default: 80% of the memory available).")
@click.option("--gpu", "gpu", default=None, metavar="IDS",
              help="Caffe's -gpu: train on these CUDA devices (0,1 or all), one process each.")
@click.option("--procs", type=click.IntRange(min=1), default=None,
              help="Train on this many processes of this machine (with --device cpu: gloo).")
@click.option("--sync-bn", is_flag=True,
              help="BatchNorm statistics over all processes' batches (default: per process, as Caffe).")
def train(solver: Path, snapshot: Optional[Path], resume: bool, weights: Optional[Path], device: Optional[str],
          seed: Optional[int], max_iter: Optional[int], mixup_alpha, label_smoothing, vertical_flip,
          rotate90, stain_augment, stain_augment_scale, stain_augment_shift, max_memory: Optional[int],
          gpu: Optional[str], procs: Optional[int], sync_bn: bool) -> None:
    """Train SOLVER's net; snapshots and train.log go to the solver's base directory.

    The augmentation options override the solver's augmentation_param (recorded in train.json);
    a resumed run needs the same ones to continue exactly.  Under torchrun, srun or mpirun every
    process is one rank of the run (from the environment); --gpu/--procs start the ranks themselves.
    """
    from lymph_cv.core.distributed import discover, parse_gpus
    from lymph_cv.stages.train import latest_solverstate
    from lymph_cv.stages.train import train as run_training

    if gpu is not None and device == "cpu":
        raise click.BadParameter("--gpu trains on CUDA devices; drop --device cpu", param_hint="--gpu")
    if gpu is not None and procs is not None:
        raise click.BadParameter("give --gpu (one process per device) or --procs, not both", param_hint="--procs")
    cores = usable_cores()
    if procs is not None and procs > PROCS_PER_CORE * cores:
        raise click.BadParameter(f"{procs} processes on {cores} core(s): at most {PROCS_PER_CORE * cores} "
                                 f"({PROCS_PER_CORE} per core)", param_hint="--procs")
    ids = parse_gpus(gpu) if gpu is not None else None
    world = discover()
    if not world.distributed:
        count = len(ids) if ids is not None else (procs or 1)
        if count > 1:
            from lymph_cv.cluster.launch import launch_local, lymph_cv_command

            sys.exit(launch_local(lymph_cv_command(["train", *_command_line(click.get_current_context())]),
                                  count))
    if ids is not None:
        if world.local_rank >= len(ids):
            raise click.BadParameter(f"rank {world.local_rank} has no device in {gpu!r}", param_hint="--gpu")
        device = f"cuda:{ids[world.local_rank]}"

    if snapshot is not None and weights is not None:
        raise click.BadParameter("give --snapshot or --weights, not both", param_hint="--snapshot/--weights")
    if resume and (snapshot is not None or weights is not None):
        raise click.BadParameter("--resume finds the snapshot itself; drop --snapshot/--weights", param_hint="--resume")
    if resume:
        snapshot = latest_solverstate(solver, max_iter)
        if snapshot is not None:
            click.echo(f"resuming from {snapshot}", err=True)
    result = run_training(solver, snapshot=snapshot, weights=[weights] if weights else (), device=device,
                          seed=seed, max_iter=max_iter, max_memory=max_memory,
                          augmentation={**augmentation_overrides(mixup_alpha, label_smoothing, vertical_flip, rotate90),
                                        **stain_augment_overrides(stain_augment, stain_augment_scale,
                                                                  stain_augment_shift)},
                          sync_bn=sync_bn)
    state = "stopped early at" if result.stopped_early else "finished at"
    click.echo(f"{state} iteration {result.iterations} (seed {result.seed}, {result.device})")
    for name, value in result.test_scores.items():
        click.echo(f"test {name} = {value:g}")
    if result.snapshots:
        click.echo(f"last snapshot: {result.snapshots[-1]}")
    if result.log_path is not None:
        click.echo(f"log: {result.log_path}")
    if result.stopped_early:
        raise stopped_error(result, solver)


def _command_line(ctx: click.Context) -> list:
    """The options of this invocation as a command line (each rank runs the same command)."""
    argv = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or value is None:
            continue
        if param.is_flag and param.secondary_opts and isinstance(value, bool):
            argv.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag and isinstance(value, bool):
            if value:
                argv.append(param.opts[0])
        else:
            argv += [param.opts[0], str(value)]
    return argv
