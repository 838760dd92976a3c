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
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import jinja2

from lymph_cv.stages import render
from lymph_cv.errors import SIGNAL_EXIT_BASE, ConfigError, SchedulerError
from lymph_cv.core.fsutil import atomic_write_json, atomic_write_text, pid_alive
from lymph_cv.core.resources import job_template_dir
from lymph_cv.workdir.layout import JOBS_JSON
from lymph_cv.workdir.lists import require_folds
from lymph_cv.workdir.records import JOBS, RecordError, read_cache, read_record

log = logging.getLogger(__name__)

SCHEDULERS = ("pbs", "slurm", "local")
JOBS_FILE = JOBS_JSON
JOBS_VERSION = 1
TRAIN_TASK = "train"
EVALUATE_TASK = "evaluate"
#: Whole-slide tiling (``submit --stage tiles``): one task per slide.
TILES_TASK = "tiles"
#: The tutorial's Torque request (BASE-qsub.pbs): 320 hours, one core, one exclusive GPU.
DEFAULT_WALLTIME = "320:00:00"
DEFAULT_PPN = 1
DEFAULT_GPUS = 0
SCRIPT_SUFFIX = {"pbs": ".pbs", "slurm": ".slurm", "local": ".sh"}
SUBMIT_COMMAND = {"pbs": "qsub", "slurm": "sbatch", "local": "bash"}
#: Seconds between scheduler polls while waiting for jobs.
POLL_S = 2.0
#: A failure inferred without an exit file (the scheduler does not list the job, or its query failed)
#: must be seen this many polls in a row: one failed qstat/squeue call under load is not a failed job.
CONFIRM_POLLS = 3
#: Longest scheduler message kept in an error line.
MESSAGE_CHARS = 400
#: Hidden folder of the local runner: one state file per job, one lock file per worker slot.
LOCAL_DIR = ".local_jobs"
LOCK_FILE = ".jobs.lock"

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, UNKNOWN = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "UNKNOWN")
#: Exit statuses of a command stopped by SIGINT/SIGTERM (after saving its work): the job was cancelled.
STOPPED_EXITS = frozenset({SIGNAL_EXIT_BASE + signal.SIGINT, SIGNAL_EXIT_BASE + signal.SIGTERM})
#: Scheduler states after which a job never runs again.
FINISHED_STATES = frozenset({COMPLETED, FAILED, CANCELLED, "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "BOOT_FAIL", "DEADLINE", "PREEMPTED"})
#: Torque's one-letter ``job_state`` → our names (``C`` is resolved with the exit file).
PBS_STATES = {"Q": PENDING, "H": PENDING, "W": PENDING, "T": PENDING, "R": RUNNING, "E": RUNNING,
              "S": "SUSPENDED", "C": COMPLETED}

# Values that reach Debian's qsub wrapper unquoted (it builds a shell string): keep them plain.
# Always used with fullmatch (a "$" anchor would let a trailing newline through).
_WALLTIME_RE = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")
_QUEUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*")
_MAIL_RE = re.compile(r"[A-Za-z0-9_.+-]+@[A-Za-z0-9.-]+(,[A-Za-z0-9_.+-]+@[A-Za-z0-9.-]+)*")
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\[\]-]*")
_LOCAL_ARRAY = "--array needs a cluster scheduler (pbs or slurm); the local runner pools single jobs"
_SBATCH_ID_RE = re.compile(r"(\d+)(;\S+)?")
_QSUB_ID_RE = re.compile(r"\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?")


@dataclass(frozen=True)
class JobOptions:
    """Resources and chaining for the submitted jobs (the tutorial's Torque request by default)."""

    walltime: str = DEFAULT_WALLTIME
    queue: Optional[str] = None
    ppn: int = DEFAULT_PPN
    gpus: int = DEFAULT_GPUS
    mail: Optional[str] = None
    after: tuple = ()
    #: Local runner only: jobs run at once (default: cores // ppn).
    workers: Optional[int] = None
    #: One training on several processes: nodes, GPUs per node (one rank each), or ranks per node.
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def ranks(self) -> int:
        """Processes training one fold (Caffe's solver_count)."""
        return self.nodes * self.ranks_per_node

    def validate(self) -> "JobOptions":
        """Raise :class:`ConfigError` naming the option whose value is not plain enough."""
        checks = [("--walltime", self.walltime, _WALLTIME_RE, "[D-]HH[:MM[:SS]]"),
                  ("--queue", self.queue, _QUEUE_RE, "letters, digits, _ . @ -"),
                  ("--mail", self.mail, _MAIL_RE, "user@host[,user@host]")]
        checks += [("--after", job, _JOB_ID_RE, "a job id") for job in self.after]
        for option, value, pattern, expected in checks:
            if value is not None and not pattern.fullmatch(value):
                raise ConfigError(f"{option} {value!r}: expected {expected}")
        if self.ppn < 1 or self.gpus < 0 or (self.workers is not None and self.workers < 1):
            raise ConfigError(f"--ppn {self.ppn}, --gpus {self.gpus}, --workers {self.workers}: "
                              "expected ppn >= 1, gpus >= 0, workers >= 1")
        if self.nodes < 1 or self.gpus_per_node < 0 or (self.tasks_per_node is not None and self.tasks_per_node < 1):
            raise ConfigError(f"--nodes {self.nodes}, --gpus-per-node {self.gpus_per_node}, --ntasks-per-node "
                              f"{self.tasks_per_node}: expected nodes >= 1, gpus-per-node >= 0, ntasks-per-node >= 1")
        if self.gpus_per_node and self.gpus:
            raise ConfigError("--gpus-per-node: give it or --gpus (GPUs of a one-process job), not both")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ConfigError(f"--ntasks-per-node {self.tasks_per_node}: with --gpus-per-node "
                              f"{self.gpus_per_node} every rank has one GPU, so they must be equal")
        return self

    def launch(self, scheduler: str) -> str:
        """The shell words that start a multi-process training on ``scheduler`` ('' for one process)."""
        if self.ranks == 1:
            return ""
        if scheduler == "slurm":
            return "srun --kill-on-bad-exit=1 "
        if scheduler == "pbs":
            return (f"mpirun -np {self.ranks} --hostfile \"$PBS_NODEFILE\" --map-by ppr:{self.ranks_per_node}:node "
                    "-x MASTER_ADDR ")
        return ""

    def train_arguments(self, scheduler: str) -> List[str]:
        """What a multi-process training adds to ``lymph-cv train``'s arguments."""
        if self.ranks == 1:
            return []
        device = ["--device", "cuda" if self.gpus_per_node else "cpu"]
        # the local runner has no launcher: `lymph-cv train --procs` starts the ranks itself
        return device + (["--procs", str(self.ranks)] if scheduler == "local" else [])



@dataclass(frozen=True)
class JobSpec:
    """One job: what it runs (``lymph-cv`` argument lists, in order), where, and which files it writes."""

    task: str
    fold: Optional[int]
    directory: Path
    name: str
    script: Path
    output: Path
    exit_file: Path
    commands: tuple


@dataclass
class JobRecord:
    """One submitted job as stored in ``jobs.json`` (paths relative to the work directory)."""

    task: str
    fold: Optional[int]
    scheduler: str
    job_id: str
    script: str
    output: str
    exit_file: str
    command: List[str]
    submitted: str
    after: List[str] = field(default_factory=list)
    #: The array job this fold is a task of (``--array``), else ``None``.
    array_id: Optional[str] = None


@dataclass
class JobStatus:
    """A recorded job with its current state (``PENDING``, ``RUNNING``, ``COMPLETED``, …)."""

    record: JobRecord
    state: str
    exit_code: Optional[int]
    log: Path


@dataclass
class Submission:
    """What :func:`submit_folds` did for one fold."""

    fold: Optional[int]
    script: Path
    command: List[str]
    job_id: Optional[str]
    skipped: bool = False


# -- fold selection and paths -------------------------------------------------------------
def solver_path(workdir: Path, fold: int) -> Path:
    """The fold's rendered solver, ``WORKDIR/K/K-alexnet_solver_ada.prototxt``."""
    return Path(workdir) / str(fold) / render.SOLVER_NAME.format(fold=fold)


def train_spec(workdir: Path, fold: int, scheduler: str) -> JobSpec:
    """The training job of one fold, named like the tutorial's (``K_TASK``)."""
    directory = Path(workdir).resolve() / str(fold)
    return JobSpec(
        task=TRAIN_TASK, fold=fold, directory=directory, name=f"{fold}_TASK",
        script=directory / f"{fold}_{TRAIN_TASK}{SCRIPT_SUFFIX[scheduler]}",
        output=directory / f"{fold}_TASK_output.out",
        exit_file=directory / f"{fold}_{TRAIN_TASK}.exit",
        commands=((TRAIN_TASK, "--solver", solver_path(workdir, fold).name, "--resume"),),
    )


def array_spec(workdir: Path, scheduler: str) -> JobSpec:
    """The array job training several folds (its tasks are the folds' :func:`train_spec`)."""
    directory = Path(workdir).resolve()
    return JobSpec(
        task=TRAIN_TASK, fold=None, directory=directory, name="TRAIN_TASK",
        script=directory / f"{TRAIN_TASK}_array{SCRIPT_SUFFIX[scheduler]}",
        output=directory / "TRAIN_TASK_output.out", exit_file=directory / f"{TRAIN_TASK}_array.exit",
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
        script=directory / f"{EVALUATE_TASK}{SCRIPT_SUFFIX[scheduler]}",
        output=directory / "EVAL_TASK_output.out",
        exit_file=directory / f"{EVALUATE_TASK}.exit",
        commands=evaluations + (("report", str(directory)),),
    )


# -- scripts ------------------------------------------------------------------------------
def _environment() -> jinja2.Environment:
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
    template = _environment().get_template(f"{scheduler}.j2")
    context = [{"fold": t.fold, "directory": t.directory, "exit_name": os.path.relpath(t.exit_file, t.directory),
                "output_name": os.path.relpath(t.output, t.directory),
                "commands": [[python, "-m", "lymph_cv", *argv,
                              *(options.train_arguments(scheduler) if argv[0] == TRAIN_TASK else [])]
                             for argv in t.commands]} for t in (tasks or [spec])]
    return template.render(
        name=spec.name, task=spec.task, tasks=context, output_name=os.path.relpath(spec.output, spec.directory),
        array=array_range([t.fold for t in tasks]) if tasks else None, walltime=options.walltime,
        queue=options.queue, ppn=options.ppn, gpus=options.gpus, mail=options.mail,
        nodes=options.nodes, ranks=options.ranks, ranks_per_node=options.ranks_per_node,
        gpus_per_node=options.gpus_per_node, launch=options.launch(scheduler),
    )


def _slurm_path(path: Path) -> str:
    # sbatch expands %j, %a, … in file names; "%%" is a literal "%".
    return str(path).replace("%", "%%")


def submit_command(spec: JobSpec, scheduler: str, options: JobOptions, array: Optional[str] = None) -> List[str]:
    """The argv that submits ``spec``'s script (an array job over ``array`` when given).

    It runs from ``spec.directory``.  qsub gets the key directives on its command line too
    (wrappers ignore some ``#PBS`` lines), with relative file names; sbatch gets absolute ones.
    """
    after = list(options.after)
    if scheduler == "pbs":
        resources = f"walltime={options.walltime},nodes={options.nodes}:ppn={options.ppn * options.ranks_per_node}"
        gpus = options.gpus_per_node or options.gpus
        if gpus:
            resources += f":gpus={gpus}:exclusive_process"
        argv = ["qsub", "-N", spec.name, "-o", os.path.relpath(spec.output, spec.directory), "-j", "oe",
                "-l", resources]
        if options.queue:
            argv += ["-q", options.queue]
        if options.mail:
            argv += ["-M", options.mail, "-m", "bea"]
        if after:
            argv += ["-W", "depend=afterok:" + ":".join(after)]
        if array:
            argv += ["-t", array]
        return argv + [spec.script.name]
    if scheduler == "slurm":
        argv = ["sbatch", "--parsable", f"--job-name={spec.name}", f"--time={options.walltime}",
                f"--cpus-per-task={options.ppn}", f"--chdir={spec.directory}",
                f"--output={_slurm_path(spec.output)}"]
        if options.ranks > 1:
            argv += [f"--nodes={options.nodes}", f"--ntasks-per-node={options.ranks_per_node}"]
        if options.gpus_per_node:
            argv.append("--gpus-per-task=1")
        elif options.gpus:
            argv.append(f"--gres=gpu:{options.gpus}")
        if options.queue:
            argv.append(f"--partition={options.queue}")
        if options.mail:
            argv += [f"--mail-user={options.mail}", "--mail-type=BEGIN,END,FAIL"]
        if after:
            argv.append("--dependency=afterok:" + ":".join(after))
        if array:
            argv.append(f"--array={array}")
        return argv + [str(spec.script)]
    if scheduler == "local" and not array:
        return ["bash", str(spec.script)]
    if scheduler == "local":
        raise ConfigError(_LOCAL_ARRAY)
    raise ConfigError(f"unknown scheduler {scheduler!r}", valid=SCHEDULERS)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS] + "…"


def _require(command: str) -> None:
    if shutil.which(command) is None:
        raise SchedulerError(f"{command}: command not found on PATH (is this a {command} submit host?)")


def _run_scheduler(argv: Sequence[str], cwd: Path) -> str:
    """Run a scheduler command; its stdout, or :class:`SchedulerError` with its message."""
    _require(argv[0])
    try:
        result = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, check=False)
    except OSError as exc:
        raise SchedulerError(f"{argv[0]}: {exc.strerror}") from exc
    if result.returncode != 0:
        message = _one_line(result.stderr) or _one_line(result.stdout) or "no message"
        raise SchedulerError(f"{argv[0]} failed (exit {result.returncode}): {message}")
    return result.stdout


def parse_job_id(scheduler: str, stdout: str) -> str:
    """The job id printed by ``sbatch --parsable`` or ``qsub`` (last non-empty line)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if scheduler == "slurm":
        match = _SBATCH_ID_RE.fullmatch(last)
        if match:
            return match.group(1)
    elif _QSUB_ID_RE.fullmatch(last):
        return last
    raise SchedulerError(f"{SUBMIT_COMMAND[scheduler]} printed no job id: {_one_line(stdout) or '(nothing)'!r}")


# -- jobs.json ----------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(workdir: Path) -> Iterator[None]:
    """Serialise read-modify-write of ``jobs.json`` between concurrent submissions."""
    with open(Path(workdir) / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_jobs(workdir: Path) -> List[JobRecord]:
    """The recorded jobs (empty when nothing was submitted)."""
    path = Path(workdir) / JOBS_FILE
    data = read_record(path, JOBS)
    if data is None:
        return []
    try:
        return [JobRecord(**entry) for entry in data["jobs"]]
    except (KeyError, TypeError) as exc:
        raise RecordError(f"{JOBS.refusal} ({exc})", path) from exc


def _save_jobs(workdir: Path, records: List[JobRecord]) -> None:
    atomic_write_json(Path(workdir) / JOBS_FILE,
                      {"version": JOBS_VERSION, "jobs": [asdict(record) for record in records]})


def _record(workdir: Path, new: Sequence[JobRecord]) -> None:
    """Add ``new`` records to ``jobs.json``, replacing older jobs of the same task and fold."""
    keys = {(record.task, record.fold) for record in new}
    with _locked(workdir):
        records = [r for r in load_jobs(workdir) if (r.task, r.fold) not in keys]
        _save_jobs(workdir, records + list(new))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- submission ---------------------------------------------------------------------------
def _submit_spec(workdir: Path, spec: JobSpec, scheduler: str, options: JobOptions, dry_run: bool,
                 tasks: Optional[Sequence[JobSpec]] = None) -> List[Submission]:
    """Write ``spec``'s script, submit it (an array job over ``tasks`` when given) and record it."""
    atomic_write_text(spec.script, render_script(spec, scheduler, options, tasks))
    spec.script.chmod(0o755)
    command = submit_command(spec, scheduler, options, array_range([t.fold for t in tasks]) if tasks else None)
    if dry_run:
        return [Submission(spec.fold, spec.script, command, None)]
    members = list(tasks) if tasks else [spec]
    for member in members:
        # A stale exit file from an earlier run would make the new job look finished.
        member.exit_file.unlink(missing_ok=True)
    if scheduler == "local":
        job_id = _local_submit(workdir, spec, options)
    else:
        job_id = parse_job_id(scheduler, _run_scheduler(command, cwd=spec.directory))
    base = Path(workdir).resolve()
    records = [JobRecord(
        task=member.task, fold=member.fold, scheduler=scheduler,
        job_id=array_task_id(job_id, member.fold) if tasks else job_id,
        script=os.path.relpath(spec.script, base), output=os.path.relpath(member.output, base),
        exit_file=os.path.relpath(member.exit_file, base), command=command, submitted=_now(),
        after=list(options.after), array_id=job_id if tasks else None,
    ) for member in members]
    _record(workdir, records)
    for record in records:
        log.info("%s %s: submitted as %s job %s", record.task, record.fold or "", scheduler, record.job_id)
    return [Submission(record.fold, spec.script, command, record.job_id) for record in records]


def _check_scheduler(scheduler: str) -> None:
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}", valid=SCHEDULERS)


def _ensure_configs(workdir: Path, folds: Sequence[int]) -> None:
    """Render the folds whose solver is missing, then check every fold has one."""
    missing = [fold for fold in folds if not solver_path(workdir, fold).is_file()]
    if missing:
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
    _check_scheduler(scheduler)
    options.validate()
    if not workdir.is_dir():
        raise ConfigError("work directory not found", workdir)
    folds = list(folds) if folds else require_folds(workdir)
    _ensure_configs(workdir, folds)
    done = {r.fold: r for r in load_jobs(workdir) if r.task == TRAIN_TASK}
    if array and scheduler == "local":
        raise ConfigError(_LOCAL_ARRAY)
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
    if array and todo:
        submissions += _submit_spec(workdir, array_spec(workdir, scheduler), scheduler, options, dry_run, todo)
    else:
        for spec in todo:
            submissions += _submit_spec(workdir, spec, scheduler, options, dry_run)
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
    _check_scheduler(scheduler)
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
    _check_scheduler(scheduler)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", task) or task == TRAIN_TASK:
        raise ConfigError(f"job task {task!r}: expected a plain name other than {TRAIN_TASK!r}")
    directory = Path(workdir).resolve()
    spec = JobSpec(task=task, fold=None, directory=directory, name=f"{task.upper()}_TASK",
                   script=directory / f"{task}{SCRIPT_SUFFIX[scheduler]}",
                   output=directory / f"{task.upper()}_TASK_output.out",
                   exit_file=directory / f"{task}.exit", commands=(tuple(argv),))
    return _submit_spec(Path(workdir), spec, scheduler, options.validate(), dry_run)[0]


def tile_specs(out_dir: Path, scheduler: str, commands: Sequence[Sequence[str]]) -> List[JobSpec]:
    """One job per slide of a tiling (``submit --stage tiles``): task N runs ``commands[N-1]``
    (``slides tile DATA OUT … --slide N``) in the tile folder."""
    directory = Path(out_dir).resolve()
    return [JobSpec(task=TILES_TASK, fold=number, directory=directory, name=f"{number}_TILES",
                    script=directory / f"{TILES_TASK}_{number}{SCRIPT_SUFFIX[scheduler]}",
                    output=directory / f"{TILES_TASK}_{number}.out",
                    exit_file=directory / f"{TILES_TASK}_{number}.exit", commands=(tuple(argv),))
            for number, argv in enumerate(commands, 1)]


def submit_tiles(out_dir: Path, scheduler: str, commands: Sequence[Sequence[str]],
                 options: JobOptions = JobOptions(), dry_run: bool = False) -> List[Submission]:
    """Tile a slide set as jobs, one slide each: an array job on PBS or Slurm (its index is the
    slide number), single jobs on the local runner.  Each task tiles its slide and the last one to
    finish writes the tile manifest (:func:`lymph_cv.stages.tiling.tile_slides`); the jobs are
    recorded in ``OUT/jobs.json`` with the slide number as their fold."""
    _check_scheduler(scheduler)
    if not commands:
        raise ConfigError("no slides to tile")
    directory = Path(out_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    options = options.validate()
    specs = tile_specs(directory, scheduler, commands)
    if scheduler == "local":
        return [done for spec in specs for done in _submit_spec(directory, spec, scheduler, options, dry_run)]
    array = JobSpec(task=TILES_TASK, fold=None, directory=directory, name="TILES_TASK",
                    script=directory / f"{TILES_TASK}_array{SCRIPT_SUFFIX[scheduler]}",
                    output=directory / "TILES_TASK_output.out", exit_file=directory / f"{TILES_TASK}_array.exit",
                    commands=())
    return _submit_spec(directory, array, scheduler, options, dry_run, specs)


# -- states -------------------------------------------------------------------------------
def _read_exit(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def exit_state(code: int) -> str:
    """A job's state from its script's exit status: 0 COMPLETED; stopped by SIGINT/SIGTERM (a training
    that saved its snapshot and exited 130/143) CANCELLED; anything else FAILED."""
    if code == 0:
        return COMPLETED
    return CANCELLED if code in STOPPED_EXITS else FAILED


def _scheduler_state(record: JobRecord, cwd: Path) -> Optional[str]:
    """The scheduler's view of a job; ``None`` when it no longer knows the job."""
    if record.scheduler == "slurm":
        for command in ("squeue", "scontrol"):
            _require(command)
        with contextlib.suppress(SchedulerError):  # squeue fails on ids it has forgotten
            out = _run_scheduler(["squeue", "--noheader", f"--jobs={record.job_id}", "--format=%T"], cwd).split()
            if out:
                return out[0]
        try:  # gone from squeue: scontrol remembers finished jobs for MinJobAge seconds
            out = _run_scheduler(["scontrol", "show", "job", record.job_id], cwd)
        except SchedulerError:
            return None
        match = re.search(r"\bJobState=(\w+)", out)
        return match.group(1) if match else None
    _require("qstat")
    try:  # Torque's wrappers may not know array task ids: the array's own state stands for them
        out = _run_scheduler(["qstat", "-f", record.array_id or record.job_id], cwd)
    except SchedulerError:
        return None
    match = re.search(r"job_state\s*=\s*(\w)", out)
    if not match:
        return None
    state = PBS_STATES.get(match.group(1), UNKNOWN)
    status = re.search(r"exit_status\s*=\s*(-?\d+)", out)
    if state == COMPLETED and status and int(status.group(1)) != 0:
        return FAILED
    return state


def job_status(workdir: Path, record: JobRecord) -> JobStatus:
    """The current state of one recorded job.

    The job's exit file decides first (written by the script as its last step); then the
    scheduler (squeue/scontrol, qstat, the local state file); a job the scheduler no longer
    lists and that wrote no exit file ended before finishing its script: ``FAILED``.
    """
    workdir = Path(workdir)
    output = workdir / record.output
    exit_code = _read_exit(workdir / record.exit_file)
    if exit_code is not None:
        return JobStatus(record, exit_state(exit_code), exit_code, output)
    if record.scheduler == "local":
        state = _local_state(workdir, record.job_id)
    else:
        state = _scheduler_state(record, workdir)
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


# -- the local runner ---------------------------------------------------------------------
def _local_dir(workdir: Path) -> Path:
    path = Path(workdir).resolve() / LOCAL_DIR
    (path / "slots").mkdir(parents=True, exist_ok=True)
    return path


def _local_state_path(workdir: Path, job_id: str) -> Path:
    return _local_dir(workdir) / f"{job_id}.json"


def _new_local_id(workdir: Path) -> str:
    """The next free integer id; the state file is created exclusively to claim it."""
    folder = _local_dir(workdir)
    number = 1 + max((int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()), default=0)
    while True:
        try:
            with open(folder / f"{number}.json", "x") as handle:
                json.dump({"state": PENDING}, handle)
            return str(number)
        except FileExistsError:
            number += 1


def _local_submit(workdir: Path, spec: JobSpec, options: JobOptions) -> str:
    """Start a detached worker that waits for its dependencies and a free slot, then runs the script."""
    job_id = _new_local_id(workdir)
    workers = options.workers or max(1, (os.cpu_count() or 1) // options.ppn)
    argv = [sys.executable, "-m", "lymph_cv.cluster.jobs", str(_local_state_path(workdir, job_id)), str(spec.script),
            str(workers), *options.after]
    with open(spec.output, "ab") as out:
        subprocess.Popen(argv, cwd=spec.directory, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True, close_fds=True)
    return job_id


def _local_state(workdir: Path, job_id: str) -> Optional[str]:
    path = Path(workdir).resolve() / LOCAL_DIR / f"{job_id}.json"
    state = read_cache(path)
    if state is None:
        return None
    if state.get("state") in (PENDING, RUNNING) and "pid" in state and not pid_alive(state["pid"]):
        return FAILED  # the worker died without recording an end
    return state.get("state")


def _write_local_state(path: Path, **values) -> None:
    state = read_cache(path) or {}
    state.update(values)
    atomic_write_json(path, state)


@contextlib.contextmanager
def _slot(slots: Path, workers: int) -> Iterator[int]:
    """Hold one of ``workers`` lock files; the kernel frees it if this process dies."""
    while True:
        for index in range(workers):
            handle = open(slots / f"slot-{index}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                handle.close()
            return
        time.sleep(POLL_S / 4)


def _local_worker(state_path: Path, script: Path, workers: int, after: Sequence[str]) -> int:
    """Body of a detached local job: dependencies (afterok), a slot, then ``bash script``."""
    _write_local_state(state_path, pid=os.getpid(), script=str(script), after=list(after), submitted=time.time())
    folder = state_path.parent
    for dependency in after:
        while (state := _local_state(folder.parent, dependency)) not in FINISHED_STATES:
            if state is None:
                break
            time.sleep(POLL_S / 4)
        if state != COMPLETED:
            _write_local_state(state_path, state=CANCELLED, reason=f"dependency {dependency}: {state}", ended=time.time())
            return 1
    with _slot(folder / "slots", workers) as slot, _forwarded_signals() as job:
        _write_local_state(state_path, state=RUNNING, slot=slot, started=time.time())
        code = job.run(["bash", str(script)])
        if job.signals:
            # A job stopped through its runner did not finish, whatever its script returned.
            _write_local_state(state_path, state=CANCELLED, reason=f"signal {job.signals[0]}", exit_code=code,
                               ended=time.time())
        else:
            _write_local_state(state_path, state=exit_state(code), exit_code=code, ended=time.time())
    return code


#: How long a signalled job's processes get to finish (a training writes its snapshot first).
LOCAL_STOP_GRACE_S = 120.0


class _Job:
    """The script of a local job in its own process group; a signal to the runner goes to all of it."""

    def __init__(self):
        self.signals: List[int] = []
        self.group: Optional[int] = None

    def forward(self, signum, _frame) -> None:
        self.signals.append(signum)
        if self.group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.group, signum)

    def run(self, argv: Sequence[str]) -> int:
        if self.signals:
            return 128 + self.signals[0]
        _become_subreaper()
        child = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, start_new_session=True)  # own group
        self.group = child.pid
        code = child.wait()
        # bash dies of the signal at once; its training goes on to its snapshot: wait for the group
        # (its orphans are ours to reap, as a subreaper).
        deadline = time.monotonic() + LOCAL_STOP_GRACE_S
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            try:
                os.killpg(self.group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        return code


def _become_subreaper() -> None:
    """Linux: orphaned descendants are re-parented to this process (so it can reap and wait for them)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


@contextlib.contextmanager
def _forwarded_signals() -> Iterator[_Job]:
    """While the job runs, SIGTERM/SIGINT/SIGHUP to the runner reach the job's processes (before,
    killing the runner left the training running, unseen, and freed its slot for another job)."""
    job = _Job()
    previous = {sig: signal.signal(sig, job.forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield job
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _local_main(argv: Sequence[str]) -> int:
    state_path, script, workers, *after = argv
    return _local_worker(Path(state_path), Path(script), int(workers), after)


if __name__ == "__main__":
    sys.exit(_local_main(sys.argv[1:]))
