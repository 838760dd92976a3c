"""Ordered process pools: results in order, and a dead worker is a one-line error."""
from __future__ import annotations

import os

import pytest

from lymph_cv.errors import LymphCVError
from lymph_cv.core.workers import imap


def _square_or_die(n: int) -> int:
    if n == 3:
        os._exit(9)  # what the kernel's OOM killer leaves behind
    return n * n


def test_results_in_order_and_a_dead_worker_is_an_error():
    assert list(imap(_square_or_die, [5, 1, 4, 2], workers=2)) == [25, 1, 16, 4]
    with pytest.raises(LymphCVError, match="^patches: a worker process died"):
        list(imap(_square_or_die, [1, 2, 3, 4], workers=2, desc="patches"))


def _opencv_threads(_item: int) -> int:
    import cv2

    return cv2.getNumThreads()


def test_workers_start_after_opencv_ran_its_thread_pool_here():
    # OpenCV's pool threads alive in the parent (its parallel code ran here, after a thread-count
    # change) made forked workers die or hang for ever in cv2.setNumThreads; both seen before the fix.
    import subprocess
    import sys

    code = ("import cv2, numpy as np; from lymph_cv.core.workers import imap\n"
            "from test_workers import _opencv_threads\n"
            "for threads in (4, 1, 2, 3):\n"
            "    cv2.setNumThreads(threads)\n"
            "    cv2.GaussianBlur(np.zeros((2000, 2000, 3), np.uint8), (31, 31), 5)\n"
            "    print(list(imap(_opencv_threads, [0, 1, 2, 3], workers=2)), cv2.getNumThreads())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"[1, 1, 1, 1] {n}" for n in (4, 1, 2, 3)]
