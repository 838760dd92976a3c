"""Honest progress: plain lines without carriage returns off a terminal, the expected training
time from the first iterations (tests included), and the warning for 600,000 CPU iterations."""
from __future__ import annotations

import io

import pytest

from lymph_cv.core.progress import Progress, format_duration
from lymph_cv.stages.eta import Estimate, cpu_warning
from lymph_cv.stages.train import ACTION_STOP, Trainer, train
from trainutil import make_dataset, make_fold


def test_format_duration():
    assert [format_duration(s) for s in (4.2, 600, 3 * 3600 + 5 * 60, 50 * 3600)] == ["4 s", "10 min", "3 h 05 min", "2 d 02 h"]


def test_plain_lines_off_a_terminal():
    now = [0.0]
    lines = []
    stream = io.StringIO()
    with Progress(100, "train x", "iter", stream=stream, every=30, say=lines.append, clock=lambda: now[0]) as bar:
        for _ in range(40):
            now[0] += 1.0
            bar.set_postfix(loss="0.5")
            bar.update(1)
    assert stream.getvalue() == ""  # no bar (StringIO is no terminal), so no \r anywhere
    assert lines == ["train x: 30/100 iter (30.0%), 1 iter/s, ETA 70 s, loss 0.5",
                     "train x: 40/100 iter (40.0%), 1 iter/s, ETA 60 s, loss 0.5"]
    quiet = []
    with Progress(10, "q", quiet=True, say=quiet.append, every=0) as bar:
        bar.update(10)
    assert quiet == []


def test_estimate_and_cpu_warning():
    estimate = Estimate(iterations=599_990, ms_per_iteration=35.0, tests=120, seconds_per_test=4.0, tests_measured=True,
                        max_iter=600_000, device="cpu")
    assert estimate.seconds == pytest.approx(599_990 * 0.035 + 480)
    assert estimate.describe() == "about 5 h 58 min (599990 iterations × 35 ms + 120 test passes × 4 s)"
    warning = cpu_warning(estimate, folds=5)
    assert "600000 iterations per fold" in warning and "about 5 h 58 min for this fold, 29 h 50 min for the 5 folds left" in warning
    assert "--max-iter" in warning and "--device cuda" in warning
    assert Estimate(289, 1012.4, 1, 3.5, True, 300, "cpu").describe() == "about 5 min (289 iterations × 1012 ms + 1 test pass × 3.5 s)"
    assert cpu_warning(Estimate(10, 1, 0, 0, True, 600_000, "cuda")) is None
    assert cpu_warning(Estimate(10, 1, 0, 0, True, 2_000, "cpu")) is None


def test_training_estimates_from_its_first_iterations(tmp_path):
    solver = make_fold(make_dataset(tmp_path, n_train=64, n_test=32), batch=8, test_iter=2, test_interval=20,
                       max_iter=40, display=10, snapshot=0)
    seen = []
    result = train(solver, progress=False, on_estimate=seen.append)
    assert result.iterations == 40 and len(seen) == 1
    (estimate,) = seen
    # Estimated after 10 timed iterations (iteration 0 is not timed): 29 left at iteration 11;
    # tests at 20, 40 (on the grid) remain; the one at 0 was measured.
    assert (estimate.iterations, estimate.tests, estimate.tests_measured) == (29, 2, True)
    assert estimate.ms_per_iteration > 0 and estimate.seconds_per_test > 0
    log = (tmp_path / "1" / "train.log").read_text()
    assert "\r" not in log


def test_tutorial_iterations_on_the_cpu_warn_in_the_log(tmp_path, capfd):
    solver = make_fold(make_dataset(tmp_path, n_train=64, n_test=32), batch=8, test_iter=2, test_interval=1000,
                       max_iter=600_000, display=0, snapshot=0)
    trainer = Trainer(solver, device="cpu")

    def estimate_then_stop(estimate):
        trainer.log_estimate(estimate)
        trainer.pending.append(ACTION_STOP)

    trainer.on_estimate = estimate_then_stop
    result = trainer.solve(progress=False)
    assert result.stopped_early and result.iterations < 20
    log = (tmp_path / "1" / "train.log").read_text()
    assert "Expected time to iteration 600000: about " in log
    warning = next(line for line in log.splitlines() if line.startswith("W"))
    assert "600000 iterations per fold (the tutorial's) on the CPU" in warning and "--max-iter N" in warning
    assert "\r" not in capfd.readouterr().err
