"""Skippable bad inputs (unreadable images, missing files) and the colour conversions made, collected
once for a whole stage: raised at once, or with ``skip_bad`` reported together at the end."""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from lymph_cv.errors import InputError

log = logging.getLogger(__name__)


class BadInputs:
    """Collects skippable problems: raise at once, or (``skip_bad``) keep them for the end.

    Also collects images that needed a colour conversion, so each kind is reported once.
    Worker processes return theirs; the parent merges them and calls :meth:`finish`.
    """

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.problems: list[str] = []
        self.conversions: dict[str, list[str]] = defaultdict(list)

    def problem(self, message: str) -> None:
        if not self.skip_bad:
            raise InputError(message)
        self.problems.append(message)

    def converted(self, kind: Optional[str], path: Union[str, Path]) -> None:
        if kind:
            self.conversions[kind].append(str(path))

    def merge(self, problems: Sequence[str], conversions: Mapping[str, Sequence[str]]) -> None:
        self.problems.extend(problems)
        for kind, paths in conversions.items():
            self.conversions[kind].extend(paths)

    def finish(self, what: str) -> None:
        """Log each skipped input, one line per conversion kind, and the count of skipped inputs."""
        for message in self.problems:
            log.warning("warning: skipped: %s", message)
        for kind, paths in self.conversions.items():
            log.warning("warning: %d %s image(s) converted to 8-bit BGR as OpenCV's colour imread does (first: %s)",
                        len(paths), kind, paths[0])
        if self.problems:
            log.warning("warning: %d bad input(s) skipped while %s", len(self.problems), what)
