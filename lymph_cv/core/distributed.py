"""One training run over several processes: who this process is, and the collective operations.

The rank, world size and rendezvous come from whoever started the processes, in this order:
torchrun or our own launcher (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``),
Open MPI's ``mpirun`` (``OMPI_COMM_WORLD_*``), Slurm's ``srun`` (``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/
``SLURM_LOCALID``, the first host of ``SLURM_STEP_NODELIST`` as the address).  A Slurm *batch* script
that runs training without ``srun`` is one process, whatever ``--ntasks`` says: only a job step
(``SLURM_STEP_NUM_TASKS``, set by ``srun``) counts.  The backend is NCCL on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from lymph_cv.errors import ConfigError, TrainingError

#: where rendezvous goes when the launcher names no address (every rank on this machine).
LOCAL_ADDRESS = "127.0.0.1"
#: ports derived from a Slurm job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN).
PORT_BASE = 29500
PORT_SPAN = 20000
#: how long a collective waits for a missing rank before failing (seconds).
DEFAULT_TIMEOUT_S = 300.0
ENV_TIMEOUT = "LYMPH_CV_DIST_TIMEOUT"


@dataclass(frozen=True)
class World:
    """This process's place in a run: rank ``rank`` of ``size``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    address: str = LOCAL_ADDRESS
    port: int = PORT_BASE
    launcher: str = "none"

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[03-05,7],gpu1`` → ``node03``)."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ConfigError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _port(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    if "SLURM_JOB_ID" in env:  # every task of the job derives the same port
        return PORT_BASE + _int(env, "SLURM_JOB_ID") % PORT_SPAN
    if "PBS_JOBID" in env:
        digits = re.match(r"\d+", env["PBS_JOBID"])
        if digits:
            return PORT_BASE + int(digits.group()) % PORT_SPAN
    return PORT_BASE


def discover(env: Optional[Mapping[str, str]] = None) -> World:
    """This process's :class:`World` from the environment (a single process when nothing says)."""
    env = os.environ if env is None else env
    address = env.get("MASTER_ADDR", LOCAL_ADDRESS)
    if "WORLD_SIZE" in env and "RANK" in env:
        rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher = "torchrun"
    elif "OMPI_COMM_WORLD_SIZE" in env:
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else rank
        launcher = "mpirun"
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        rank, size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else rank
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            address = first_host(nodes) if nodes else LOCAL_ADDRESS
        launcher = "srun"
    else:
        return World()
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"rank {rank} of a world of {size} processes ({launcher}'s environment)")
    return World(rank=rank, size=size, local_rank=local, address=address, port=_port(env), launcher=launcher)


def timeout_s(env: Optional[Mapping[str, str]] = None) -> float:
    env = os.environ if env is None else env
    if ENV_TIMEOUT not in env:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(env[ENV_TIMEOUT])
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{ENV_TIMEOUT}={env[ENV_TIMEOUT]!r}: expected a positive number of seconds")
    return value


class Collective:
    """The collective operations of one run (a no-op for a single process)."""

    def __init__(self, world: World, device_type: str = "cpu"):
        self.world = world
        self.group = None
        if not world.distributed:
            return
        import torch.distributed as dist

        backend = "nccl" if device_type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, init_method=f"tcp://{world.address}:{world.port}",
                                    rank=world.rank, world_size=world.size,
                                    timeout=datetime.timedelta(seconds=timeout_s()))
        except (RuntimeError, ValueError) as exc:
            raise TrainingError(f"rank {world.rank} of {world.size}: cannot join the run at "
                                f"{world.address}:{world.port} ({_first_line(exc)})") from None
        self.group = dist.group.WORLD

    def _call(self, what: str, operation):
        try:
            return operation()
        except RuntimeError as exc:  # gloo/NCCL: a peer died or timed out
            raise TrainingError(f"rank {self.world.rank} of {self.world.size}: lost another rank "
                                f"during {what} ({_first_line(exc)})") from None

    @staticmethod
    def _unflatten(flat, tensors: Sequence) -> None:
        import torch

        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def broadcast(self, tensors: Sequence, what: str = "the initial weights") -> None:
        """Rank 0's values into every rank's ``tensors`` (in place)."""
        if self.group is None or not tensors:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        self._call(what, lambda: dist.broadcast(flat, src=0))
        self._unflatten(flat, tensors)

    def average(self, tensors: Sequence, what: str = "the gradient reduction") -> None:
        """Every rank's ``tensors`` replaced by their mean over the ranks (one flat all-reduce)."""
        if self.group is None or not tensors:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._call(what, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        flat /= self.world.size
        self._unflatten(flat, tensors)

    def _integer(self, value: int, what: str, collective) -> int:
        if self.group is None:
            return value
        import torch

        tensor = torch.tensor([value], dtype=torch.int64)
        self._call(what, lambda: collective(tensor))
        return int(tensor.item())

    def root_value(self, value: int, what: str = "the run's seed") -> int:
        """Rank 0's integer ``value`` on every rank."""
        import torch.distributed as dist

        return self._integer(value, what, lambda tensor: dist.broadcast(tensor, src=0))

    def maximum(self, value: int, what: str = "the stop check") -> int:
        """The largest ``value`` over the ranks (how a stop request on any rank reaches them all)."""
        import torch.distributed as dist

        return self._integer(value, what, lambda tensor: dist.all_reduce(tensor, op=dist.ReduceOp.MAX))

    def in_turn(self, work, what: str):
        """``work()`` on each rank, one rank after the other (for files only one process may open at a
        time, such as a LevelDB); returns this rank's result."""
        result = None
        for rank in range(self.world.size):
            if rank == self.world.rank:
                result = work()
            self.barrier(what)
        return result

    def barrier(self, what: str = "a barrier") -> None:
        if self.group is None:
            return
        import torch.distributed as dist

        self._call(what, lambda: dist.barrier())

    def close(self, clean: bool = True) -> None:
        """Leave the run.  ``clean`` (every rank got to its end): the ranks first wait for each other,
        so none tears its connections down while another still works (gloo then aborted a rank at
        exit, now and then: "terminate called without an active exception"); after an error no
        rank waits for the others, which may be gone."""
        if self.group is None:
            return
        import torch.distributed as dist

        try:
            if clean:
                self.barrier("the end of the run")
            dist.destroy_process_group()
        finally:
            self.group = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def rank_environment(base: Mapping[str, str], rank: int, size: int, address: str, port: int) -> Dict[str, str]:
    """The environment of rank ``rank`` started by our own launcher on this machine."""
    env = {k: v for k, v in base.items()
           if not k.startswith(("OMPI_COMM_WORLD_", "SLURM_STEP_NUM_TASKS"))}
    env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR=address,
               MASTER_PORT=str(port))
    return env


def visible_gpus() -> List[int]:
    """CUDA device ids this process may use (``-gpu all``)."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def parse_gpus(spec: str) -> List[int]:
    """Caffe's ``-gpu`` value: ``0``, ``0,1`` or ``all``."""
    spec = spec.strip()
    if spec == "all":
        ids = visible_gpus()
        if not ids:
            raise ConfigError("-gpu all: no CUDA device is visible", valid=("cpu training without -gpu",))
        return ids
    try:
        ids = [int(part) for part in spec.split(",") if part.strip() != ""]
    except ValueError:
        raise ConfigError(f"--gpu {spec!r}: expected device ids like 0 or 0,1, or 'all'") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpu {spec!r}: expected distinct device ids like 0 or 0,1, or 'all'")
    return ids
