"""The job records of a work directory (``WORKDIR/jobs.json``) and job states: what was submitted where,
read and written one way under a lock, and how an exit status reads as a state."""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from lymph_cv.errors import SIGNAL_EXIT_BASE
from lymph_cv.core.fsutil import atomic_write_json
from lymph_cv.workdir.layout import JOBS_JSON
from lymph_cv.workdir.records import JOBS, RecordError, read_record

JOBS_FILE = JOBS_JSON
JOBS_VERSION = 1
LOCK_FILE = ".jobs.lock"

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, UNKNOWN = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "UNKNOWN")
#: Exit statuses of a command stopped by SIGINT/SIGTERM (after saving its work): the job was cancelled.
STOPPED_EXITS = frozenset({SIGNAL_EXIT_BASE + signal.SIGINT, SIGNAL_EXIT_BASE + signal.SIGTERM})
#: Scheduler states after which a job never runs again.
FINISHED_STATES = frozenset({COMPLETED, FAILED, CANCELLED, "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


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


def record_jobs(workdir: Path, new: Sequence[JobRecord]) -> None:
    """Add ``new`` records to ``jobs.json``, replacing older jobs of the same task and fold."""
    keys = {(record.task, record.fold) for record in new}
    with _locked(workdir):
        records = [r for r in load_jobs(workdir) if (r.task, r.fold) not in keys]
        _save_jobs(workdir, records + list(new))


def now() -> str:
    """A submission time as recorded (UTC, ISO 8601, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_exit(path: Path) -> Optional[int]:
    """The exit status a job script wrote as its last step, None when there is none (yet)."""
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
