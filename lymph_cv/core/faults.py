"""Fault injection for the fault suite: ``LYMPH_CV_FAULT`` names faults to raise at named points.

The variable holds ``;``-separated rules:

* ``kill@EVENT`` or ``kill@EVENT#N`` (also written ``EVENT:N``): SIGKILL this process, as a power
  cut would, at the N-th (default first) time it passes :func:`event` ``EVENT`` (counted per process);
* ``term@EVENT[#N]`` / ``int@EVENT[#N]``: send this process SIGTERM / SIGINT there instead (an
  interruption that the command handles: exit 143 / 130 after cleaning up);
* ``enospc@GLOB`` / ``erofs@GLOB`` / ``eacces@GLOB``: a write through :func:`before_write` of a file
  whose name matches ``GLOB`` fails with that error, as a full disk, a read-only file system or a
  refused permission would make it fail.

Unset (the normal case), every hook is a dictionary look-up and nothing else.
"""
from __future__ import annotations

import errno
import os
import signal
TYPE_CHECKING = False  # typing.TYPE_CHECKING unimported: typing is ~5 ms of the tools' start-up (issue 17)
if TYPE_CHECKING:
    from typing import Dict, List, Tuple

from lymph_cv.errors import ConfigError

ENV = "LYMPH_CV_FAULT"
FAULT_ENV = ENV
KILL = "kill"
#: Signals a rule may send at an event.
SIGNALS = {KILL: signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
WRITE_ERRORS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eacces": errno.EACCES}

_counts: Dict[str, int] = {}
_parsed: Dict[str, List[Tuple[str, str, int]]] = {}


def _rules() -> List[Tuple[str, str, int]]:
    text = os.environ.get(ENV, "")
    if not text:
        return []
    if text not in _parsed:
        rules = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            if "@" not in part:  # the short form EVENT[:N]
                event_name, _, count = part.partition(":")
                part = f"{KILL}@{event_name}#{count}" if count else f"{KILL}@{event_name}"
            kind, sep, target = part.partition("@")
            name, _, nth = target.partition("#")
            if not sep or not name or (kind not in SIGNALS and kind not in WRITE_ERRORS) or (nth and not nth.isdigit()):
                raise ConfigError(f"{ENV}: {part!r}: expected kill|term|int@EVENT[#N] or "
                                  f"{'|'.join(WRITE_ERRORS)}@GLOB")
            rules.append((kind, name, int(nth or 1)))
        _parsed[text] = rules
    return _parsed[text]


def event(name: str) -> None:
    """A named point of the work (``dbs:db-done``, ``train:snapshot``, …); may end the process."""
    rules = _rules()
    if not rules:
        return
    _counts[name] = _counts.get(name, 0) + 1
    for kind, target, nth in rules:
        if kind in SIGNALS and target == name and _counts[name] == nth:
            os.kill(os.getpid(), SIGNALS[kind])


#: The name other modules know the kill point by.
fault_point = event


def before_write(path) -> None:
    """Called before a file is written; raises the OSError a matching rule asks for."""
    rules = _rules()
    if not rules:
        return
    import fnmatch  # here: a rule is set (fault tests only); the tools' start-up imports neither this nor pathlib

    name = os.path.basename(os.fspath(path).rstrip(os.sep))
    for kind, pattern, _ in rules:
        if kind in WRITE_ERRORS and fnmatch.fnmatch(name, pattern):
            code = WRITE_ERRORS[kind]
            raise OSError(code, os.strerror(code), os.fspath(path))
