"""Headless Chromium for the report test: a screenshot, the rendered DOM and the console messages."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List

#: Debian's package installs ``chromium``; other systems name it differently.
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: No network, no first-run, no background work: fast and the same on every machine.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars")
#: Chromium's log tag for page console messages: ``[...:INFO:CONSOLE:12] "text", source: URL (12)``.
CONSOLE = re.compile(r":CONSOLE(?:\(\d+\))?:?\d*\] (.*)$")
TIMEOUT = 90


@dataclass
class Page:
    dom: str
    console: List[str]
    screenshot: Path


def chromium() -> str:
    """The browser's path; fails (no skip) when none is installed: `make sysdeps` installs it."""
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("no Chromium found (tried " + ", ".join(NAMES) + "); `make sysdeps` installs Debian's chromium")


def render(url: str, screenshot: Path, width: int = 1280, height: int = 1000) -> Page:
    """Load ``url`` in a fresh profile; the page's DOM, its console messages and a screenshot."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                               f"--screenshot={screenshot}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if done.returncode != 0 or not screenshot.is_file():
        raise AssertionError(f"chromium failed (exit {done.returncode}): {done.stderr[-2000:]}")
    console = [m.group(1) for line in done.stderr.splitlines() if (m := CONSOLE.search(line))]
    return Page(done.stdout, console, screenshot)
