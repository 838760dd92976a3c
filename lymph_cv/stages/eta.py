"""How long training will take, from its first iterations: iterations left × measured time per
iteration, plus the test passes left × measured time per pass (tests included), and the warning
for the tutorial's 600,000 iterations on a CPU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lymph_cv.core.progress import format_duration

#: The tutorial's iterations per fold (its solver's max_iter).
TUTORIAL_ITERATIONS = 600_000
#: Timed iterations before the estimate is made (the first ones warm caches and allocators up;
#: the very first is left out of the timing).
ESTIMATE_AFTER = 10
#: A test pass not yet run is estimated as its batches at this share of a training iteration
#: (a forward without backward and update).
FORWARD_SHARE = 1 / 3


@dataclass
class Estimate:
    """Training time still to come for one fold."""

    iterations: int  # left
    ms_per_iteration: float
    tests: int  # test passes left
    seconds_per_test: float
    tests_measured: bool  # else estimated from the iteration time
    max_iter: int
    device: str

    @property
    def seconds(self) -> float:
        return self.iterations * self.ms_per_iteration / 1000 + self.tests * self.seconds_per_test

    def describe(self) -> str:
        """``about 5 h 50 min (599990 iterations × 35.0 ms + 60 tests × 4.1 s)``."""
        tests = ""
        if self.tests:
            how = "" if self.tests_measured else " estimated"
            passes = "test pass" if self.tests == 1 else "test passes"
            tests = f" + {self.tests} {passes} × {self.seconds_per_test:.2g} s{how}"
        ms = f"{self.ms_per_iteration:.0f}" if self.ms_per_iteration >= 100 else f"{self.ms_per_iteration:.3g}"
        return f"about {format_duration(self.seconds)} ({self.iterations} iterations × {ms} ms{tests})"


def cpu_warning(estimate: Estimate, folds: int = 1, run_seconds: Optional[float] = None) -> Optional[str]:
    """The warning when a CPU is asked for the tutorial's iterations (else ``None``)."""
    if estimate.device != "cpu" or estimate.max_iter < TUTORIAL_ITERATIONS:
        return None
    total = run_seconds if run_seconds is not None else estimate.seconds * folds
    scope = f"about {format_duration(estimate.seconds)} for this fold"
    if folds > 1:
        scope += f", {format_duration(total)} for the {folds} folds left"
    return (f"training {estimate.max_iter} iterations per fold (the tutorial's) on the CPU takes {scope}; "
            f"pass --max-iter N for a shorter run (the demo trains 300 per fold), or --device cuda on a GPU")
