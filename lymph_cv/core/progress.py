"""Progress that suits where it goes: a tqdm bar with an ETA on a terminal, plain periodic lines
(no carriage returns) on a file or pipe, so that logs stay readable."""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional, TextIO

log = logging.getLogger(__name__)

#: Seconds between two plain progress lines.
PLAIN_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 05 min``, ``2 d 04 h``: as precise as an estimate deserves."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(int(round(minutes)), 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


class Progress:
    """``update(n)``, ``set_postfix(**values)``, ``close()``; a tqdm bar when ``bar`` (default:
    ``stream`` is a terminal), otherwise a line ``desc: n/total unit (p %), rate, ETA`` every
    ``every`` seconds through ``say`` (default: this module's logger at INFO) and one at the end
    (when the work lasted that long); ``quiet``: neither; ``leave``: keep the finished bar."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", *, initial: int = 0,
                 stream: Optional[TextIO] = None, bar: Optional[bool] = None, every: float = PLAIN_EVERY_S,
                 quiet: bool = False, leave: bool = True,
                 say: Optional[Callable[[str], None]] = None, clock: Callable[[], float] = time.monotonic):
        stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.clock = every, clock
        self.say = (lambda line: None) if quiet else (say or log.info)
        self.postfix: dict = {}
        self.start = self.last = clock()
        self.start_n = initial
        self.bar = None
        if not quiet and (bar if bar is not None else is_terminal(stream)):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                            leave=leave)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.say(self.line(now))

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(refresh=refresh, **values)

    def line(self, now: Optional[float] = None) -> str:
        """The plain progress line."""
        elapsed = (self.clock() if now is None else now) - self.start
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.1f}%)"
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.total > self.n:
                parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.n > self.start_n and self.clock() - self.start >= self.every:
            self.say(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
