"""The debugging timeline (core/timeline.py): lines only when asked for, from the origin given."""
from __future__ import annotations

import time

from lymph_cv.core import timeline


def test_marks_print_only_when_the_timeline_is_on(monkeypatch, capsys):
    monkeypatch.delenv(timeline.ENV, raising=False)
    timeline.mark("nothing")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(timeline, "_origin", [])
    monkeypatch.setenv(timeline.ENV, repr(time.monotonic() - 5))
    timeline.mark("phase one")
    pid, seconds, phase = capsys.readouterr().err.split(None, 1)[1].split(None, 2)
    assert phase == "phase one\n" and 5 <= float(seconds) < 60 and int(pid) > 0
    monkeypatch.setattr(timeline, "_origin", [])
    monkeypatch.setenv(timeline.ENV, "1")
    timeline.mark("first")
    assert capsys.readouterr().err.split()[2] == "0.0000"
