"""Log lines in Caffe's glog format, so Caffe's own log tools read ours.

A line is ``I1122 13:39:22.381027 25210 solver.cpp:204] message``: severity and month/day, local time
with microseconds, the thread id right-aligned in five columns, Caffe's source location, and the
message.  Numbers print like a C++ stream with its default precision (6 significant digits, %g-like).
The lines go through :mod:`logging` (logger ``lymph_cv.formats.caffe.log``) to stderr and, when asked, to a
log file; when stderr is a terminal they are written above a tqdm progress bar.
:func:`parse_log` reads such a log back (ours or Caffe's) into train and test rows.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, TextIO

from lymph_cv.errors import FormatError, InputError

LOGGER_NAME = "lymph_cv.formats.caffe.log"

#: Caffe's source locations of the messages we mimic ([HEAD] line numbers); tools only need the form.
SRC_SOLVE = "solver.cpp:288"
SRC_POLICY = "solver.cpp:289"
SRC_TEST = "solver.cpp:347"
SRC_TEST_OUTPUT = "solver.cpp:414"
SRC_DISPLAY = "solver.cpp:228"
SRC_TRAIN_OUTPUT = "solver.cpp:244"
SRC_LR = "sgd_solver.cpp:106"
SRC_SNAPSHOT = "sgd_solver.cpp:273"
SRC_SNAPSHOT_STATE = "sgd_solver.cpp:290"
SRC_DONE = "solver.cpp:326"
SRC_STOPPED = "solver.cpp:309"
SRC_RESTORE = "sgd_solver.cpp:318"
SRC_TOOL = "caffe.cpp:313"
SRC_NET = "net.cpp:744"
SRC_DATA = "data_layer.cpp:41"

_SEVERITY = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
             logging.CRITICAL: "F"}


def fmt(value: float) -> str:
    """A number as a C++ ``ostream`` prints it by default (6 significant digits)."""
    return "%g" % float(value)


class GlogFormatter(logging.Formatter):
    """``<I|W|E|F>MMDD HH:MM:SS.uuuuuu TTTTT file.cpp:line] message``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        severity = _SEVERITY.get(record.levelno, "I")
        thread = getattr(record, "thread_id", None) or threading.get_native_id()
        src = getattr(record, "src", "caffe.cpp:0")
        return (f"{severity}{time.strftime('%m%d %H:%M:%S', stamp)}.{micros:06d} {thread:5d} {src}] "
                f"{record.getMessage()}")


class _TqdmStream:
    """A file-like stream that writes through ``tqdm.write`` so a progress bar stays intact."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        text = text.rstrip("\n")
        if text:
            tqdm.write(text, file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


class CaffeLog:
    """The glog-style log of one run: ``info(message, src)`` to stderr and an optional file."""

    def __init__(self, logger: logging.Logger, file_handler: Optional[logging.Handler] = None):
        self.logger = logger
        self.file_handler = file_handler

    def info(self, message: str, src: str = SRC_TOOL) -> None:
        self.logger.info(message, extra={"src": src})

    def warning(self, message: str, src: str = SRC_TOOL) -> None:
        self.logger.warning(message, extra={"src": src})

    def fatal_to_file(self, message: str, src: str = SRC_TOOL) -> None:
        """The error that ended the run, as an ``F`` line in the log file only (the command itself
        prints it once on stderr as ``error: …``)."""
        if self.file_handler is not None:
            record = self.logger.makeRecord(self.logger.name, logging.CRITICAL, src, 0, message, None, None,
                                            extra={"src": src})
            self.file_handler.handle(record)


@contextlib.contextmanager
def caffe_log(log_file: Optional[os.PathLike] = None, append: bool = False,
              stream: Optional[TextIO] = None, through_tqdm: bool = False,
              console_level: Optional[int] = None) -> Iterator[CaffeLog]:
    """Open the run's log: lines to ``stream`` (stderr) at the root logger's level (or
    ``console_level``), all INFO lines to ``log_file`` (appended when ``append``)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = GlogFormatter()
    stream = stream if stream is not None else sys.stderr
    console = logging.StreamHandler(_TqdmStream(stream) if through_tqdm else stream)
    console.setFormatter(formatter)
    root_level = logging.getLogger().getEffectiveLevel()
    console.setLevel(max(logging.INFO, root_level) if console_level is None else console_level)
    handlers = [console]
    file_handler = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a" if append else "w", encoding="utf-8")
        file_handler.setFormatter(formatter)
        file_handler.setLevel(logging.INFO)
        handlers.append(file_handler)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield CaffeLog(logger, file_handler)
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


# ----------------------------------------------------------------------------- reading a log
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
