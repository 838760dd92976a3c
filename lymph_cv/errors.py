"""The library's error types.

Every error carries one line for the user: which file or option, and what was expected.
The CLI prints it as ``error: <message>`` and exits with status 2.
"""
from __future__ import annotations

import os
import signal
TYPE_CHECKING = False  # typing.TYPE_CHECKING unimported: typing is ~5 ms of the tools' start-up (issue 17)
if TYPE_CHECKING:
    from typing import Iterable, Optional

#: Exit status of a command stopped by a signal: the shell's 128 + signal number (SIGINT 130, SIGTERM 143).
SIGNAL_EXIT_BASE = 128


class LymphCVError(Exception):
    """Base class: a user-facing, one-line problem (no traceback needed)."""

    #: The command's exit status when this error ends it.
    exit_status = 2

    def __init__(self, message: str, path: Optional[os.PathLike | str] = None):
        self.path = None if path is None else os.fspath(path)
        self.detail = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class FormatError(LymphCVError):
    """A file is not what it should be: wrong kind, truncated, corrupt."""


class InputError(LymphCVError):
    """User data is unusable: a bad list line, a missing or unreadable image, a bad label."""


class ConfigError(LymphCVError):
    """A configuration value or option is invalid."""

    def __init__(self, message: str, path=None, valid: Optional[Iterable[str]] = None):
        if valid is not None:
            message = f"{message} (valid: {', '.join(str(v) for v in valid)})"
        super().__init__(message, path)


class UnsupportedError(ConfigError):
    """A layer type, field or feature we do not implement."""


class StoreError(LymphCVError):
    """A LevelDB/LMDB database cannot be opened, read or written as asked."""


class TrainingError(LymphCVError):
    """Training cannot go on (NaN loss, mismatched snapshot, …)."""


class SchedulerError(LymphCVError):
    """A cluster scheduler command is missing or failed."""


class EvaluationError(LymphCVError):
    """Evaluation inputs are inconsistent (model vs deploy net, mean shape, empty list)."""


class LockError(LymphCVError):
    """Another live process holds the lock of a folder this command would write."""


class Interrupted(LymphCVError):
    """Work stopped by a signal after saving what it had (a snapshot): exit status 128 + signal."""

    def __init__(self, message: str, path=None, signum: int = signal.SIGINT):
        self.signum = int(signum)
        self.exit_status = SIGNAL_EXIT_BASE + self.signum
        super().__init__(message, path)


def naming(exc: LymphCVError, path: Optional[os.PathLike | str]) -> LymphCVError:
    """``exc`` naming ``path`` as its file where it names none yet (an error found in a message parsed
    from that file, e.g. a layer of a net prototxt)."""
    if exc.path is None and path is not None:
        exc.path = os.fspath(path)
        exc.args = (f"{exc.path}: {exc.detail}",)
    return exc


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, …; the number itself for an unknown signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception (like Ctrl-C's KeyboardInterrupt), so cleanup code runs."""

    signum = signal.SIGTERM


def interrupt_status(exc: BaseException) -> int:
    """The exit status of a command ended by ``exc`` (a KeyboardInterrupt or :class:`Terminated`)."""
    return SIGNAL_EXIT_BASE + int(getattr(exc, "signum", signal.SIGINT))
