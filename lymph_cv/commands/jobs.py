"""``lymph-cv submit`` and ``lymph-cv jobs``: fold training jobs on PBS, Slurm or this machine."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import click

from lymph_cv.commands.options import WORKERS
# The same --folds syntax and checks as `lymph-cv render`.
from lymph_cv.commands.options import folds_option
from lymph_cv.errors import SchedulerError
# The options' choices and defaults are static copies (commands/defaults.py); the job engine
# (schedulers, subprocess, templates, the net renderer: jinja2, numpy, protobuf) is imported when a
# command runs.
from lymph_cv.commands.defaults import DEFAULT_GPUS, DEFAULT_PPN, DEFAULT_WALLTIME, SCHEDULERS, TILES_TASK

if TYPE_CHECKING:
    from lymph_cv.cluster import records, spec

_WORKDIR = click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
#: What ``submit --stage`` submits.
STAGES = ("train", TILES_TASK)


def _submit_tiles(out: Path, args: Sequence[str], scheduler: str, options: spec.JobOptions,
                  dry_run: bool) -> list:
    """``submit OUT --stage tiles -- DATA [slides tile options]``: one task per slide (``--slide N``)."""
    from lymph_cv.cluster import jobs as jobs_module
    from lymph_cv.commands.slides import tile as tile_command
    from lymph_cv.commands.slides import tile_params
    from lymph_cv.formats.slides import open_slide
    from lymph_cv.stages.sources.slides import scan_slides

    if not args or args[0].startswith("-"):
        raise click.UsageError("--stage tiles: give the slide set and the tiling options after --, "
                               "e.g. -- DATA --size 256 --mpp 0.5")
    if any(arg == "--slide" or arg.startswith("--slide=") for arg in args):
        raise click.UsageError("--stage tiles: --slide is set per array task; leave it out")
    # the tiling options are checked here, once, not in every task
    params = tile_command.make_context("tile", [args[0], str(out), *args[1:]]).params
    tile_params(params)
    data = Path(args[0]).resolve()
    slides = scan_slides(data, params["classes"])
    for source in slides:  # a file that is no slide stops the submission, not its array task hours later
        open_slide(source.path).close()
    rest = list(args[1:])
    if "--workers" not in rest:  # each task uses the cores it was given
        rest += ["--workers", str(options.ppn)]
    commands = [("slides", "tile", str(data), str(out.resolve()), *rest, "--slide", str(number))
                for number in range(1, len(slides) + 1)]
    return jobs_module.submit_tiles(out, scheduler, commands, options, dry_run=dry_run)


def _shown(submission: spec.Submission) -> str:
    """The command as a user would type it (submission runs from the script's folder)."""
    return f"cd {shlex.quote(str(submission.script.parent))} && {shlex.join(submission.command)}"


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("stage_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- DATA SLIDES-TILE-OPTIONS…]")
@click.option("--stage", type=click.Choice(STAGES), default=STAGES[0], show_default=True,
              help="train: the folds' training (WORKDIR the work directory); tiles: `slides tile` one slide per "
                   "array task (WORKDIR the tile folder, then -- DATA and the tiling options).")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), required=True,
              help="Torque/PBS (qsub), Slurm (sbatch) or a local worker pool.")
@click.option("--folds", callback=folds_option, default=None, help="Folds to submit, e.g. 1-5 or 1,3 (default: all).")
@click.option("--dry-run", is_flag=True, help="Write the job scripts and print the commands; submit nothing.")
@click.option("--walltime", default=DEFAULT_WALLTIME, show_default=True, help="[D-]HH:MM:SS per job.")
@click.option("--queue", default=None, help="PBS queue / Slurm partition.")
@click.option("--ppn", type=click.IntRange(min=1), default=DEFAULT_PPN, show_default=True,
              help="Cores per job (PBS ppn, Slurm cpus-per-task, OMP_NUM_THREADS).")
@click.option("--gpus", type=click.IntRange(min=0), default=DEFAULT_GPUS, show_default=True,
              help="GPUs per job (PBS gpus=N:exclusive_process, Slurm --gres=gpu:N).")
@click.option("--after", multiple=True, help="Start only after this job id succeeded (afterok); repeatable.")
@click.option("--mail", default=None, help="Mail address for begin/end/abort notices.")
@click.option("--array", is_flag=True, help="One array job for the folds (Slurm --array, PBS -t).")
@click.option("--resubmit", is_flag=True, help="Submit folds again even if jobs.json records them.")
@click.option("--workers", type=WORKERS, default=None,
              help="Local runner: jobs run at once (default or 0: cores // ppn).")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train each fold on this many nodes (Slurm --nodes, PBS nodes=N; ranks via srun/mpirun).")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=0, show_default=True,
              help="GPUs per node, one training process each (Slurm --gpus-per-task=1, PBS gpus=G).")
@click.option("--ntasks-per-node", "tasks_per_node", type=click.IntRange(min=1), default=None,
              help="Training processes per node (default: --gpus-per-node, else 1; CPU ranks use gloo).")
@click.option("--evaluate", "then_evaluate", is_flag=True,
              help="Also submit the evaluation (evaluate each fold, then report) to run after every fold succeeded.")
def submit(workdir: Path, stage_args: tuple, stage: str, scheduler: str, folds: Optional[Sequence[int]], dry_run: bool,
           walltime: str, queue: Optional[str], ppn: int, gpus: int, after: tuple, mail: Optional[str], array: bool,
           resubmit: bool, workers: Optional[int], nodes: int, gpus_per_node: int, tasks_per_node: Optional[int],
           then_evaluate: bool) -> None:
    """Write one job script per fold next to its configs and submit it; record jobs in WORKDIR/jobs.json."""
    from lymph_cv.cluster import jobs as jobs_module

    options = jobs_module.JobOptions(walltime=walltime, queue=queue, ppn=ppn, gpus=gpus, mail=mail,
                                     after=tuple(after), workers=workers or None, nodes=nodes,
                                     gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node)
    if stage == "tiles":
        _show(_submit_tiles(workdir, stage_args, scheduler, options, dry_run), dry_run, unit="slide")
        return
    if stage_args:
        raise click.UsageError(f"unexpected arguments {' '.join(stage_args)!r} (only --stage tiles takes DATA and options)")
    if not workdir.is_dir():
        raise click.BadParameter(f"Directory '{workdir}' does not exist.", param_hint="'WORKDIR'")
    submissions = jobs_module.submit_folds(workdir, scheduler, folds, options, dry_run=dry_run, resubmit=resubmit,
                                           array=array)
    if then_evaluate:
        evaluation_options = jobs_module.JobOptions(walltime=walltime, queue=queue, ppn=ppn, mail=mail,
                                                    workers=workers or None)
        if dry_run:
            click.echo("# the evaluation job depends (afterok) on the fold jobs, whose ids exist once submitted")
        submissions.append(jobs_module.submit_evaluation(workdir, scheduler, evaluation_options,
                                                         after=[] if dry_run else None, folds=folds,
                                                         dry_run=dry_run))
    _show(submissions, dry_run)


def _show(submissions: Sequence[spec.Submission], dry_run: bool, unit: str = "fold") -> None:
    for submission in submissions:
        what = f"{unit} {submission.fold}" if submission.fold is not None else "evaluate"
        if dry_run:
            click.echo(_shown(submission))
        elif submission.skipped:
            click.echo(f"{what}: already submitted as job {submission.job_id} (--resubmit to submit again)")
        else:
            click.echo(f"{what}: job {submission.job_id} ({submission.script})")


def format_states(states: Sequence[records.JobStatus]) -> str:
    """A table: task, fold, scheduler, job id, state (exit code), log path."""
    rows = [("TASK", "FOLD", "SCHEDULER", "JOB", "STATE", "LOG")]
    for status in states:
        state = status.state if status.exit_code in (None, 0) else f"{status.state}({status.exit_code})"
        rows.append((status.record.task, "-" if status.record.fold is None else str(status.record.fold),
                     status.record.scheduler, status.record.job_id, state, str(status.log)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


@click.command()
@_WORKDIR
@click.option("--all", "all_tasks", is_flag=True, help="Every recorded job, not only the fold training jobs.")
@click.option("--wait", is_flag=True, help="Wait until every job has finished; fail unless all completed.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Seconds to wait at most (--wait).")
def jobs(workdir: Path, all_tasks: bool, wait: bool, timeout: Optional[float]) -> None:
    """Show each recorded job's id, scheduler, state and log path."""
    from lymph_cv.cluster import jobs as jobs_module

    task = None if all_tasks else jobs_module.TRAIN_TASK
    if wait:
        jobs_module.wait_for_jobs(workdir, task=task, timeout=timeout)
    states = jobs_module.job_states(workdir, task=task)
    if not states:
        click.echo(f"no jobs recorded in {workdir / jobs_module.JOBS_FILE}")
        return
    click.echo(format_states(states))
    unfinished = [s for s in states if s.state != jobs_module.COMPLETED]
    if wait and unfinished:
        raise SchedulerError("not every job completed: " + ", ".join(
            f"{s.record.task} {s.record.fold or ''} {s.state}".replace("  ", " ") for s in unfinished))
