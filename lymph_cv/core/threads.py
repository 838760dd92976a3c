"""CPU threading settings of the training entry points; applied before torch is imported.

torch's OpenMP threads spin while they wait for work by default.  On a CPU shared with other
processes (a busy workstation, an oversubscribed cluster node) the spinning threads steal the time
the working ones need: on the 2-core development machine under load, a 32w training iteration at
batch 128 took 2.3 s with spinning and 0.32 s with sleeping waits (``benchmarks/bench_train.py``).
So the entry points ask OpenMP to sleep instead, unless the user set the variables themselves.
"""
from __future__ import annotations

import os
import sys

#: OpenMP environment defaults for training and the caffe tool.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_openmp() -> bool:
    """Set :data:`OPENMP_DEFAULTS` where unset; True if torch was not loaded yet (so they take effect)."""
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return "torch" not in sys.modules
