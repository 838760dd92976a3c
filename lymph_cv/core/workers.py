"""Process pools for the data stages: ordered results, progress (a bar on a terminal), one worker runs inline.

Work is split over images or folds (never over single patches), so the per-task cost of a
process pool is negligible next to the work.  Results come back in submission order, which
keeps every output deterministic whatever the number of workers.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from lymph_cv.core.forkpipe import die_with_parent, quiet_opencv_pool, restore_opencv_pool  # noqa: F401
from lymph_cv.core.progress import Progress
from lymph_cv.core.threads import usable_cores

from lymph_cv.errors import LymphCVError

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: Optional[int], tasks: int) -> int:
    """Number of processes to use: ``workers`` (``None``/0 = all cores), at most one per task."""
    if workers is None or workers <= 0:
        workers = usable_cores()
    return max(1, min(workers, tasks))


def _init_worker(parent: int) -> None:
    die_with_parent(parent)
    # The parent's SIGTERM handler unwinds the parent; a worker simply ends (the parent cleans up).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # One OpenCV thread per process: the pool already uses every core.
    import cv2

    cv2.setNumThreads(1)


def fork_available() -> bool:
    """True where worker processes are forked (they then share memory mapped before the fork)."""
    return "fork" in multiprocessing.get_all_start_methods()


def _context() -> multiprocessing.context.BaseContext:
    # fork where there is one: workers start at once, the task function need not be importable
    # from __main__ (spawn/forkserver re-run an unguarded script), and large arguments are not
    # pickled.  The workers run numpy/OpenCV only, never torch, so a parent that imported torch
    # is safe to fork.
    if fork_available():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def imap(
    function: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: Optional[int] = None,
    desc: Optional[str] = None,
    unit: str = "it",
    weights: Optional[Sequence[int]] = None,
    salvage: Optional[Callable[[T, R], None]] = None,
) -> Iterator[R]:
    """Yield ``function(item)`` for every item, in order, using up to ``workers`` processes.

    ``weights`` (one number per item) advance the progress bar instead of 1 per item, e.g.
    patches per image.  ``function`` must be a module-level function (picklable).
    When an error stops the iteration, queued items are dropped, running ones finish, and
    ``salvage(item, result)`` is called for each of those that succeeded but was not yielded.
    """
    count = resolve_workers(workers, len(items))
    total = sum(weights) if weights is not None else len(items)
    steps: Iterable[int] = weights if weights is not None else [1] * len(items)
    # A bar only on a terminal, plain periodic lines into a file or pipe (no \r in logs).
    with Progress(total, desc or "", unit, quiet=desc is None, leave=False) as bar:
        if count == 1:
            for item, step in zip(items, steps):
                yield function(item)
                bar.update(step)
            return
        opencv_threads = quiet_opencv_pool()
        try:
            pool = ProcessPoolExecutor(max_workers=count, mp_context=_context(), initializer=_init_worker,
                                       initargs=(os.getpid(),))
            # the workers are forked at the first submit; the parent's own pool comes back after
            pool.submit(int).result()
        finally:
            restore_opencv_pool(opencv_threads)
        try:
            # Bounded look-ahead keeps memory flat for large inputs.
            pending = []
            iterator = iter(zip(items, steps))
            for item, step in iterator:
                pending.append((item, pool.submit(function, item), step))
                if len(pending) >= 4 * count:
                    break
            while pending:
                item, future, step = pending[0]
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise LymphCVError(f"{desc or 'workers'}: a worker process died (out of memory or killed); "
                                       "run again (finished work is kept), or with --workers 1") from None
                pending.pop(0)
                following = next(iterator, None)
                if following is not None:
                    pending.append((following[0], pool.submit(function, following[0]), following[1]))
                bar.update(step)
                yield result
        finally:
            # On an error (or an abandoned generator) queued work is dropped, not finished.
            pool.shutdown(wait=True, cancel_futures=True)
            if salvage is not None:
                for item, future, _ in pending:
                    if future.done() and not future.cancelled() and future.exception() is None:
                        salvage(item, future.result())
