"""The library's error types.

Every error carries one line for the user: which file or option, and what was expected.
The CLI prints it as ``error: <message>`` and exits with status 2.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional


class LymphCVError(Exception):
    """Base class: a user-facing, one-line problem (no traceback needed)."""

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
