"""Fold training jobs on Torque/PBS, Slurm or this machine, recorded in ``WORKDIR/jobs.json``.

Each fold gets a job script next to its rendered configs (``WORKDIR/K/K_train.pbs``,
``.slurm`` or ``.sh``) that ``cd``s to the fold's folder, runs ``<python> -m lymph_cv train``
on the fold's solver and, as its last step, writes its exit status to ``K/K_train.exit``.
That file makes a job's outcome readable without the scheduler's accounting, which
Torque forgets soon and Slurm keeps only with a database.

Submission commands run without a shell, from the job's folder, with fold-relative file
names: Debian's Torque ``qsub`` wrapper rebuilds its ``sbatch`` call as a shell string, so
only names we build ourselves (digits, ``_``, ``.``) ever reach it, and option values that
must reach it (queue, walltime, mail, job ids) are checked against strict patterns first.

The package: :mod:`.spec` (options, job specs), :mod:`.schedulers` (one class per scheduler, a
registry), :mod:`.records` (``jobs.json``, states), :mod:`.local` (the local runner); this module
builds the jobs of each kind and submits, queries and waits for them.  To add a kind of job (e.g. an
array job over slides): a function building its :class:`JobSpec` list (like :func:`train_spec`, the
index in ``fold``) and :func:`submit_specs`.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from lymph_cv.errors import ConfigError, SchedulerError
from lymph_cv.core.fsutil import atomic_write_text
from lymph_cv.core.resources import job_template_dir
from lymph_cv.workdir.layout import SOLVER_NAME
from lymph_cv.workdir.lists import require_folds
from lymph_cv.cluster import local
from lymph_cv.cluster.local import LOCAL_DIR  # noqa: F401 - the jobs API
from lymph_cv.cluster.records import (CANCELLED, COMPLETED, FAILED, FINISHED_STATES, JOBS_FILE, JOBS_VERSION,  # noqa: F401
                                      LOCK_FILE, PENDING, RUNNING, STOPPED_EXITS, UNKNOWN, JobRecord, JobStatus,
                                      exit_state, load_jobs, now, read_exit, record_jobs)
from lymph_cv.cluster.schedulers import (LOCAL_ARRAY, PBS_STATES, SCHEDULER_REGISTRY, SCHEDULERS,  # noqa: F401
                                         Scheduler, get_scheduler, register_scheduler)
from lymph_cv.cluster.spec import (DEFAULT_GPUS, DEFAULT_PPN, DEFAULT_WALLTIME, EVALUATE_TASK, TILES_TASK,  # noqa: F401
                                   TRAIN_TASK, JobOptions, JobSpec, Submission)

if TYPE_CHECKING:
    import jinja2

log = logging.getLogger(__name__)

SCRIPT_SUFFIX = {name: SCHEDULER_REGISTRY.lookup(name).suffix for name in SCHEDULERS}
SUBMIT_COMMAND = {name: SCHEDULER_REGISTRY.lookup(name).program for name in SCHEDULERS}
#: Seconds between scheduler polls while waiting for jobs.
POLL_S = 2.0
#: A failure inferred without an exit file (the scheduler does not list the job, or its query failed)
#: must be seen this many polls in a row: one failed qstat/squeue call under load is not a failed job.
CONFIRM_POLLS = 3


# -- fold selection and paths -------------------------------------------------------------
def solver_path(workdir: Path, fold: int) -> Path:
    """The fold's rendered solver, ``WORKDIR/K/K-alexnet_solver_ada.prototxt``."""
    return Path(workdir) / str(fold) / SOLVER_NAME.format(fold=fold)


def train_spec(workdir: Path, fold: int, scheduler: str) -> JobSpec:
    """The training job of one fold, named like the tutorial's (``K_TASK``)."""
    directory = Path(workdir).resolve() / str(fold)
    return JobSpec(
        task=TRAIN_TASK, fold=fold, directory=directory, name=f"{fold}_TASK",
        script=directory / f"{fold}_{TRAIN_TASK}{get_scheduler(scheduler).suffix}",
        output=directory / f"{fold}_TASK_output.out",
        exit_file=directory / f"{fold}_{TRAIN_TASK}.exit",
        commands=((TRAIN_TASK, "--solver", solver_path(workdir, fold).name, "--resume"),),
    )


def array_spec(workdir: Path, scheduler: str, task: str = TRAIN_TASK) -> JobSpec:
    """The array job running several jobs of ``task`` (its tasks are their own specs, e.g. :func:`train_spec`)."""
    directory = Path(workdir).resolve()
    return JobSpec(
        task=task, fold=None, directory=directory, name=f"{task.upper()}_TASK",
        script=directory / f"{task}_array{get_scheduler(scheduler).suffix}",
        output=directory / f"{task.upper()}_TASK_output.out", exit_file=directory / f"{task}_array.exit",
        commands=(),
    )


def array_range(folds: Sequence[int]) -> str:
    """Folds as an array index list, ``1-5`` or ``1,3-4`` (qsub -t / sbatch --array)."""
    parts: List[str] = []
    for fold in sorted(set(folds)):
        if parts and parts[-1].split("-")[-1] == str(fold - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{fold}"
        else:
            parts.append(str(fold))
    return ",".join(parts)


def array_task_id(array_id: str, fold: int) -> str:
    """One fold's id in an array job: Torque's ``123[K].server``, else Slurm's ``123_K``."""
    if "[]" in array_id:
        return array_id.replace("[]", f"[{fold}]", 1)
    return f"{array_id}_{fold}"


def evaluate_spec(workdir: Path, scheduler: str, folds: Optional[Sequence[int]] = None,
                  args: Sequence[str] = ()) -> JobSpec:
    """The evaluation job: ``lymph-cv evaluate WORKDIR -k K ARGS…`` per fold, then ``lymph-cv report``."""
    directory = Path(workdir).resolve()
    folds = list(folds) if folds else require_folds(directory)
    evaluations = tuple((EVALUATE_TASK, str(directory), "-k", str(fold), *args) for fold in folds)
    return JobSpec(
        task=EVALUATE_TASK, fold=None, directory=directory, name="EVAL_TASK",
        script=directory / f"{EVALUATE_TASK}{get_scheduler(scheduler).suffix}",
        output=directory / "EVAL_TASK_output.out",
        exit_file=directory / f"{EVALUATE_TASK}.exit",
        commands=evaluations + (("report", str(directory)),),
    )


# -- scripts ------------------------------------------------------------------------------
def _environment() -> jinja2.Environment:
    # jinja2 and the net renderer load when a script is written, not to list the jobs' states
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(job_template_dir())),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["qjoin"] = lambda values: shlex.join(str(v) for v in values)
    return env


def render_script(spec: JobSpec, scheduler: str, options: JobOptions,
                  tasks: Optional[Sequence[JobSpec]] = None, python: str = sys.executable) -> str:
    """The job script for ``spec`` on ``scheduler`` (every path shell-quoted).

    With ``tasks`` (per-fold specs) it is an array job whose index picks the fold.
    """
    kind = get_scheduler(scheduler)
    template = _environment().get_template(f"{scheduler}.j2")
    context = [{"fold": t.fold, "directory": t.directory, "exit_name": os.path.relpath(t.exit_file, t.directory),
                "output_name": os.path.relpath(t.output, t.directory),
                "commands": [[python, "-m", "lymph_cv", *argv,
                              *(kind.train_arguments(options) if argv[0] == TRAIN_TASK else [])]
                             for argv in t.commands]} for t in (tasks or [spec])]
    return template.render(
        name=spec.name, task=spec.task, tasks=context, output_name=os.path.relpath(spec.output, spec.directory),
        array=array_range([t.fold for t in tasks]) if tasks else None, walltime=options.walltime,
        queue=options.queue, ppn=options.ppn, gpus=options.gpus, mail=options.mail,
        nodes=options.nodes, ranks=options.ranks, ranks_per_node=options.ranks_per_node,
        gpus_per_node=options.gpus_per_node, launch=kind.launch(options),
    )


def submit_command(spec: JobSpec, scheduler: str, options: JobOptions, array: Optional[str] = None) -> List[str]:
    """The argv that submits ``spec``'s script (an array job over ``array`` when given), run from
    ``spec.directory`` (see each :class:`Scheduler`'s ``submit_command``)."""
    return get_scheduler(scheduler).submit_command(spec, options, array)


def parse_job_id(scheduler: str, stdout: str) -> str:
    """The job id printed by ``sbatch --parsable`` or ``qsub`` (last non-empty line)."""
    return get_scheduler(scheduler).parse_job_id(stdout)


# -- submission ---------------------------------------------------------------------------
def _submit_spec(workdir: Path, spec: JobSpec, scheduler: str, options: JobOptions, dry_run: bool,
                 tasks: Optional[Sequence[JobSpec]] = None) -> List[Submission]:
    """Write ``spec``'s script, submit it (an array job over ``tasks`` when given) and record it."""
    kind = get_scheduler(scheduler)
    atomic_write_text(spec.script, render_script(spec, scheduler, options, tasks))
    spec.script.chmod(0o755)
    command = kind.submit_command(spec, options, array_range([t.fold for t in tasks]) if tasks else None)
    if dry_run:
        return [Submission(spec.fold, spec.script, command, None)]
    members = list(tasks) if tasks else [spec]
    for member in members:
        # A stale exit file from an earlier run would make the new job look finished.
        member.exit_file.unlink(missing_ok=True)
    job_id = kind.submit(workdir, spec, options, command)
    base = Path(workdir).resolve()
    records = [JobRecord(
        task=member.task, fold=member.fold, scheduler=scheduler,
        job_id=array_task_id(job_id, member.fold) if tasks else job_id,
        script=os.path.relpath(spec.script, base), output=os.path.relpath(member.output, base),
        exit_file=os.path.relpath(member.exit_file, base), command=command, submitted=now(),
        after=list(options.after), array_id=job_id if tasks else None,
    ) for member in members]
    record_jobs(workdir, records)
    for record in records:
        log.info("%s %s: submitted as %s job %s", record.task, record.fold or "", scheduler, record.job_id)
    return [Submission(record.fold, spec.script, command, record.job_id) for record in records]


def submit_specs(workdir: Path, scheduler: str, specs: Sequence[JobSpec], options: JobOptions,
                 dry_run: bool = False, array: Optional[JobSpec] = None) -> List[Submission]:
    """Submit jobs of one kind: each spec as its own job, or all as the tasks of the array job ``array``
    (its index is each spec's ``fold``)."""
    if array is not None and specs:
        return _submit_spec(workdir, array, scheduler, options, dry_run, specs)
    submissions: List[Submission] = []
    for spec in specs:
        submissions += _submit_spec(workdir, spec, scheduler, options, dry_run)
    return submissions


def _ensure_configs(workdir: Path, folds: Sequence[int]) -> None:
    """Render the folds whose solver is missing, then check every fold has one."""
    missing = [fold for fold in folds if not solver_path(workdir, fold).is_file()]
    if missing:
        from lymph_cv.stages import render

        log.info("rendering configs of folds %s", ", ".join(map(str, missing)))
        render.render_folds(workdir, folds=missing)
    for fold in folds:
        if not solver_path(workdir, fold).is_file():
            raise ConfigError(f"fold {fold}: solver missing (run `lymph-cv render`)", solver_path(workdir, fold))


def submit_folds(workdir: Path, scheduler: str, folds: Optional[Sequence[int]] = None,
                 options: JobOptions = JobOptions(), dry_run: bool = False,
                 resubmit: bool = False, array: bool = False) -> List[Submission]:
    """Write and submit one training job per fold; record each in ``jobs.json`` as it goes.

    Folds already recorded are skipped unless ``resubmit``; ``dry_run`` writes the scripts
    and returns the commands without submitting or recording anything; ``array`` submits
    the folds as the tasks of one array job (Slurm ``--array``, Torque ``-t``).
    """
    workdir = Path(workdir)
    get_scheduler(scheduler)
    options.validate()
    if not workdir.is_dir():
        raise ConfigError("work directory not found", workdir)
    folds = list(folds) if folds else require_folds(workdir)
    _ensure_configs(workdir, folds)
    done = {r.fold: r for r in load_jobs(workdir) if r.task == TRAIN_TASK}
    if array and scheduler == "local":
        raise ConfigError(LOCAL_ARRAY)
    if scheduler == "local" and options.nodes > 1:
        raise ConfigError(f"--nodes {options.nodes}: the local runner has one node", valid=("pbs", "slurm"))
    submissions, todo = [], []
    for fold in folds:
        if fold in done and not resubmit and not dry_run:
            previous = done[fold]
            log.info("fold %d: already submitted as %s job %s (use --resubmit)", fold,
                     previous.scheduler, previous.job_id)
            submissions.append(Submission(fold, workdir / previous.script, previous.command,
                                          previous.job_id, skipped=True))
        else:
            todo.append(train_spec(workdir, fold, scheduler))
    submissions += submit_specs(workdir, scheduler, todo, options, dry_run,
                                array_spec(workdir, scheduler) if array else None)
    return sorted(submissions, key=lambda s: s.fold or 0)


def training_job_ids(workdir: Path, scheduler: Optional[str] = None) -> List[str]:
    """Job ids of the recorded training jobs (of one scheduler when given)."""
    ids = [r.array_id or r.job_id for r in load_jobs(workdir)
           if r.task == TRAIN_TASK and (scheduler is None or r.scheduler == scheduler)]
    return list(dict.fromkeys(ids))


def submit_evaluation(workdir: Path, scheduler: str, options: JobOptions = JobOptions(),
                      after: Optional[Sequence[str]] = None, folds: Optional[Sequence[int]] = None,
                      args: Sequence[str] = (), dry_run: bool = False) -> Submission:
    """Submit the evaluation of every fold (``lymph-cv evaluate … ARGS``, then ``report``) as one job.

    It runs once the training jobs succeeded: ``after`` defaults to the recorded training
    jobs of ``scheduler`` that have not finished yet (``afterok``; a scheduler may refuse a
    dependency on a job it has forgotten).  A training job that ended unsuccessfully is an
    error: resubmit its fold first.
    """
    get_scheduler(scheduler)
    if after is None:
        statuses = [s for s in job_states(workdir) if s.record.scheduler == scheduler]
        failed = [s for s in statuses if s.state in FINISHED_STATES and s.state != COMPLETED]
        if failed:
            raise SchedulerError("training did not succeed for " + ", ".join(
                f"fold {s.record.fold} ({s.state})" for s in failed) + ": resubmit with --resubmit --folds …")
        after = list(dict.fromkeys(s.record.array_id or s.record.job_id
                                   for s in statuses if s.state not in FINISHED_STATES))
    options = JobOptions(**{**asdict(options), "after": tuple(after)}).validate()
    spec = evaluate_spec(workdir, scheduler, folds, args)
    return _submit_spec(Path(workdir), spec, scheduler, options, dry_run)[0]


def submit_lymph_cv(workdir: Path, task: str, argv: Sequence[str], scheduler: str,
                    options: JobOptions = JobOptions(), dry_run: bool = False) -> Submission:
    """Submit any ``lymph-cv ARGV…`` as a job named ``task`` run in the work directory."""
    kind = get_scheduler(scheduler)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", task) or task == TRAIN_TASK:
        raise ConfigError(f"job task {task!r}: expected a plain name other than {TRAIN_TASK!r}")
    directory = Path(workdir).resolve()
    spec = JobSpec(task=task, fold=None, directory=directory, name=f"{task.upper()}_TASK",
                   script=directory / f"{task}{kind.suffix}",
                   output=directory / f"{task.upper()}_TASK_output.out",
                   exit_file=directory / f"{task}.exit", commands=(tuple(argv),))
    return _submit_spec(Path(workdir), spec, scheduler, options.validate(), dry_run)[0]


def tile_specs(out_dir: Path, scheduler: str, commands: Sequence[Sequence[str]]) -> List[JobSpec]:
    """One job per slide of a tiling (``submit --stage tiles``): task N runs ``commands[N-1]``
    (``slides tile DATA OUT … --slide N``) in the tile folder."""
    directory = Path(out_dir).resolve()
    suffix = get_scheduler(scheduler).suffix
    return [JobSpec(task=TILES_TASK, fold=number, directory=directory, name=f"{number}_TILES",
                    script=directory / f"{TILES_TASK}_{number}{suffix}",
                    output=directory / f"{TILES_TASK}_{number}.out",
                    exit_file=directory / f"{TILES_TASK}_{number}.exit", commands=(tuple(argv),))
            for number, argv in enumerate(commands, 1)]


def submit_tiles(out_dir: Path, scheduler: str, commands: Sequence[Sequence[str]],
                 options: JobOptions = JobOptions(), dry_run: bool = False) -> List[Submission]:
    """Tile a slide set as jobs, one slide each: an array job on PBS or Slurm (its index is the
    slide number), single jobs on the local runner.  Each task tiles its slide and the last one to
    finish writes the tile manifest (:func:`lymph_cv.stages.tiling.tile_slides`); the jobs are
    recorded in ``OUT/jobs.json`` with the slide number as their fold."""
    get_scheduler(scheduler)
    if not commands:
        raise ConfigError("no slides to tile")
    directory = Path(out_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    options = options.validate()
    specs = tile_specs(directory, scheduler, commands)
    array = None if scheduler == "local" else array_spec(directory, scheduler, TILES_TASK)
    return submit_specs(directory, scheduler, specs, options, dry_run, array)


# -- states -------------------------------------------------------------------------------
def job_status(workdir: Path, record: JobRecord) -> JobStatus:
    """The current state of one recorded job.

    The job's exit file decides first (written by the script as its last step); then the
    scheduler (squeue/scontrol, qstat, the local state file); a job the scheduler no longer
    lists and that wrote no exit file ended before finishing its script: ``FAILED``.
    """
    workdir = Path(workdir)
    output = workdir / record.output
    exit_code = read_exit(workdir / record.exit_file)
    if exit_code is not None:
        return JobStatus(record, exit_state(exit_code), exit_code, output)
    state = get_scheduler(record.scheduler).state(record, workdir)
    if state is None or state == COMPLETED:
        # Finished without writing its exit file: killed, out of time, or the script failed early.
        state = FAILED
    return JobStatus(record, state, None, output)


def job_states(workdir: Path, task: Optional[str] = TRAIN_TASK) -> List[JobStatus]:
    """States of the recorded jobs of ``task`` (all tasks when ``None``), folds in order."""
    records = [r for r in load_jobs(workdir) if task is None or r.task == task]
    records.sort(key=lambda r: (r.task != TRAIN_TASK, r.task, r.fold or 0))
    return [job_status(workdir, record) for record in records]


def wait_for_jobs(workdir: Path, task: Optional[str] = TRAIN_TASK, timeout: Optional[float] = None,
                  poll: float = POLL_S) -> Dict:
    """Poll until every recorded job of ``task`` has finished; return the final states.

    Keys are folds for one task (``None`` for a job without a fold), ``(task, fold)`` pairs
    when ``task`` is ``None``.  Raises :class:`SchedulerError` when ``timeout`` seconds
    pass first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    inferred_failures: Dict = {}
    while True:
        statuses = job_states(workdir, task)
        if not statuses:
            raise SchedulerError(f"no {task or ''} jobs recorded (run `lymph-cv submit`)".replace("  ", " "),
                                 Path(workdir) / JOBS_FILE)
        waiting = []
        for s in statuses:
            key = (s.record.task, s.record.fold, s.record.job_id)
            if s.state == FAILED and s.exit_code is None:
                inferred_failures[key] = inferred_failures.get(key, 0) + 1
                if inferred_failures[key] < CONFIRM_POLLS:
                    waiting.append(s)
                    continue
            else:
                inferred_failures.pop(key, None)
            if s.state not in FINISHED_STATES:
                waiting.append(s)
        if not waiting:
            return {(s.record.fold if task else (s.record.task, s.record.fold)): s.state for s in statuses}
        if deadline is not None and time.monotonic() >= deadline:
            pending = ", ".join(f"{s.record.task} {s.record.fold or ''}: {s.state}".replace(" :", ":")
                                for s in waiting)
            raise SchedulerError(f"timed out after {timeout:.0f}s waiting for jobs ({pending})")
        time.sleep(poll)


if __name__ == "__main__":  # the local runner's entry point before it had its own module
    sys.exit(local.main(sys.argv[1:]))
