"""What a job is before it meets a scheduler: its resources and chaining (:class:`JobOptions`), what it
runs and which files it writes (:class:`JobSpec`), and what a submission did (:class:`Submission`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from lymph_cv.errors import ConfigError

TRAIN_TASK = "train"
EVALUATE_TASK = "evaluate"
#: Whole-slide tiling (``submit --stage tiles``): one task per slide.
TILES_TASK = "tiles"
#: The tutorial's Torque request (BASE-qsub.pbs): 320 hours, one core, one exclusive GPU.
DEFAULT_WALLTIME = "320:00:00"
DEFAULT_PPN = 1
DEFAULT_GPUS = 0

# Values that reach Debian's qsub wrapper unquoted (it builds a shell string): keep them plain.
# Always used with fullmatch (a "$" anchor would let a trailing newline through).
_WALLTIME_RE = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")
_QUEUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*")
_MAIL_RE = re.compile(r"[A-Za-z0-9_.+-]+@[A-Za-z0-9.-]+(,[A-Za-z0-9_.+-]+@[A-Za-z0-9.-]+)*")
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\[\]-]*")


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
        if self.walltime is not None and not any(int(n) for n in re.split(r"[-:]", self.walltime)):
            raise ConfigError(f"--walltime {self.walltime!r}: a job needs more than no time at all")
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


@dataclass(frozen=True)
class JobSpec:
    """One job: what it runs (``lymph-cv`` argument lists, in order), where, and which files it writes.

    ``fold`` is the job's index: a fold for training, any positive number for another per-item job
    (the array index when several are submitted as one array job)."""

    task: str
    fold: Optional[int]
    directory: Path
    name: str
    script: Path
    output: Path
    exit_file: Path
    commands: tuple


@dataclass
class Submission:
    """What a submission did for one job (a fold, for training)."""

    fold: Optional[int]
    script: Path
    command: List[str]
    job_id: Optional[str]
    skipped: bool = False
