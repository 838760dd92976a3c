"""Log lines in Caffe's glog format, so Caffe's own log tools read ours.

A line is ``I1122 13:39:22.381027 25210 solver.cpp:204] message``: severity and month/day, local time
with microseconds, the thread id right-aligned in five columns, Caffe's source location, and the
message.  Numbers print like a C++ stream with its default precision (6 significant digits, %g-like).
The lines go through :mod:`logging` (logger ``lymph_cv.formats.caffe.log``) to stderr and, when asked, to a
log file; when stderr is a terminal they are written above a tqdm progress bar.
:func:`parse_log` reads such a log back (ours or Caffe's) into train and test rows (it lives in
:mod:`.logread`, imported when first asked for).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
TYPE_CHECKING = False  # typing.TYPE_CHECKING unimported: typing is ~5 ms of the tools' start-up (issue 17)
if TYPE_CHECKING:
    from typing import Iterator, Optional, TextIO


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
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
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


#: Names of the reading side, which lives in :mod:`lymph_cv.formats.logread`.
READING_NAMES = ("LogRow", "TrainingLog", "parse_log", "read_log")


def __getattr__(name: str):
    """The reading side's names, imported when first asked for (regexes and dataclasses cost
    every tool's start-up otherwise)."""
    if name in READING_NAMES:
        from lymph_cv.formats import logread

        return getattr(logread, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
