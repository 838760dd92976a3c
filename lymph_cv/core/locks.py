"""Folder locks: one writer per work directory (and per fold's training folder).

A writer holds ``fcntl.flock`` on ``FOLDER/.lymph-cv.lock``; the kernel releases it when the
process ends in any way (SIGKILL included), so a lock is never stale.  The file records the holder
(pid, host, command, since when) for the error line a second writer gets.  Locks are re-entrant
within a process: ``lymph-cv run`` holds its work directory's and calls stages that take it again.
Taking a lock sweeps the folder's temporaries of dead writers (nobody else writes there now).
The lock file is removed on release (a waiter then re-opens the new one), so a folder keeps no trace
of a finished command.  Readers never lock.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

from lymph_cv.core.fsutil import PathLike, make_dirs, os_reason, remove_stale_temporaries
from lymph_cv.errors import LockError

log = logging.getLogger(__name__)

LOCK_NAME = ".lymph-cv.lock"
#: Longest command line kept in the holder record.
COMMAND_CHARS = 200

#: Whether a held lock makes a second writer wait (``--wait-lock``) instead of failing.
_settings = {"wait": False}
#: Locks this process holds: resolved folder → [open lock file, depth].
_held: Dict[str, list] = {}


def set_wait(wait: bool) -> None:
    """Make later :func:`folder_lock` calls wait for a busy lock (``--wait-lock``) or fail at once."""
    _settings["wait"] = bool(wait)


def target_lock_name(target: PathLike) -> str:
    """The lock file name, in its parent folder, of an output that is replaced as a whole (a folder
    renamed into place cannot hold its own lock file): ``.NAME.lymph-cv.lock``."""
    return f".{Path(target).name}{LOCK_NAME}"


def holder(folder: PathLike, name: str = LOCK_NAME) -> Optional[dict]:
    """The recorded holder of ``folder``'s lock (whether or not it still holds it), or None."""
    try:
        record = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe(record: Optional[dict]) -> str:
    """``pid 12 on host, `lymph-cv dbs w`, since 2026-…`` (or that the holder is unknown)."""
    if not record:
        return "another process (holder not recorded yet)"
    return (f"pid {record.get('pid')} on {record.get('host')}, `{record.get('command')}`, "
            f"since {record.get('since')}")


def _command() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    text = " ".join([name if name != "__main__.py" else "lymph-cv", *sys.argv[1:]])
    return text if len(text) <= COMMAND_CHARS else text[:COMMAND_CHARS] + "…"


def _record(handle) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(handle.fileno(), 0)
    os.pwrite(handle.fileno(), (json.dumps(record) + "\n").encode("utf-8"), 0)


@contextlib.contextmanager
def folder_lock(folder: PathLike, wait: Optional[bool] = None, name: str = LOCK_NAME,
                sweep: bool = True) -> Iterator[Path]:
    """Hold ``folder``'s write lock (the file ``name`` in it) for the block; the folder is created
    when missing.  ``sweep``: remove the temporaries of dead writers in it once the lock is held.

    Busy: :class:`LockError` naming the holder, or (``wait``, default :func:`set_wait`) a wait for it.
    """
    folder = make_dirs(folder)
    key = os.path.join(os.path.realpath(folder), name)
    if key in _held:
        _held[key][1] += 1
        try:
            yield folder
        finally:
            _held[key][1] -= 1
        return
    path = folder / name
    handle = _acquire(folder, path, name, _settings["wait"] if wait is None else wait)
    try:
        try:
            _record(handle)
        except OSError as exc:  # a full disk: the lock holds all the same; the work says what failed
            log.debug("%s: holder not recorded (%s)", path, os_reason(exc))
        for stale in remove_stale_temporaries(folder) if sweep else ():
            log.info("removed %s, left by an interrupted run", stale)
        _held[key] = [handle, 1]
        try:
            yield folder
        finally:
            del _held[key]
    finally:
        # Unlinked while still locked, so the folder keeps no trace; a process waiting on the old
        # file notices (see _acquire) and locks the new one.
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()  # releases the flock


def _acquire(folder: Path, path: Path, name: str, wait: bool):
    """The open, flock'ed lock file at ``path`` (the one that is there now, not one unlinked meanwhile)."""
    while True:
        try:
            handle = open(path, "a+b", buffering=0)  # unbuffered: closing never fails on a full disk
        except OSError as exc:
            raise LockError(f"cannot write in this folder ({os_reason(exc)})", folder) from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = describe(holder(folder, name))
                if not wait:
                    raise LockError(f"in use by {busy}; wait for it to finish or pass --wait-lock", folder) from None
                log.info("%s: waiting for %s", folder, busy)
                started = time.monotonic()
                fcntl.flock(handle, fcntl.LOCK_EX)
                log.info("%s: lock free after %.0f s", folder, time.monotonic() - started)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle.fileno()).st_ino:
                return handle
        except BaseException:
            handle.close()
            raise
        handle.close()  # its holder removed it on release: lock the file that is there now


def remove_unused(folder: PathLike) -> bool:
    """Remove ``folder`` if it is empty (made for the lock of a command that then failed)."""
    folder = Path(folder)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True
