"""Start one training process per device on this machine (``caffe train -gpu 0,1``).

Each child runs the same command with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` set, exactly as ``torchrun`` would start it, so the training code has one way to learn
its rank whoever started it.  The launcher forwards SIGINT/SIGTERM/SIGHUP to every child (the ranks
agree on the iteration to stop at), and when one child fails it gives the others a bounded time to
notice (they fail on the lost connection) before terminating them, then names the rank that failed.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from lymph_cv.core.distributed import LOCAL_ADDRESS, rank_environment
from lymph_cv.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

#: how long the other ranks get to stop by themselves after one failed (seconds).
GRACE_S = 20.0
POLL_S = 0.05
#: exit statuses of a run stopped by SIGINT / SIGTERM (the shell's 128 + signal number).
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class RankExit:
    rank: int
    pid: int
    status: int

    def describe(self) -> str:
        if self.status < 0:
            try:
                name = signal.Signals(-self.status).name
            except ValueError:
                name = f"signal {-self.status}"
            return f"rank {self.rank} (pid {self.pid}) was killed by {name}"
        return f"rank {self.rank} (pid {self.pid}) exited with status {self.status}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCAL_ADDRESS, 0))
        return sock.getsockname()[1]


def lymph_cv_command(argv: Sequence[str], module: str = "lymph_cv") -> List[str]:
    """``python -m MODULE ARGV`` with this interpreter."""
    return [sys.executable, "-m", module, *argv]


def launch_local(command: Sequence[str], processes: int, env: Optional[Dict[str, str]] = None) -> int:
    """Run ``command`` as ``processes`` ranks on this machine; returns the exit status.

    Status 0 when every rank finished; 130/143 when the run was stopped by SIGINT/SIGTERM; otherwise
    a :class:`TrainingError` names the first rank that failed.
    """
    if processes < 2:
        raise ConfigError(f"a multi-process run needs at least 2 processes, got {processes}")
    base = dict(os.environ if env is None else env)
    port = free_port()
    children: List[subprocess.Popen] = []
    received: List[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        for rank in range(processes):
            children.append(subprocess.Popen(list(command),
                                             env=rank_environment(base, rank, processes, LOCAL_ADDRESS, port)))
        log.info("started %d training processes (pids %s), rendezvous %s:%d", processes,
                 ", ".join(str(c.pid) for c in children), LOCAL_ADDRESS, port)
        failed = _wait(children)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if received:
        return SIGNAL_EXIT.get(received[0], 128 + int(received[0]))
    if failed is not None:
        root = children[0].returncode
        if failed.rank != 0 and root in SIGNAL_EXIT.values():
            return root
        raise TrainingError(f"{failed.describe()}; the run stopped")
    return 0


def _wait(children: List[subprocess.Popen]) -> Optional[RankExit]:
    """Wait for every child; the first that failed (the others get GRACE_S, then are terminated)."""
    failed: Optional[RankExit] = None
    deadline: Optional[float] = None
    while any(child.poll() is None for child in children):
        for rank, child in enumerate(children):
            status = child.poll()
            if status is not None and status != 0 and failed is None:
                failed = RankExit(rank, child.pid, status)
                deadline = time.monotonic() + GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            for child in children:
                if child.poll() is None:
                    child.terminate()
            deadline = None
        time.sleep(POLL_S)
    if failed is None:
        for rank, child in enumerate(children):
            if child.returncode != 0:
                return RankExit(rank, child.pid, child.returncode)
    return failed
