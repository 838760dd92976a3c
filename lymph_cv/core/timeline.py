"""A debugging timeline of the data tools' phases: ``LYMPH_CV_TIMELINE=1`` prints one stderr line per
phase, ``timeline PID SECONDS PHASE``, so that what runs before the readers fork (one core busy)
and what overlaps shows.  SECONDS counts from the first mark, or from the value of the variable
when it holds a decimal point: a ``time.monotonic()`` reading (a benchmark's time of starting the
process; the clock is shared by every process on the machine).  Off, a mark costs one dictionary
look-up.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "LYMPH_CV_TIMELINE"
_origin: list[float] = []


def mark(phase: str) -> None:
    """Print ``phase`` with the seconds since the origin when the timeline is on."""
    value = os.environ.get(ENV)
    if not value:
        return
    now = time.monotonic()
    if not _origin:
        _origin.append(float(value) if "." in value else now)
    sys.stderr.write(f"timeline {os.getpid()} {now - _origin[0]:.4f} {phase}\n")
