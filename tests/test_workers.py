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
