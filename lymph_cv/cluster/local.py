"""The local runner: jobs on this machine without a scheduler (``submit --scheduler local``).

Each job is a detached worker (``python -m lymph_cv.cluster.local STATE SCRIPT WORKERS [AFTER…]``) that
waits for its dependencies (afterok) and one of ``WORKERS`` slot locks, then runs the script; its
state lives in ``WORKDIR/.local_jobs/<id>.json``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from lymph_cv.core.fsutil import atomic_write_json, pid_alive
from lymph_cv.cluster.records import CANCELLED, COMPLETED, FAILED, FINISHED_STATES, PENDING, RUNNING, exit_state
from lymph_cv.cluster.spec import JobOptions, JobSpec
from lymph_cv.workdir.records import read_cache

#: Hidden folder of the local runner: one state file per job, one lock file per worker slot.
LOCAL_DIR = ".local_jobs"
#: Seconds between dependency and slot polls.
POLL_S = 0.5
#: How long a signalled job's processes get to finish (a training writes its snapshot first).
LOCAL_STOP_GRACE_S = 120.0
#: prctl option: orphaned descendants are re-parented to the caller.
PR_SET_CHILD_SUBREAPER = 36


def _local_dir(workdir: Path) -> Path:
    path = Path(workdir).resolve() / LOCAL_DIR
    (path / "slots").mkdir(parents=True, exist_ok=True)
    return path


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


def submit(workdir: Path, spec: JobSpec, options: JobOptions) -> str:
    """Start a detached worker that waits for its dependencies and a free slot, then runs the script."""
    job_id = _new_local_id(workdir)
    workers = options.workers or max(1, (os.cpu_count() or 1) // options.ppn)
    argv = [sys.executable, "-m", __name__, str(_local_dir(workdir) / f"{job_id}.json"), str(spec.script),
            str(workers), *options.after]
    with open(spec.output, "ab") as out:
        subprocess.Popen(argv, cwd=spec.directory, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True, close_fds=True)
    return job_id


def job_state(workdir: Path, job_id: str) -> Optional[str]:
    """A local job's state (None: unknown id); a worker that died without recording an end FAILED."""
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
        time.sleep(POLL_S)


def run_worker(state_path: Path, script: Path, workers: int, after: Sequence[str]) -> int:
    """Body of a detached local job: dependencies (afterok), a slot, then ``bash script``."""
    _write_local_state(state_path, pid=os.getpid(), script=str(script), after=list(after), submitted=time.time())
    folder = state_path.parent
    for dependency in after:
        while (state := job_state(folder.parent, dependency)) not in FINISHED_STATES:
            if state is None:
                break
            time.sleep(POLL_S)
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

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


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


def main(argv: Sequence[str]) -> int:
    """``STATE SCRIPT WORKERS [AFTER…]``: run one detached local job."""
    state_path, script, workers, *after = argv
    return run_worker(Path(state_path), Path(script), int(workers), after)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
