"""The schedulers jobs run on, one class each behind one interface (:class:`Scheduler`), in a registry.

To add a scheduler: a :class:`Scheduler` subclass here (or in its own module imported by ``cluster/jobs.py``)
registered with ``@register_scheduler("name")``, and its job template ``jobs/<name>.j2``.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence

from lymph_cv.errors import ConfigError, SchedulerError
from lymph_cv.core.registry import Registry
from lymph_cv.cluster import local
from lymph_cv.cluster.records import COMPLETED, FAILED, PENDING, RUNNING, UNKNOWN, JobRecord
from lymph_cv.cluster.spec import JobOptions, JobSpec

#: Longest scheduler message kept in an error line.
MESSAGE_CHARS = 400
#: Torque's one-letter ``job_state`` → our names (``C`` is resolved with the exit file).
PBS_STATES = {"Q": PENDING, "H": PENDING, "W": PENDING, "T": PENDING, "R": RUNNING, "E": RUNNING,
              "S": "SUSPENDED", "C": COMPLETED}
LOCAL_ARRAY = "--array needs a cluster scheduler (pbs or slurm); the local runner pools single jobs"
_SBATCH_ID_RE = re.compile(r"(\d+)(;\S+)?")
_QSUB_ID_RE = re.compile(r"\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS] + "…"


def _require(command: str) -> None:
    if shutil.which(command) is None:
        raise SchedulerError(f"{command}: command not found on PATH (is this a {command} submit host?)")


def run_scheduler(argv: Sequence[str], cwd: Path) -> str:
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


class Scheduler(ABC):
    """How jobs are submitted to, started by and looked up on one scheduler."""

    name: str = ""
    #: The job script's suffix (``K_train.pbs``) and the program that submits it.
    suffix: str = ""
    program: str = ""

    def launch(self, options: JobOptions) -> str:
        """The shell words that start a multi-process training ('' for one process)."""
        return ""

    def train_arguments(self, options: JobOptions) -> List[str]:
        """What a multi-process training adds to ``lymph-cv train``'s arguments."""
        if options.ranks == 1:
            return []
        return ["--device", "cuda" if options.gpus_per_node else "cpu"]

    @abstractmethod
    def submit_command(self, spec: JobSpec, options: JobOptions, array: Optional[str] = None) -> List[str]:
        """The argv that submits ``spec``'s script from ``spec.directory`` (an array job over ``array``)."""

    def parse_job_id(self, stdout: str) -> str:
        """The job id the submit command printed."""
        raise SchedulerError(f"{self.program} printed no job id: {_one_line(stdout) or '(nothing)'!r}")

    def submit(self, workdir: Path, spec: JobSpec, options: JobOptions, command: Sequence[str]) -> str:
        """Submit (``command`` from :meth:`submit_command`); the job id."""
        return self.parse_job_id(run_scheduler(command, cwd=spec.directory))

    @abstractmethod
    def state(self, record: JobRecord, workdir: Path) -> Optional[str]:
        """The scheduler's view of a job; ``None`` when it no longer knows the job."""


SCHEDULER_REGISTRY: Registry[Scheduler] = Registry("scheduler")


def register_scheduler(name: str):
    """Class decorator: register one instance of the class under ``name`` (its ``name``)."""

    def decorate(cls):
        instance = cls()
        instance.name = name
        SCHEDULER_REGISTRY.register(name)(instance)
        return cls

    return decorate


def get_scheduler(name: str) -> Scheduler:
    """The registered scheduler ``name``; ConfigError listing the valid names."""
    return SCHEDULER_REGISTRY.lookup(name)


def _slurm_path(path: Path) -> str:
    # sbatch expands %j, %a, … in file names; "%%" is a literal "%".
    return str(path).replace("%", "%%")


@register_scheduler("pbs")
class PBS(Scheduler):
    """Torque/PBS: ``qsub`` (key directives on its command line too: wrappers ignore some ``#PBS`` lines,
    relative file names), ``qstat -f``, ``mpirun`` over ``$PBS_NODEFILE`` for several processes."""

    suffix = ".pbs"
    program = "qsub"

    def launch(self, options: JobOptions) -> str:
        if options.ranks == 1:
            return ""
        return (f"mpirun -np {options.ranks} --hostfile \"$PBS_NODEFILE\" --map-by ppr:{options.ranks_per_node}:node "
                "-x MASTER_ADDR ")

    def submit_command(self, spec: JobSpec, options: JobOptions, array: Optional[str] = None) -> List[str]:
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
        if options.after:
            argv += ["-W", "depend=afterok:" + ":".join(options.after)]
        if array:
            argv += ["-t", array]
        return argv + [spec.script.name]

    def parse_job_id(self, stdout: str) -> str:
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if _QSUB_ID_RE.fullmatch(last):
            return last
        return super().parse_job_id(stdout)

    def state(self, record: JobRecord, workdir: Path) -> Optional[str]:
        _require("qstat")
        try:  # Torque's wrappers may not know array task ids: the array's own state stands for them
            out = run_scheduler(["qstat", "-f", record.array_id or record.job_id], workdir)
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


@register_scheduler("slurm")
class Slurm(Scheduler):
    """Slurm: ``sbatch --parsable`` (absolute file names), ``squeue`` then ``scontrol``, ``srun`` for
    several processes."""

    suffix = ".slurm"
    program = "sbatch"

    def launch(self, options: JobOptions) -> str:
        return "" if options.ranks == 1 else "srun --kill-on-bad-exit=1 "

    def submit_command(self, spec: JobSpec, options: JobOptions, array: Optional[str] = None) -> List[str]:
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
        if options.after:
            argv.append("--dependency=afterok:" + ":".join(options.after))
        if array:
            argv.append(f"--array={array}")
        return argv + [str(spec.script)]

    def parse_job_id(self, stdout: str) -> str:
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
        match = _SBATCH_ID_RE.fullmatch(lines[-1] if lines else "")
        if match:
            return match.group(1)
        return super().parse_job_id(stdout)

    def state(self, record: JobRecord, workdir: Path) -> Optional[str]:
        for command in ("squeue", "scontrol"):
            _require(command)
        with contextlib.suppress(SchedulerError):  # squeue fails on ids it has forgotten
            out = run_scheduler(["squeue", "--noheader", f"--jobs={record.job_id}", "--format=%T"], workdir).split()
            if out:
                return out[0]
        try:  # gone from squeue: scontrol remembers finished jobs for MinJobAge seconds
            out = run_scheduler(["scontrol", "show", "job", record.job_id], workdir)
        except SchedulerError:
            return None
        match = re.search(r"\bJobState=(\w+)", out)
        return match.group(1) if match else None


@register_scheduler("local")
class Local(Scheduler):
    """This machine's runner (:mod:`lymph_cv.cluster.local`): detached workers sharing slots, afterok."""

    suffix = ".sh"
    program = "bash"

    def train_arguments(self, options: JobOptions) -> List[str]:
        # the local runner has no launcher: `lymph-cv train --procs` starts the ranks itself
        arguments = super().train_arguments(options)
        return arguments + (["--procs", str(options.ranks)] if arguments else [])

    def submit_command(self, spec: JobSpec, options: JobOptions, array: Optional[str] = None) -> List[str]:
        if array:
            raise ConfigError(LOCAL_ARRAY)
        return ["bash", str(spec.script)]

    def submit(self, workdir: Path, spec: JobSpec, options: JobOptions, command: Sequence[str]) -> str:
        return local.submit(workdir, spec, options)

    def state(self, record: JobRecord, workdir: Path) -> Optional[str]:
        return local.job_state(workdir, record.job_id)


#: The registered schedulers' names, in registration order.
SCHEDULERS = tuple(SCHEDULER_REGISTRY.names())
