"""How much memory a stage may still take."""
from __future__ import annotations

import contextlib
import gc
import os
from typing import Iterator, Optional

MEMINFO = "/proc/meminfo"
KIB = 1024


def available_memory(meminfo: str = MEMINFO) -> Optional[int]:
    """Bytes available for new allocations without swapping: Linux's ``MemAvailable`` (free pages
    plus the page cache and reclaimable slabs the kernel can drop).  Free pages alone
    (``SC_AVPHYS_PAGES``) miss the page cache: on a machine that has just read a large database
    they judged a 3 GiB array not to fit in memory it had.  None where the platform does not say."""
    try:
        with open(meminfo, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        pass
    try:  # older kernels and other systems: free pages only
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off meanwhile: for work that makes millions of objects and no
    cycle (a list's entries, a database's records), where the collections their count triggers cost
    more than the work (2/3 of a list's reading time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
