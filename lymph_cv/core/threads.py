"""CPU threading settings of the training entry points; applied before torch is imported.

torch's OpenMP threads spin while they wait for work by default.  On a CPU shared with other
processes (a busy workstation, an oversubscribed cluster node) the spinning threads steal the time
the working ones need: on the 2-core development machine under load, a 32w training iteration at
batch 128 took 2.3 s with spinning and 0.32 s with sleeping waits (``benchmarks/bench_train.py``).
So the entry points ask OpenMP to sleep instead, unless the user set the variables themselves.

They also keep freed memory in the heap (:func:`keep_freed_memory`): glibc hands blocks above its
mmap threshold (a net's activations) back to the kernel on free, so every forward pass faulted them
in again, zero-filled: evaluating one 1388×1040 image took ~450,000 page faults and a third of its
CPU time in the kernel; with the blocks kept, ~500 faults (``benchmarks/bench_eval.py``).
"""
from __future__ import annotations

import os
import sys

#: OpenMP environment defaults for training and the caffe tool.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
#: Blocks up to this size come from (and return to) the heap; free heap up to it is kept.
HEAP_KEEP_BYTES = 1 << 30
#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def configure_openmp(keep_memory: bool = True) -> bool:
    """Set :data:`OPENMP_DEFAULTS` where unset and (``keep_memory``) keep freed memory; True if torch
    was not loaded yet (so the OpenMP settings take effect).  ``lymph-cv`` keeps the memory when a
    command runs, not to show ``--help`` (ctypes)."""
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if keep_memory:
        keep_freed_memory()
    return "torch" not in sys.modules


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (:data:`HEAP_KEEP_BYTES`) so freed large blocks are
    reused instead of returned to the kernel; False where the C library has no ``mallopt``."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on (no ldconfig lookup)
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP_BYTES))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: numpy's OpenBLAS thread count for the data tools (``compute_image_mean``, ``convert_imageset``)
#: and ``evaluate`` (whose only numpy matrices are small).
DATA_TOOL_BLAS = {"OPENBLAS_NUM_THREADS": "1"}


def quiet_numpy_blas() -> bool:
    """Set :data:`DATA_TOOL_BLAS` where unset, for entry points that do no large linear algebra: OpenBLAS
    starts its threads when numpy loads and they spin a while, costing those short processes
    40–80 ms of CPU (``benchmarks/bench_tools.py``) and the reading thread a core.  Nothing is set
    once numpy is loaded (called in-process, e.g. by a test: the setting would only reach children);
    True if it was set in time."""
    if "numpy" in sys.modules:
        return False
    for key, value in DATA_TOOL_BLAS.items():
        os.environ.setdefault(key, value)
    return True


#: OpenBLAS's thread-count setters, by build (numpy's scipy-openblas prefixes and suffixes its symbols).
OPENBLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads_64_",
                    "scipy_openblas_set_num_threads", "openblas_set_num_threads64_", "openblas_set_num_threads")


def set_blas_threads(count: int) -> bool:
    """Give the OpenBLAS this process loaded (numpy's) ``count`` threads, after numpy loaded, by its
    own setter (ctypes on the mapped library): for callers whose own threads do the heavy work while
    numpy multiplies small matrices, where OpenBLAS's idle threads spin and take a core from them.
    False where no OpenBLAS is mapped (or /proc/self/maps is absent)."""
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "openblas" in line.lower()}
    except OSError:
        return False
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in OPENBLAS_SETTERS:
            setter = getattr(library, name, None)
            if setter is not None:
                setter(ctypes.c_int(count))
                return True
    return False

