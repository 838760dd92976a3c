"""Reading glog-format ``caffe train`` logs (ours or Caffe's) back into train and test rows.

Split from :mod:`lymph_cv.formats.caffelog` (which re-exports these names) so that the tools that
only write log lines load neither these regexes nor dataclasses at start-up.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from lymph_cv.errors import FormatError, InputError

#: What Caffe's tools/extra/parse_log.py matches, written once.
_LINE = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6})\s+\d+ \S+\] (.*)$")
_ITERATION = re.compile(r"Iteration (\d+)")
_LR = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_OUTPUT = re.compile(r"(Train|Test) net output #(\d+): (\S+) = ([-+.\deEinfINFaA]+)")
_TEST_NET = re.compile(r"Testing net \(#(\d+)\)")
#: The line a training run starts with (Caffe's parse_log.py times from it as well).
_SOLVING = "Solving "


@dataclass
class LogRow:
    """One display or test point: iteration, seconds since the run started, learning rate, outputs."""

    iteration: int
    seconds: float
    lr: Optional[float]
    outputs: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingLog:
    """A parsed ``caffe train`` log: train rows (display points) and test rows (test net #0;
    further test nets' outputs are named ``name#K``)."""

    path: Optional[Path]
    train: List[LogRow]
    test: List[LogRow]

    def series(self, phase: str, name: str, x: str = "iterations") -> tuple[list, list]:
        """(x values, y values) of one output (or ``lr``) of ``phase`` (train/test); ``x`` is
        ``iterations`` or ``seconds``."""
        rows = self.train if phase == "train" else self.test
        xs, ys = [], []
        for row in rows:
            value = row.lr if name == "lr" else row.outputs.get(name)
            if value is not None:
                xs.append(row.iteration if x == "iterations" else row.seconds)
                ys.append(value)
        return xs, ys

    def names(self, phase: str) -> List[str]:
        """The output names seen in ``phase``, in first-seen order."""
        rows = self.train if phase == "train" else self.test
        return list(dict.fromkeys(name for row in rows for name in row.outputs))


class _Clock:
    """Seconds since the first stamp.  glog stamps carry no year: one earlier than the last stamp
    (a run past New Year) moves on a year, as Caffe's extract_seconds.py does."""

    #: A leap year, so that 29 February parses.
    YEAR = 2000

    def __init__(self):
        self.start: Optional[datetime.datetime] = None
        self.last: Optional[datetime.datetime] = None
        self.year = self.YEAR

    def seconds(self, match: re.Match) -> float:
        month, day, hour, minute, second, micros = (int(g) for g in match.groups()[:6])
        try:
            stamp = datetime.datetime(self.year, month, day, hour, minute, second, micros)
            if self.last is not None and stamp < self.last - datetime.timedelta(days=1):
                self.year += 1
                stamp = stamp.replace(year=self.year)
        except ValueError:  # 29 February in a following year, or a damaged stamp
            return 0.0 if self.last is None else (self.last - self.start).total_seconds()
        self.last = stamp
        if self.start is None:
            self.start = stamp
        return (stamp - self.start).total_seconds()


def parse_log(text: str, path: Optional[os.PathLike] = None) -> TrainingLog:
    """Parse a glog-format ``caffe train`` log (ours or Caffe's): the fields Caffe's
    ``parse_log.py`` reads (iteration, seconds, learning rate, train and test net outputs).

    A row's learning rate is the one logged at its iteration (else the latest one before it).  A
    resumed run appended to the same log restarts at its snapshot: later rows of an iteration
    replace earlier ones.  Lines without a glog stamp are ignored; a log without any is an error.
    """
    clock = _Clock()
    iteration: Optional[int] = None
    lr: Optional[float] = None
    test_net = 0
    train: Dict[int, LogRow] = {}
    test: Dict[int, LogRow] = {}
    stamped = False
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        stamped = True
        seconds = clock.seconds(match)
        message = match.group(7)
        if message.startswith(_SOLVING):
            iteration = None
        found = _ITERATION.search(message)
        if found:
            iteration = int(found.group(1))
        if iteration is None:
            continue
        testing = _TEST_NET.search(message)
        if testing:
            test_net = int(testing.group(1))
            if test_net == 0:  # a repeated test (resumed run) replaces the earlier one
                test.pop(iteration, None)
        rate = _LR.search(message)
        if rate:
            lr = float(rate.group(1))
            if iteration in train:
                train[iteration].lr = lr
            continue
        output = _OUTPUT.search(message)
        if not output:
            continue
        phase, number, name, value = output.groups()
        rows = train if phase == "Train" else test
        if phase == "Test" and test_net:
            name = f"{name}#{test_net}"
        row = rows.get(iteration)
        if row is None or (phase == "Train" and number == "0"):
            row = rows[iteration] = LogRow(iteration, seconds, lr)
        try:
            row.outputs[name] = float(value)
        except ValueError:
            continue
    if not stamped:
        raise FormatError("not a Caffe training log (no glog-format line like "
                          "'I0101 12:00:00.000000 123 solver.cpp:228] Iteration 0, loss = 1.1')", path)
    for row in test.values():
        if row.lr is None:
            row.lr = lr if not train else next((r.lr for r in train.values() if r.lr is not None), None)
    return TrainingLog(None if path is None else Path(path), [train[k] for k in sorted(train)],
                       [test[k] for k in sorted(test)])


def read_log(path: os.PathLike) -> TrainingLog:
    """:func:`parse_log` of a file; one-line errors for a missing or unreadable one."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read the training log ({exc.strerror or exc})", path) from exc
    return parse_log(text, path)
