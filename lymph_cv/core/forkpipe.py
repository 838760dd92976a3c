"""Results of work done in forked processes, in order, over one pipe per process.

For the data tools' short, byte-heavy work (``convert_imageset``: a megabyte of records per job):
a process pool pickles every job and result and keeps a managing thread in the parent, which here
cost more CPU than the reading it took over.  Instead the children are forked once with the work
already set up (nothing about a job is sent: job ``i`` runs in child ``i % processes``), each result
is a small pickled header and a raw block of bytes written straight into the child's pipe, and the
parent reads them back in job order (a full pipe makes a child wait: memory stays flat).

With ``shared_bytes``, a result whose blocks fit is put into one of :data:`SLOTS` slots of memory
shared with its child instead of the pipe (only its frame and header go through it): the parent
gets a view of the slot, valid until it asks for the next result, and reads no copy out of a pipe
(convert_imageset's writer spent a tenth of its CPU there).  The child reuses a slot once the
parent has moved past it (one byte back over a second pipe per result).

A child ignores SIGINT (the parent, in the same process group, handles it) and dies with the parent
(Linux); its exception is raised in the parent; a child that dies is a LymphCVError; closing the
results early (an error, an interrupt) kills the children and reaps them.
"""
from __future__ import annotations

import gc
import mmap
import os
import pickle
import signal
import struct
import sys
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

from lymph_cv.core import timeline
from lymph_cv.errors import LymphCVError

#: Linux prctl option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: fcntl's F_SETPIPE_SZ (Linux): the pipe's buffer, so a child can run a job ahead of the parent.
_F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
#: A message: kind, header length, block length.
_FRAME = struct.Struct("<BIQ")
_RESULT, _ERROR, _SHARED = 0, 1, 2
#: Shared slots per child: how many results a child may run ahead of the parent.  The writer of
#: convert_imageset is the longer path; readers that finish early leave it a core of its own
#: (2 slots against 8, paired at load 5: 0.95-1.20 against 0.86-0.99 s wall, the same CPU).
SLOTS = 8

Result = Tuple[Any, bytes]


def die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when ``parent`` dies (a ``kill -9`` of the command would otherwise
    leave its workers finishing queued work, unrecorded, under final names)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: workers end when their task queue breaks
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def quiet_opencv_pool() -> Optional[int]:
    """Stop OpenCV's worker threads in this process before forking.

    A child forked while OpenCV's thread pool exists inherits its condition variables with waiters
    that do not exist in the child: its ``cv2.setNumThreads`` then blocks forever in
    ``pthread_cond_destroy`` (seen after a test had run OpenCV's parallel code in the same process).
    Returns the parent's thread count, to restore after the fork.
    """
    cv2 = sys.modules.get("cv2")
    if cv2 is None:  # never imported here: no pool to inherit
        return None
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    return threads


def restore_opencv_pool(threads: Optional[int]) -> None:
    """The parent's OpenCV threads back after the fork (:func:`quiet_opencv_pool`'s count)."""
    if threads is not None:
        sys.modules["cv2"].setNumThreads(threads)


def available() -> bool:
    """True where this module can fork (POSIX)."""
    return hasattr(os, "fork") and sys.platform != "win32"


def _write_all(descriptor: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(descriptor, view):]


def _send(descriptor: int, kind: int, header: bytes, blocks: Sequence = ()) -> None:
    """One message: the frame, the header, then each bytes-like block as it is (no joining copy)."""
    views = [memoryview(block).cast("B") for block in blocks]
    _write_all(descriptor, _FRAME.pack(kind, len(header), sum(len(view) for view in views)) + header)
    for view in views:
        _write_all(descriptor, view)


def _read_exact(descriptor: int, size: int, what: str) -> bytes:
    """``size`` bytes from a pipe: as read (one piece when the writer got ahead), joined otherwise."""
    pieces, got = [], 0
    while got < size:
        piece = os.read(descriptor, size - got)
        if not piece:
            raise LymphCVError(f"{what}: a process died (out of memory or killed); run again")
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _error_header(exc: BaseException) -> bytes:
    """The pickled exception, or a LymphCVError with its text when it does not survive pickling."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(LymphCVError(f"{type(exc).__name__}: {exc}"))


class _Slots:
    """A child's shared slots (``SLOTS`` of ``size`` bytes in one shared anonymous mapping) and the pipe
    on which the parent hands each back; used in turn by both sides."""

    def __init__(self, size: int):
        self.size = size
        self.memory = mmap.mmap(-1, SLOTS * size)
        self.returned, self.give_back = os.pipe()
        self.filled = 0  # slots filled so far (the child) or read so far (the parent)

    def view(self) -> memoryview:
        """The next slot, in turn."""
        start = (self.filled % SLOTS) * self.size
        self.filled += 1
        return memoryview(self.memory)[start : start + self.size]

    def close(self) -> None:
        for descriptor in (self.returned, self.give_back):
            try:
                os.close(descriptor)
            except OSError:  # closed already (the child's copy of an end it does not use)
                pass
        try:
            self.memory.close()
        except BufferError:  # a view is still held (an abandoned result): the mapping goes with it
            pass


def _put_in_slot(slots: _Slots, blocks: Sequence) -> Optional[int]:
    """Copy ``blocks`` back to back into the child's next slot, once the parent gave it back; their
    size, or None when they do not fit (sent through the pipe instead)."""
    views = [memoryview(block).cast("B") for block in blocks]
    size = sum(len(view) for view in views)
    if size > slots.size:
        return None
    if slots.filled >= SLOTS and not os.read(slots.returned, 1):  # the parent is gone
        raise LymphCVError("the parent process stopped reading")
    slot, at = slots.view(), 0
    for view in views:
        slot[at : at + len(view)] = view
        at += len(view)
    return size


def _child(work: Callable[[int], Tuple[Any, Sequence]], jobs: range, descriptor: int, parent: int,
           slots: Optional[_Slots]) -> None:
    """A child's whole life: never returns into the parent's code (its stack, its ``finally`` blocks)."""
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent(parent)
        # No cycle collection: a short life, and its passes would touch (copy) every page of the
        # objects shared with the parent.
        gc.disable()
        for job in jobs:
            header, blocks = work(job)
            if job == jobs.start:
                timeline.mark("child: first job done")
            header_bytes = pickle.dumps(header, pickle.HIGHEST_PROTOCOL)
            size = None if slots is None else _put_in_slot(slots, blocks)
            if size is None:
                _send(descriptor, _RESULT, header_bytes, blocks)
            else:
                _write_all(descriptor, _FRAME.pack(_SHARED, len(header_bytes), size) + header_bytes)
        timeline.mark("child: last job sent")
    except BaseException as exc:  # all of it goes to the parent, which decides
        status = 1
        try:
            _send(descriptor, _ERROR, _error_header(exc))
        except BaseException:  # the parent is gone or stopped reading: nobody to tell
            pass
    finally:
        os._exit(status)


def _grow(descriptor: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(descriptor, _F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, OSError):  # a smaller pipe only means more waiting
        pass


class OrderedResults:
    """``work(i)`` for ``i`` in ``range(count)``, in order, computed by ``processes`` children forked
    at once (here, at construction); iterate once, then (or on any error) :meth:`close`.

    ``work`` returns ``(header, blocks)``: any picklable header and a sequence of bytes-like blocks;
    the parent gets the header and the blocks' bytes back to back: bytes, or with ``shared_bytes``
    (each slot's size) a memoryview valid only until the next result is asked for.  ``what`` names
    the work in errors.
    """

    def __init__(self, work: Callable[[int], Tuple[Any, Sequence]], count: int, processes: int, what: str = "worker",
                 shared_bytes: int = 0):
        self.count, self.what = count, what
        self._children: list[tuple[int, int]] = []
        self._slots: list[Optional[_Slots]] = []
        parent = os.getpid()
        opencv_threads = quiet_opencv_pool()
        try:
            for first in range(min(processes, count)):
                read_end, write_end = os.pipe()
                _grow(write_end)
                slots = _Slots(shared_bytes) if shared_bytes > 0 else None
                self._slots.append(slots)
                pid = os.fork()
                if pid == 0:
                    os.close(read_end)
                    for _pid, descriptor in self._children:
                        os.close(descriptor)
                    for each in self._slots:  # the parent's ends: its own, and those of the children before it
                        if each is not None:
                            os.close(each.give_back)
                    _child(work, range(first, count, processes), write_end, parent, slots)
                os.close(write_end)
                if slots is not None:
                    os.close(slots.returned)
                    slots.returned = -1
                self._children.append((pid, read_end))
        except BaseException:
            self.close()
            raise
        finally:
            restore_opencv_pool(opencv_threads)

    def __iter__(self) -> Iterator[Result]:
        for job in range(self.count):
            child = job % len(self._children)
            descriptor = self._children[child][1]
            kind, header_size, block_size = _FRAME.unpack(_read_exact(descriptor, _FRAME.size, self.what))
            header = pickle.loads(_read_exact(descriptor, header_size, self.what))
            if kind == _ERROR:
                raise header
            if kind != _SHARED:
                yield header, _read_exact(descriptor, block_size, self.what)
                continue
            slots = self._slots[child]
            yield header, slots.view()[:block_size]
            try:  # moved past it: the child may fill the slot again
                os.write(slots.give_back, b"\0")
            except BrokenPipeError:  # the child has sent all it had
                pass

    def close(self) -> None:
        """Kill the children (those done have exited already) and reap them."""
        children, self._children = self._children, []
        for pid, descriptor in children:
            os.close(descriptor)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, _descriptor in children:
            os.waitpid(pid, 0)
        slots, self._slots = self._slots, []
        for each in slots:
            if each is not None:
                each.close()

    def __enter__(self) -> "OrderedResults":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
